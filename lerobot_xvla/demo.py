"""The main job, offline on a CPU: does an X-VLA trained by lerobot-train learn to act from what it sees?

    python -m lerobot_xvla.demo [--output-dir outputs/demo] [--steps N] [--eval-episodes N]

1. records episodes of a scripted expert touching the block in PushT's reach variant (demo_pusht.py) as two
   LeRobotDatasets: one to train on, one held out;
2. trains the tiny X-VLA with LeRobot's `lerobot-train --config_path=configs/tiny_cpu_demo.json`;
3. saves an untrained policy of the same architecture beside it (same config, processors and statistics);
4. runs LeRobot's `lerobot-eval --env.type=pusht --env.task=PushTReach-v0` on both, with the same env seeds
   (the same episodes);
5. measures the action error on the held-out episodes against two baselines (predicting the mean action, and
   that the agent stays put), and again with each frame given another episode's image (does the policy act on
   what it sees?);
6. writes `learning.png` (learning curve, a held-out episode's actions, the held-out errors, closed-loop
   success counts with 95% Wilson intervals and the paired outcomes) next to the eval videos, and
   `summary.json` with every figure it prints (and the loss curve), then prints them.

Both commands are LeRobot's own; they pick up lerobot_xvla through LeRobot's plugin discovery.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .demo_pusht import PUSHT_TASK, REACH_ENV, expert_max_reward, record_pusht_dataset, remove_previous_output
from .offline import build_word_tokenizer

__all__ = ["DEMO_CONFIG", "PUSHT_TASK", "lerobot_command", "main"]

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO_ROOT / "configs" / "tiny_cpu_demo.json"
OUTPUT_MARKER = ".xvla_main_job"  # marks directories the main job may replace on its next run
EPISODE_FRAMES = 30  # 3 s at PushT's 10 fps; the expert needs at most 14 steps to cross the 512 px table
TRAIN_SEEDS = range(0, 100)
HELDOUT_SEEDS = range(10_000, 10_016)
EVAL_SEED = 100_000  # lerobot-eval's episodes use env seeds EVAL_SEED, EVAL_SEED + 1, ...


def lerobot_command(name: str) -> str:
    """Path of a LeRobot console script in the running environment."""
    candidate = Path(sys.executable).parent / name
    found = candidate if candidate.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} is not installed next to {sys.executable}")
    return str(found)


def run(command: list[str], log: Path | None = None) -> str:
    """Run a LeRobot command with its output on the terminal (and in `log`); return that output.

    The tiny model gets one CPU thread unless OMP_NUM_THREADS says otherwise: lerobot-train's data worker
    takes the other core of a 2-core machine, and two torch threads beside it made each training step
    about twice as slow."""
    print("$ " + " ".join(command), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env) as process:
        lines = []
        for line in process.stdout:
            sys.stdout.write(line)
            lines.append(line)
    output = "".join(lines)
    if log is not None:
        log.write_text(output)
    if process.returncode:
        raise subprocess.CalledProcessError(process.returncode, command)
    return output


def save_untrained_policy(checkpoint: Path, destination: Path, seed: int) -> Path:
    """A freshly initialised policy with `checkpoint`'s config, processors, statistics and tokenizer."""
    import torch

    from .modeling_xvla import XVLAPolicy, load_config

    shutil.copytree(checkpoint, destination)
    torch.manual_seed(seed)
    XVLAPolicy(load_config(checkpoint)).save_pretrained(destination)
    return destination


def evaluate(checkpoint: Path, output_dir: Path, episodes: int) -> Path:
    """`lerobot-eval` of `checkpoint` on PushT's reach variant; returns its eval_info.json."""
    run(
        [
            lerobot_command("lerobot-eval"),
            f"--policy.path={checkpoint}",
            "--env.type=pusht",
            f"--env.task={REACH_ENV}",
            f"--env.episode_length={EPISODE_FRAMES}",
            f"--eval.n_episodes={episodes}",
            f"--eval.batch_size={min(episodes, 10)}",
            # LeRobot 0.6 defaults to async vector envs whose forkserver workers never import gym_pusht
            # (NamespaceNotFound for any policy); 0.4.x defaults to sync envs already.
            "--eval.use_async_envs=false",
            f"--seed={EVAL_SEED}",
            "--policy.device=cpu",
            f"--output_dir={output_dir}",
        ]
    )
    return output_dir / "eval_info.json"


