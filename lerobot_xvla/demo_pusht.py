"""The main job's task and data: PushT's "touch the block" variant, its scripted expert, the datasets it records.

The variant, `gym_pusht/PushTReach-v0` (`pusht_reach.py`), is gym_pusht's PushT env (physics, rendering and
observations unchanged; the block starts anywhere on the table, the agent clear of it) with another goal: touch
the T-shaped block. Reward and success are 1 on the step the agent touches it, which ends the episode. PushT's own
goal, pushing the block onto the target, takes behaviour cloning hours of GPU training; touching the block is
reachable in minutes on a CPU and asks the same of the policy's eyes: the state holds only the agent's
position, so the block's position must come from the camera image.

The expert walks straight at the block's centre of mass, at most WALK_STEP pixels per step.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import numpy as np

PUSHT_TASK = "touch the T-shaped block"
REACH_ENV = "PushTReach-v0"  # registered under gym_pusht's namespace: `lerobot-eval --env.type=pusht --env.task=...`
PUSHT_FPS = 10
PUSHT_IMAGE_SIZE = 96  # gym_pusht's observation size, the size lerobot-eval's PushT env renders
BLOCK_CENTRE_LOCAL = np.array([0.0, 45.0])  # the T's centre of mass in the block's frame (pixels)
WALK_STEP = 40.0  # pixels per step
# The T reaches 77 px from its centre of mass, so a centre in this range keeps it on the 512 px table; the
# agent's disc has a radius of 15, so a start this far from the centre leaves a gap of 28 px or more.
BLOCK_CENTRE_RANGE = (90.0, 422.0)
START_DISTANCE = 120.0
TOUCH_GAP = 2.0  # pixels between the agent's disc and the block that count as touching


def block_centre(pose: np.ndarray) -> np.ndarray:
    """Centre of mass (x, y) of the block at `pose` (x, y, angle)."""
    cos, sin = np.cos(pose[2]), np.sin(pose[2])
    rotation = np.array([[cos, -sin], [sin, cos]])
    return pose[:2] + rotation @ BLOCK_CENTRE_LOCAL


def scripted_reach(agent: np.ndarray, block_pose: np.ndarray) -> np.ndarray:
    """The expert's next agent target (x, y) in pixels: WALK_STEP towards the block's centre of mass."""
    step = block_centre(block_pose) - agent
    return agent + step * min(1.0, WALK_STEP / max(np.linalg.norm(step), 1e-6))


def expert_action(observation: dict, info: dict) -> np.ndarray:
    """The expert's action in the PushT env, from its observation and info (which holds the block's pose)."""
    return np.clip(scripted_reach(observation["agent_pos"], np.asarray(info["block_pose"])), 0, 512)


def register_reach_env() -> None:
    """Register the variant with gymnasium; gym_pusht is imported only when it is made. The package registers
    it on import, so LeRobot's commands find it."""
    import gymnasium as gym

    env_id = f"gym_pusht/{REACH_ENV}"
    if env_id not in gym.registry:
        entry_point = f"{__package__}.pusht_reach:PushTReachEnv"
        gym.register(id=env_id, entry_point=entry_point, max_episode_steps=300, kwargs={"obs_type": "state"})


def make_pusht_env():
    """The env lerobot-eval builds for `--env.type=pusht --env.task=PushTReach-v0` (96x96 pixels and the
    agent's position). Importing lerobot_xvla registered it."""
    import gymnasium as gym

    return gym.make(
        f"gym_pusht/{REACH_ENV}",
        obs_type="pixels_agent_pos",
        render_mode="rgb_array",
        observation_width=PUSHT_IMAGE_SIZE,
        observation_height=PUSHT_IMAGE_SIZE,
        max_episode_steps=10_000,
    )


def record_pusht_dataset(root: Path, seeds: list[int], frames: int, repo_id: str, action_noise: float = 4.0):
    """Record one scripted episode per env seed as a LeRobotDataset at `root` (which must not exist). An
    episode ends when the agent touches the block, as in the env, or after `frames` frames.

    Features follow LeRobot's PushT convention: observation.image (96x96 RGB), observation.state and action
    (2-D agent positions in pixels). The recorded action is the expert's; the env executes it with Gaussian
    noise of `action_noise` pixels, so the data shows how the expert recovers from small errors.
    """
    import datasets
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    datasets.disable_progress_bars()  # one line per episode below instead of a bar per saved episode
    features = {
        "observation.image": {"dtype": "image", "shape": (PUSHT_IMAGE_SIZE, PUSHT_IMAGE_SIZE, 3), "names": ["height", "width", "channel"]},
        "observation.state": {"dtype": "float32", "shape": (2,), "names": ["x", "y"]},
        "action": {"dtype": "float32", "shape": (2,), "names": ["x", "y"]},
    }
    dataset = LeRobotDataset.create(repo_id, fps=PUSHT_FPS, features=features, root=root, robot_type="pusht", use_videos=False)
    env = make_pusht_env()
    rng = np.random.default_rng(seeds[0])
    start = time.monotonic()
    for number, seed in enumerate(seeds, 1):
        observation, info = env.reset(seed=seed)
        for _ in range(frames):
            action = expert_action(observation, info)
            dataset.add_frame(
                {
                    "observation.image": observation["pixels"],
                    "observation.state": observation["agent_pos"].astype(np.float32),
                    "action": action.astype(np.float32),
                    "task": PUSHT_TASK,
                }
            )
            observation, _, touched, _, info = env.step(np.clip(action + rng.normal(0.0, action_noise, 2), 0, 512))
            if touched:
                break
        dataset.save_episode()
        print(f"\rrecording {root.name}: episode {number}/{len(seeds)} ({time.monotonic() - start:.0f} s)", end="", flush=True)
    print(flush=True)
    dataset.finalize()
    env.close()
    return LeRobotDataset(repo_id, root=root)  # read back: the writer's metadata lacks the episode index


def expert_max_reward(seeds: list[int], frames: int) -> np.ndarray:
    """The expert's max reward per episode on `seeds` (1: it touched the block), executed without noise:
    [len(seeds)]."""
    env = make_pusht_env()
    best = []
    for seed in seeds:
        observation, info = env.reset(seed=seed)
        rewards = []
        for _ in range(frames):
            observation, reward, terminated, _, info = env.step(expert_action(observation, info))
            rewards.append(reward)
            if terminated:
                break
        best.append(max(rewards))
    env.close()
    return np.asarray(best)


def remove_previous_output(path: Path, marker: str) -> None:
    """Delete `path` only if an earlier run of the main job made it (it holds `marker`); refuse otherwise."""
    if not path.exists():
        return
    if not (path / marker).exists():
        sys.exit(f"refusing to overwrite {path}: it exists and was not written by the main job; pass another --output-dir")
    shutil.rmtree(path)
