"""Two robots co-trained into one X-VLA with `--policy.mixture`, each evaluated closed loop from the same checkpoint.

    MUJOCO_GL=egl python benchmarks/mixture_training.py [--output-dir outputs/mixture] [--steps 2000]
        [--pusht-episodes 100] [--so101-episodes 120] [--pusht-eval 40] [--so101-eval 30] [--reuse]

The two embodiments differ in every way a mixture has to absorb: PushT's reach (the main job's task: the absolute
2-D target of a point agent, one 96x96 camera, 10 fps, domain 3) and the simulated SO101 arm touching a ball
(`SO101Reach-v0`: 6 joint targets, two 64x64 cameras, 30 fps, domain 5).

1. records each scripted expert as an ordinary LeRobotDataset (`demo_pusht.record_pusht_dataset`,
   `so101_reach_training.record`);
2. co-trains the main job's tiny X-VLA on both with LeRobot's `lerobot-train --policy.mixture=...`, and, as the
   control that is blind to the domain id, the same run with `--policy.domain_blind=true` (every sample uses one
   soft prompt and one set of action heads; statistics, widths and losses stay per domain);
3. saves an untrained policy of the co-trained config, processors and statistics;
4. runs `lerobot-eval --policy.domain_id=3 --env.type=pusht` and `--policy.domain_id=5 --env.type=so101_reach` for
   each of the three, with the same env seeds;
The two trainings run side by side, and so do the evaluations (each LeRobot command of the tiny model takes one
core). `--reuse` continues in an existing output directory: datasets and checkpoints that are there are kept.

5. prints success counts with 95% Wilson intervals, paired by seed against the co-trained policy, and the
   held-out loss of each domain (lerobot-train's `--dataset.eval_split`, LeRobot 0.6) against predicting the
   mean action (whose loss on MEAN_STD-normalised targets is their mean square, computed here on the same
   held-out episodes).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from common import fresh_output_dir
from so101_reach_training import evaluate as evaluate_so101
from so101_reach_training import record as record_so101

from lerobot_xvla.demo import DEMO_CONFIG, EPISODE_FRAMES, EVAL_SEED, lerobot_command, run, save_untrained_policy
from lerobot_xvla.demo_pusht import PUSHT_TASK, REACH_ENV, record_pusht_dataset
from lerobot_xvla.demo_report import wilson_interval
from lerobot_xvla.envs.so101_reach import TASKS
from lerobot_xvla.offline import build_word_tokenizer

PUSHT_DOMAIN, SO101_DOMAIN = 3, 5
PUSHT_REPO, SO101_REPO = "local/xvla_demo_pusht", "local/so101_reach"
FRONT = "observation.images.front"  # PushT's only camera shares the SO101's front view slot
EVAL_SPLIT = 0.1


def evaluate_pusht(checkpoint: Path, output_dir: Path, episodes: int) -> np.ndarray:
    run([
        lerobot_command("lerobot-eval"), f"--policy.path={checkpoint}", f"--policy.domain_id={PUSHT_DOMAIN}",
        "--env.type=pusht", f"--env.task={REACH_ENV}", f"--env.episode_length={EPISODE_FRAMES}",
        f'--rename_map={json.dumps({"observation.image": FRONT})}', f"--eval.n_episodes={episodes}",
        f"--eval.batch_size={min(episodes, 10)}", "--eval.use_async_envs=false", f"--seed={EVAL_SEED}",
        "--policy.device=cpu", f"--output_dir={output_dir}",
    ])  # fmt: skip
    info = json.loads((output_dir / "eval_info.json").read_text())
    return np.array(info["per_task"][0]["metrics"]["successes"], dtype=bool)


def held_out_losses(log: str) -> dict[str, float]:
    """The last `X-VLA held-out loss terms` line of a lerobot-train log, as {term: value}."""
    lines = [line for line in log.splitlines() if "X-VLA held-out loss terms:" in line]
    if not lines:
        return {}
    return {k: float(v) for k, v in re.findall(r"([\w/]+)=([-\d.e+]+)", lines[-1].split("held-out loss terms:")[1])}


def mean_action_loss(repo_id: str, root: Path) -> float:
    """Mean square of the held-out episodes' normalised actions: the loss of always predicting the training mean."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    from lerobot_xvla.mixture.dataset import split_episodes

    dataset = LeRobotDataset(repo_id, root=root)
    _, held_out = split_episodes(list(range(dataset.num_episodes)), EVAL_SPLIT)
    stats = dataset.meta.stats["action"]
    frames = LeRobotDataset(repo_id, root=root, episodes=held_out).hf_dataset["action"]
    actions = np.stack([np.asarray(a) for a in frames])
    return float((((actions - stats["mean"]) / (stats["std"] + 1e-8)) ** 2).mean())