class Stages:
    """Prints each stage's name as it starts and keeps how long each took."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._start = time.monotonic()

    def __call__(self, name: str) -> None:
        now = time.monotonic()
        if self.seconds:
            self.seconds[next(reversed(self.seconds))] = round(now - self._last, 1)
        self.seconds[name] = 0.0
        self._last = now
        print(f"\n=== {name} ({now - self._start:.0f} s into the main job)", flush=True)

    def finish(self) -> float:
        self("done")
        del self.seconds["done"]
        return round(time.monotonic() - self._start, 1)


def main(argv: list[str] | None = None) -> None:
    from .demo_report import (
        ClosedLoop,
        loss_curve,
        mean_action_error,
        offline_action_error,
        plot_learning,
        report_lines,
        stay_put_error,
        summarise,
    )

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/demo"), help="where everything goes (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the config's)")
    parser.add_argument("--eval-episodes", type=int, default=40, help="closed-loop episodes per policy (default: %(default)s)")
    args = parser.parse_args(argv)
    out = args.output_dir.resolve()
    remove_previous_output(out, OUTPUT_MARKER)
    out.mkdir(parents=True)
    (out / OUTPUT_MARKER).touch()
    demo_config = json.loads(DEMO_CONFIG.read_text())
    steps = args.steps or demo_config["steps"]

    stage = Stages()
    stage("recording the scripted expert's episodes")
    tokenizer = build_word_tokenizer(out / "tokenizer")
    train_set = record_pusht_dataset(out / "dataset", list(TRAIN_SEEDS), EPISODE_FRAMES, "local/xvla_demo_pusht")
    heldout_set = record_pusht_dataset(out / "heldout", list(HELDOUT_SEEDS), EPISODE_FRAMES, "local/xvla_demo_pusht_heldout")

    stage("training with lerobot-train")
    train_log = run(
        [
            lerobot_command("lerobot-train"),
            f"--config_path={DEMO_CONFIG}",
            f"--dataset.root={train_set.root}",
            f"--policy.tokenizer_name={tokenizer}",
            f"--steps={steps}",
            f"--save_freq={steps}",
            f"--output_dir={out / 'train'}",
        ],
        log=out / "train.log",
    )
    checkpoint = out / "train" / "checkpoints" / "last" / "pretrained_model"
    untrained = save_untrained_policy(checkpoint, out / "untrained" / "pretrained_model", seed=demo_config["seed"] + 1)

    stage("closed loop with lerobot-eval: trained, then untrained, same env seeds")
    trained_loop = ClosedLoop.from_eval_info(evaluate(checkpoint, out / "eval", args.eval_episodes))
    untrained_loop = ClosedLoop.from_eval_info(evaluate(untrained, out / "eval_untrained", args.eval_episodes))
    expert = expert_max_reward(list(range(EVAL_SEED, EVAL_SEED + args.eval_episodes)), EPISODE_FRAMES)

    stage("action error on the held-out episodes")
    horizon = demo_config["policy"]["n_action_steps"]
    mean_action = train_set.meta.stats["action"]["mean"]
    trained_offline = offline_action_error(checkpoint, heldout_set, horizon)
    other_images = offline_action_error(checkpoint, heldout_set, horizon, other_images=True)
    heldout = {
        "trained": trained_offline.per_episode,
        "trained_given_other_episodes_images": other_images.per_episode,
        "untrained": offline_action_error(untrained, heldout_set, horizon).per_episode,
        "mean_action": mean_action_error(heldout_set, mean_action, horizon),
        "agent_stays_put": stay_put_error(heldout_set, horizon),
    }
    loss = loss_curve(train_log, demo_config["policy"]["log_loss_terms_every"])

    figure = plot_learning(
        out / "eval" / "learning.png", loss, trained_offline, mean_action, trained_loop, untrained_loop, expert, heldout
    )
    seconds = stage.finish()
    summary = summarise(loss, trained_loop, untrained_loop, expert, heldout, horizon, EVAL_SEED)
    summary |= {"stage_seconds": stage.seconds, "total_seconds": seconds}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    videos = sorted((out / "eval").glob("videos/**/*.mp4"))
    print(f"\nX-VLA main job finished in {seconds:.0f} s (PushT reach: touch the block)")
    print("\n".join(report_lines(summary)))
    print(f"  checkpoint: {checkpoint}")
    print(f"  figure:     {figure}")
    print(f"  metrics:    {out / 'eval' / 'eval_info.json'}, {out / 'eval_untrained' / 'eval_info.json'}, {out / 'summary.json'}")
    print(f"  videos:     {', '.join(str(v) for v in videos) or 'none'}")


if __name__ == "__main__":
    main()
