"""The main job, offline on a CPU: a dataset -> lerobot-train -> lerobot-eval with the tiny X-VLA.

    python -m lerobot_xvla.demo [--output-dir outputs/demo] [--steps 200]

1. writes a local tokenizer and a small LeRobotDataset of scripted PushT episodes (gym_pusht);
2. trains the tiny X-VLA on it with `lerobot-train --config_path=configs/tiny_cpu_demo.json`;
3. evaluates the checkpoint in the PushT gym env with `lerobot-eval --env.type=pusht`;
4. prints where the checkpoint, the metrics and the videos are.

Both commands are LeRobot's own; they pick up lerobot_xvla through LeRobot's plugin discovery.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from .offline import build_word_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO_ROOT / "configs" / "tiny_cpu_demo.json"
PUSHT_TASK = "push the T-shaped block onto the target"


def write_pusht_dataset(root: Path, episodes: int = 4, frames: int = 40, seed: int = 0, repo_id: str = "local/xvla_demo_pusht"):
    """Record scripted PushT episodes (the agent pushes towards the block, with noise) as a LeRobotDataset.

    Features follow LeRobot's PushT convention: observation.image (96x96 RGB), observation.state and action
    (2-D agent positions in pixels).
    """
    import gymnasium as gym
    import gym_pusht  # noqa: F401  (registers gym_pusht/PushT-v0)
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    if root.exists():
        shutil.rmtree(root)
    features = {
        "observation.image": {"dtype": "image", "shape": (96, 96, 3), "names": ["height", "width", "channel"]},
        "observation.state": {"dtype": "float32", "shape": (2,), "names": ["x", "y"]},
        "action": {"dtype": "float32", "shape": (2,), "names": ["x", "y"]},
    }
    dataset = LeRobotDataset.create(repo_id, fps=10, features=features, root=root, robot_type="pusht", use_videos=False)
    env = gym.make("gym_pusht/PushT-v0", obs_type="pixels_agent_pos", render_mode="rgb_array", observation_width=96, observation_height=96)
    rng = np.random.default_rng(seed)
    for episode in range(episodes):
        observation, info = env.reset(seed=seed + episode)
        for _ in range(frames):
            block = np.asarray(info.get("block_pose", [256.0, 256.0, 0.0]))[:2]
            agent = observation["agent_pos"]
            action = np.clip(agent + 0.3 * (block - agent) + rng.normal(0, 8, 2), 0, 512).astype(np.float32)
            dataset.add_frame(
                {
                    "observation.image": observation["pixels"],
                    "observation.state": agent.astype(np.float32),
                    "action": action,
                    "task": PUSHT_TASK,
                }
            )
            observation, _, _, _, info = env.step(action)
        dataset.save_episode()
    dataset.finalize()
    env.close()
    return dataset


def lerobot_command(name: str) -> str:
    """Path of a LeRobot console script in the running environment."""
    candidate = Path(sys.executable).parent / name
    found = candidate if candidate.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} is not installed next to {sys.executable}")
    return str(found)


def run(command: list[str]) -> None:
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, check=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/demo"))
    parser.add_argument("--steps", type=int, default=200, help="training steps")
    parser.add_argument("--eval-episodes", type=int, default=2)
    args = parser.parse_args(argv)
    out = args.output_dir.resolve()

    tokenizer = build_word_tokenizer(out / "tokenizer")
    dataset = write_pusht_dataset(out / "dataset")
    print(f"dataset: {dataset.root} ({dataset.num_episodes} episodes, {dataset.num_frames} frames)")

    train_dir = out / "train"
    if train_dir.exists():
        shutil.rmtree(train_dir)
    run(
        [
            lerobot_command("lerobot-train"),
            f"--config_path={DEMO_CONFIG}",
            f"--dataset.root={dataset.root}",
            f"--policy.tokenizer_name={tokenizer}",
            f"--steps={args.steps}",
            f"--save_freq={args.steps}",
            f"--output_dir={train_dir}",
        ]
    )
    checkpoint = train_dir / "checkpoints" / "last" / "pretrained_model"

    eval_dir = out / "eval"
    if eval_dir.exists():
        shutil.rmtree(eval_dir)
    run(
        [
            lerobot_command("lerobot-eval"),
            f"--policy.path={checkpoint}",
            "--env.type=pusht",
            "--env.episode_length=60",
            f"--eval.n_episodes={args.eval_episodes}",
            f"--eval.batch_size={args.eval_episodes}",
            # LeRobot 0.6 defaults to async vector envs whose forkserver workers never import gym_pusht
            # (NamespaceNotFound for any policy); 0.4.x defaults to sync envs already.
            "--eval.use_async_envs=false",
            "--policy.device=cpu",
            f"--output_dir={eval_dir}",
        ]
    )
    metrics = json.loads((eval_dir / "eval_info.json").read_text())["overall"]
    videos = sorted(eval_dir.glob("videos/**/*.mp4"))
    print("\nX-VLA demo finished")
    print(f"  checkpoint: {checkpoint.resolve()}")
    print(f"  metrics:    {eval_dir / 'eval_info.json'}  (avg_sum_reward={metrics['avg_sum_reward']:.3f}, pc_success={metrics['pc_success']:.1f})")
    print(f"  videos:     {', '.join(str(v) for v in videos) or 'none'}")


if __name__ == "__main__":
    main()
