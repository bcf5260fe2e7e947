"""An SO101 joint dataset, trained in end-effector space, evaluated closed loop in the simulated arm.

    python benchmarks/so101_reach_training.py [--output-dir outputs/so101_reach] [--steps 1000] [--episodes 120]

1. records a scripted expert (`ReachExpert`: the fingertip straight at the ball, position-only IK) in
   `SO101Reach-v0` as an ordinary LeRobot joint dataset: two 64x64 cameras, 6 joints in LeRobot degrees, the
   executed targets with Gaussian noise of `--noise-deg` so the data shows recoveries;
2. trains the main job's tiny X-VLA on it with LeRobot's `lerobot-train --policy.action_mode=so101_ee6d` (the
   preprocessor turns every joint state and target into ee6d poses by forward kinematics);
3. runs `lerobot-eval --env.type=so101_reach` on the trained checkpoint and on an untrained one of the same
   config, processors and statistics, with the same env seeds; the postprocessor's IK turns the predicted poses
   into the joint targets the env's actuators receive;
4. prints success counts, paired by episode, with 95% Wilson intervals.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
from common import fresh_output_dir

from lerobot_xvla.demo import DEMO_CONFIG, lerobot_command, run, save_untrained_policy
from lerobot_xvla.demo_report import wilson_interval
from lerobot_xvla.offline import build_word_tokenizer

TASK = "SO101Reach-v0"
IMAGE_SIZE = 64
FPS = 30
EPISODE_LENGTH = 90  # 3 s; the expert needs 4-16 steps
EVAL_SEED = 100_000


def record(root: Path, episodes: int, noise_deg: float) -> None:
    import datasets
    import gymnasium as gym
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    from lerobot_xvla.envs.so101_reach import ReachExpert

    datasets.disable_progress_bars()
    image = {"dtype": "image", "shape": (IMAGE_SIZE, IMAGE_SIZE, 3), "names": ["height", "width", "channel"]}
    names = [f"{joint}.pos" for joint in ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper")]
    joints = {"dtype": "float32", "shape": (6,), "names": names}
    features = {"observation.images.front": image, "observation.images.wrist": dict(image), "observation.state": joints, "action": dict(joints)}
    dataset = LeRobotDataset.create("local/so101_reach", fps=FPS, features=features, root=root, robot_type="so_follower", use_videos=False)
    env = gym.make(f"lerobot_xvla/{TASK}", observation_height=IMAGE_SIZE, observation_width=IMAGE_SIZE, max_episode_steps=EPISODE_LENGTH)
    expert = ReachExpert(arms=1)
    rng = np.random.default_rng(0)
    start = time.monotonic()
    for seed in range(episodes):
        observation, info = env.reset(seed=seed)
        for _ in range(EPISODE_LENGTH):
            action = expert(observation, info)
            dataset.add_frame({"observation.images.front": observation["pixels"]["front"], "observation.images.wrist": observation["pixels"]["wrist"],
                               "observation.state": observation["agent_pos"], "action": action, "task": env.unwrapped.task})
            noisy = action + np.r_[rng.normal(0.0, noise_deg, 5), 0.0].astype(np.float32)
            observation, _, terminated, truncated, info = env.step(noisy)
            if terminated or truncated:
                break
        dataset.save_episode()
        print(f"\rrecording: episode {seed + 1}/{episodes} ({time.monotonic() - start:.0f} s)", end="", flush=True)
    print(flush=True)
    dataset.finalize()
    env.close()


def evaluate(checkpoint: Path, output_dir: Path, episodes: int, *extra: str) -> np.ndarray:
    """Successes of `lerobot-eval` in the simulated arm on env seeds EVAL_SEED...; `extra`: more lerobot-eval flags."""
    run([
        lerobot_command("lerobot-eval"), f"--policy.path={checkpoint}", "--env.type=so101_reach", f"--env.task={TASK}", *extra,
        f"--env.observation_height={IMAGE_SIZE}", f"--env.observation_width={IMAGE_SIZE}", f"--env.episode_length={EPISODE_LENGTH}",
        f"--eval.n_episodes={episodes}", f"--eval.batch_size={min(episodes, 10)}", f"--seed={EVAL_SEED}",
        "--policy.device=cpu", f"--output_dir={output_dir}",
    ])  # fmt: skip
    info = json.loads((output_dir / "eval_info.json").read_text())
    return np.array(info["per_task"][0]["metrics"]["successes"], dtype=bool)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/so101_reach"))
    parser.add_argument("--episodes", type=int, default=120, help="expert episodes to train on")
    parser.add_argument("--steps", type=int, default=1000, help="lerobot-train steps")
    parser.add_argument("--eval-episodes", type=int, default=30)
    parser.add_argument("--noise-deg", type=float, default=1.5)
    args = parser.parse_args()
    out = fresh_output_dir(args.output_dir)
    timings = {}
    start = time.monotonic()
    record(out / "dataset", args.episodes, args.noise_deg)
    timings["record_s"] = round(time.monotonic() - start)
    tokenizer = build_word_tokenizer(out / "tokenizer", words=["touch", "the", "red", "ball", "with", "gripper"])
    start = time.monotonic()
    run([
        lerobot_command("lerobot-train"), f"--config_path={DEMO_CONFIG}", "--dataset.repo_id=local/so101_reach",
        f"--dataset.root={out / 'dataset'}", f"--policy.tokenizer_name={tokenizer}", "--policy.action_mode=so101_ee6d",
        f"--steps={args.steps}", f"--save_freq={args.steps}", f"--output_dir={out / 'train'}",
    ], log=out / "train.log")  # fmt: skip
    timings["train_s"] = round(time.monotonic() - start)
    checkpoint = out / "train" / "checkpoints" / "last" / "pretrained_model"
    untrained = save_untrained_policy(checkpoint, out / "untrained" / "pretrained_model", seed=1)
    start = time.monotonic()
    trained = evaluate(checkpoint, out / "eval", args.eval_episodes)
    blind = evaluate(untrained, out / "eval_untrained", args.eval_episodes)
    timings["eval_s"] = round(time.monotonic() - start)
    summary = {"trained_success": trained.tolist(), "untrained_success": blind.tolist(), **timings, **vars(args) | {"output_dir": str(out)}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    for name, successes in (("trained", trained), ("untrained", blind)):
        low, high = wilson_interval(int(successes.sum()), len(successes))
        print(f"{name:9s}: {successes.sum()}/{len(successes)} episodes touched the ball (95% interval {low:.0%}-{high:.0%})")
    print(f"paired by seed: trained only {(trained & ~blind).sum()}, both {(trained & blind).sum()}, untrained only {(~trained & blind).sum()}")
    print(f"times: {timings}")
    shutil.rmtree(out / "dataset" / "images", ignore_errors=True)


if __name__ == "__main__":
    main()
