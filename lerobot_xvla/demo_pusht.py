"""The main job's data: a scripted PushT expert and the LeRobotDatasets it records.

The expert pushes the T-shaped block's centre of mass in a straight line towards where it sits in the target
pose: it walks round the block to the far side, then pushes through the centre. It ignores the block's angle,
so it covers about half of the target on average (its score is printed by the main job), but it needs to see
where the block is: an X-VLA that learns to act like it must read the block's position from the camera image,
since the state holds only the agent's position.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import numpy as np

PUSHT_TASK = "push the T-shaped block onto the target"
PUSHT_FPS = 10
PUSHT_IMAGE_SIZE = 96  # gym_pusht's observation size, the size lerobot-eval's PushT env renders
# The target pose of gym_pusht (x, y, angle) and the T's centre of mass in the block's frame (pixels).
TARGET_POSE = np.array([256.0, 256.0, np.pi / 4])
BLOCK_CENTRE_LOCAL = np.array([0.0, 45.0])
# The agent stands this far from the block's centre before pushing: the T reaches 77 px from its centre and
# the agent's disc has a radius of 15.
STANDOFF = 100.0
PUSH_STEP = 25.0  # pixels per step while pushing
WALK_STEP = 40.0  # pixels per step while walking round the block
WORKSPACE_MARGIN = 25.0  # waypoints closer than this to the 512 px walls are not reachable


def block_centre(pose: np.ndarray) -> np.ndarray:
    """Centre of mass (x, y) of the block at `pose` (x, y, angle)."""
    cos, sin = np.cos(pose[2]), np.sin(pose[2])
    rotation = np.array([[cos, -sin], [sin, cos]])
    return pose[:2] + rotation @ BLOCK_CENTRE_LOCAL


TARGET_CENTRE = block_centre(TARGET_POSE)


def scripted_push(agent: np.ndarray, block_pose: np.ndarray) -> np.ndarray:
    """The expert's next agent target (x, y) in pixels, from the agent's position and the block's pose."""
    centre = block_centre(block_pose)
    to_target = TARGET_CENTRE - centre
    distance = np.linalg.norm(to_target)
    if distance < 4.0:
        return agent.copy()
    forward = to_target / distance
    sideways = np.array([-forward[1], forward[0]])
    behind, beside = (agent - centre) @ forward, (agent - centre) @ sideways
    if behind < -20.0 and abs(beside) < 25.0:  # on the line behind the block: push through its centre
        return agent + PUSH_STEP * forward - 0.5 * beside * sideways
    if behind < -0.3 * STANDOFF:  # behind the block but off the line: step onto it
        waypoint = centre - STANDOFF * forward
    else:  # in front of or beside the block: walk round it, on a side that has room
        side = 1.0 if beside >= 0 else -1.0
        if not _reachable(centre + side * STANDOFF * sideways) and _reachable(centre - side * STANDOFF * sideways):
            side = -side
        if abs(beside) < 0.9 * STANDOFF:
            waypoint = centre + side * 1.05 * STANDOFF * sideways
        else:
            waypoint = centre + side * STANDOFF * sideways - 0.5 * STANDOFF * forward
    step = waypoint - agent
    return agent + step * min(1.0, WALK_STEP / max(np.linalg.norm(step), 1e-6))


def expert_action(observation: dict, info: dict) -> np.ndarray:
    """The expert's action in the PushT env, from its observation and info (which holds the block's pose)."""
    return np.clip(scripted_push(observation["agent_pos"], np.asarray(info["block_pose"])), 0, 512)


def _reachable(point: np.ndarray) -> bool:
    return bool(np.all((point > WORKSPACE_MARGIN) & (point < 512.0 - WORKSPACE_MARGIN)))


def make_pusht_env():
    """The PushT env lerobot-eval builds for `--env.type=pusht` (96x96 pixels and the agent's position)."""
    import gymnasium as gym
    import gym_pusht  # noqa: F401  (registers gym_pusht/PushT-v0)

    return gym.make(
        "gym_pusht/PushT-v0",
        obs_type="pixels_agent_pos",
        render_mode="rgb_array",
        observation_width=PUSHT_IMAGE_SIZE,
        observation_height=PUSHT_IMAGE_SIZE,
        max_episode_steps=10_000,
    )


def record_pusht_dataset(root: Path, seeds: list[int], frames: int, repo_id: str, action_noise: float = 4.0):
    """Record one scripted episode per env seed as a LeRobotDataset at `root` (which must not exist).

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
            observation, _, _, _, info = env.step(np.clip(action + rng.normal(0.0, action_noise, 2), 0, 512))
        dataset.save_episode()
        print(f"\rrecording {root.name}: episode {number}/{len(seeds)} ({time.monotonic() - start:.0f} s)", end="", flush=True)
    print(flush=True)
    dataset.finalize()
    env.close()
    return LeRobotDataset(repo_id, root=root)  # read back: the writer's metadata lacks the episode index


def expert_coverage(seeds: list[int], frames: int) -> np.ndarray:
    """The expert's max coverage reward per episode on `seeds`, executed without noise: [len(seeds)]."""
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