def train(out: Path, name: str, tokenizer: Path, steps: int, sources: list[dict], *extra: str) -> tuple[Path, str]:
    checkpoint = out / name / "checkpoints" / "last" / "pretrained_model"
    if checkpoint.is_dir():  # --reuse
        return checkpoint, (out / f"{name}.log").read_text()
    log = run([
        lerobot_command("lerobot-train"), f"--config_path={DEMO_CONFIG}", "--dataset.repo_id=mixture",
        f"--policy.mixture={json.dumps(sources)}", f"--policy.tokenizer_name={tokenizer}", f"--steps={steps}",
        f"--save_freq={steps}", f"--dataset.eval_split={EVAL_SPLIT}", f"--eval_steps={steps}", f"--output_dir={out / name}", *extra,
    ], log=out / f"{name}.log")  # fmt: skip
    return checkpoint, log


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/mixture"))
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--pusht-episodes", type=int, default=100)
    parser.add_argument("--so101-episodes", type=int, default=120)
    parser.add_argument("--pusht-eval", type=int, default=40)
    parser.add_argument("--so101-eval", type=int, default=30)
    parser.add_argument("--reuse", action="store_true", help="continue in --output-dir, keeping its datasets and checkpoints")
    args = parser.parse_args()
    out = args.output_dir.resolve() if args.reuse else fresh_output_dir(args.output_dir)
    timings: dict[str, int] = {}
    start = time.monotonic()
    if not (out / "pusht" / "meta" / "info.json").is_file():
        record_pusht_dataset(out / "pusht", seeds=list(range(args.pusht_episodes)), frames=EPISODE_FRAMES, repo_id=PUSHT_REPO)
    if not (out / "so101" / "meta" / "info.json").is_file():
        record_so101(out / "so101", args.so101_episodes, noise_deg=1.5)
    timings["record_s"] = round(time.monotonic() - start)
    words = sorted(set(f"{PUSHT_TASK} {TASKS[1]}".split()))
    tokenizer = build_word_tokenizer(out / "tokenizer", words=words)
    sources = [
        {"repo_id": PUSHT_REPO, "root": str(out / "pusht"), "domain_id": PUSHT_DOMAIN, "rename_map": {"observation.image": FRONT}},
        {"repo_id": SO101_REPO, "root": str(out / "so101"), "domain_id": SO101_DOMAIN},
    ]
    runs = {"co-trained": (), "domain-blind": ("--policy.domain_blind=true",)}
    start = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        trained = dict(zip(runs, pool.map(lambda name: train(out, name, tokenizer, args.steps, sources, *runs[name]), runs)))
    timings["train_s"] = round(time.monotonic() - start)
    policies = {name: checkpoint for name, (checkpoint, _) in trained.items()}
    held_out = {name: held_out_losses(log) for name, (_, log) in trained.items()}
    untrained = out / "untrained" / "pretrained_model"
    policies["untrained"] = untrained if untrained.is_dir() else save_untrained_policy(policies["co-trained"], untrained, seed=1)
    start = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        pusht = pool.map(lambda name: evaluate_pusht(policies[name], out / f"eval_pusht_{name}", args.pusht_eval), policies)
        so101 = pool.map(lambda name: evaluate_so101(policies[name], out / f"eval_so101_{name}", args.so101_eval,
                                                     f"--policy.domain_id={SO101_DOMAIN}"), policies)  # fmt: skip
        successes = {name: {"pusht": p.tolist(), "so101": s.tolist()} for name, p, s in zip(policies, pusht, so101, strict=True)}
    timings["eval_s"] = round(time.monotonic() - start)
    baseline = {"pusht": mean_action_loss(PUSHT_REPO, out / "pusht"), "so101": mean_action_loss(SO101_REPO, out / "so101")}
    summary = {"successes": successes, "held_out_loss": held_out, "mean_action_loss": baseline, **timings,
               **vars(args) | {"output_dir": str(out)}}  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    for env in ("pusht", "so101"):
        print(f"\n{env}: episodes that touched the target")
        reference = np.array(successes["co-trained"][env])
        for name in policies:
            result = np.array(successes[name][env])
            low, high = wilson_interval(int(result.sum()), len(result))
            paired = "" if name == "co-trained" else (
                f"; paired with co-trained: co-trained only {(reference & ~result).sum()}, both {(reference & result).sum()}, "
                f"{name} only {(~reference & result).sum()}"
            )  # fmt: skip
            print(f"  {name:13s} {result.sum():3d}/{len(result)} (95% interval {low:.0%}-{high:.0%}){paired}")
    domain_of = {"pusht": PUSHT_DOMAIN, "so101": SO101_DOMAIN}
    for env, domain in domain_of.items():
        losses = ", ".join(f"{name} {held_out[name].get(f'domain_loss/{domain}', float('nan')):.3f}" for name in held_out)
        print(f"held-out loss, {env} (domain {domain}): {losses}; mean action {baseline[env]:.3f}")
    print(f"times: {timings}")
    for dataset in ("pusht", "so101"):
        shutil.rmtree(out / dataset / "images", ignore_errors=True)


if __name__ == "__main__":
    main()
