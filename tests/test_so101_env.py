"""The simulated SO101 reach env (`--env.type=so101_reach`): made by LeRobot's own factories, consistent with the
arm's kinematics, solvable and not trivially solved, refusing bad actions; and an end-effector X-VLA checkpoint
evaluated in it by `lerobot-eval`, one arm and two."""

from __future__ import annotations

import functools
import json

import gymnasium as gym
import numpy as np
import pytest
import torch
from lerobot.configs.types import FeatureType, PolicyFeature
from lerobot.envs.configs import EnvConfig
from lerobot.envs.factory import make_env
from lerobot.envs.utils import env_to_policy_features, preprocess_observation

from lerobot_xvla import XVLAConfig
from lerobot_xvla.envs.so101_reach import START_JOINTS, ReachExpert, SO101ReachEnv
from lerobot_xvla.offline import TINY_ARCHITECTURE, build_word_tokenizer
from lerobot_xvla.robots.so101_kinematics import SO101ForwardKinematics, packaged_urdf

from so101_deploy import run_lerobot_cli, save_checkpoint

TASKS = {"SO101Reach-v0": 1, "BiSO101Reach-v0": 2}
SIZE = 48  # rendered camera size in these tests


def env_config(**kwargs) -> EnvConfig:
    """The config `--env.type=so101_reach --env.<field>=...` parses to (draccus looks the type up in this registry;
    LeRobot 0.4's make_env_config knows only its own envs)."""
    return EnvConfig.get_choice_class("so101_reach")(**kwargs)


def make(task: str, **kwargs) -> gym.Env:
    return gym.make(f"lerobot_xvla/{task}", observation_height=SIZE, observation_width=SIZE, **kwargs)


@pytest.mark.parametrize("task", TASKS)
def test_lerobot_makes_the_env_with_the_features_it_declares(task):
    """LeRobot's make_env builds it from the type and task a user types; the observations,
    converted by LeRobot's preprocess_observation, are exactly the policy features LeRobot derives from the config."""
    arms = TASKS[task]
    config = env_config(task=task, observation_height=SIZE, observation_width=SIZE)
    envs = make_env(config, n_envs=2)
    vector_env = envs["so101_reach"][0]
    try:
        observation, _ = vector_env.reset(seed=[0, 1])
        converted = preprocess_observation(observation)
        expected = env_to_policy_features(config)
        assert set(converted) == set(expected) - {"action"}
        for key, tensor in converted.items():
            assert tuple(tensor.shape[1:]) == expected[key].shape, key
        assert expected["action"].shape == (6 * arms,)
        cameras = {"SO101Reach-v0": ["front", "wrist"], "BiSO101Reach-v0": ["front", "left_wrist", "right_wrist"]}[task]
        assert sorted(k for k in converted if "images" in k) == sorted(f"observation.images.{c}" for c in cameras)
        assert list(vector_env.call("task_description"))[0].startswith("touch the red ball")
        assert not torch.equal(converted[f"observation.images.{cameras[0]}"][0], converted[f"observation.images.{cameras[0]}"][1])
    finally:
        vector_env.close()


@pytest.mark.parametrize("task", TASKS)
def test_measured_joints_and_fingertip_agree_with_the_arms_kinematics(task):
    """agent_pos (LeRobot degrees) through the URDF's forward kinematics is where MuJoCo has the fingertip, in each
    arm's own base frame, after the arm has moved under its actuators; the gripper reads LeRobot's 0-100."""
    env = make(task)
    fk = SO101ForwardKinematics(packaged_urdf())
    observation, _ = env.reset(seed=3)
    target = observation["agent_pos"] + np.tile([15.0, -10, 10, -20, 30, 0], TASKS[task]).astype(np.float32)
    for _ in range(20):
        observation, *_ = env.step(target)
    joints = observation["agent_pos"].reshape(-1, 6).astype(np.float64)
    for arm, measured in zip(env.unwrapped.robot, joints, strict=True):
        position, rotation = arm.end_effector()
        pose = fk(torch.from_numpy(measured[:5])).numpy()
        assert np.abs(pose[:3, 3] - position).max() < 1e-5
        assert np.abs(pose[:3, :3] - rotation).max() < 1e-4
        assert abs(measured[5] - START_JOINTS[5]) < 1.0
    assert np.abs(joints[:, :5] - target.reshape(-1, 6)[:, :5]).max() < 3.0  # the actuators got there
    env.close()


@pytest.mark.parametrize("task", TASKS)
def test_the_scripted_expert_touches_every_ball_and_holding_still_touches_none(task):
    """Every ball is reachable (the expert succeeds on every seed, well within an episode), success needs every
    arm at its ball, and an arm held at its start never succeeds: the env is neither impossible nor trivial."""
    arms = TASKS[task]
    env = make(task, max_episode_steps=150)
    expert = ReachExpert(arms)
    for seed in range(4):
        observation, info = env.reset(seed=seed)
        start = observation["agent_pos"].copy()
        assert (info["distance_m"] > 0.05).all()
        for step in range(60):
            observation, reward, terminated, truncated, info = env.step(expert(observation, info))
            assert reward == float(terminated) == float(info["is_success"])
            if terminated:
                break
        assert terminated and (info["distance_m"] <= 0.02).all(), (seed, step, info["distance_m"])

        observation, info = env.reset(seed=seed)
        for _ in range(30):
            observation, reward, terminated, truncated, info = env.step(start)
            assert not terminated and reward == 0.0
    env.close()


def test_the_env_refuses_what_it_cannot_simulate():
    env = make("SO101Reach-v0")
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"refuses a non-finite action"):
        env.step(np.array([0, 0, float("nan"), 0, 0, 50], dtype=np.float32))
    with pytest.raises(ValueError, match=r"expects joint targets of shape \(6,\), got \(12,\)"):
        env.step(np.zeros(12, dtype=np.float32))
    env.close()
    with pytest.raises(ValueError, match=r"--env.task for --env.type=so101_reach must be one of SO101Reach-v0, BiSO101Reach-v0; got 'Reach-v0'"):
        env_config(task="Reach-v0")
    with pytest.raises(ValueError, match=r"--env.observation_height must be > 0, got 0"):
        env_config(observation_height=0)
    with pytest.raises(ValueError, match="arms must be 1 or 2, got 3"):
        SO101ReachEnv(arms=3)


def ee_checkpoint_for(task: str, root) -> str:
    """A tiny untrained so101_ee6d X-VLA with the env's cameras, state and action."""
    arms = TASKS[task]
    cameras = ["front", "wrist"] if arms == 1 else ["front", "left_wrist", "right_wrist"]
    inputs = {f"observation.images.{c}": PolicyFeature(FeatureType.VISUAL, (3, SIZE, SIZE)) for c in cameras}
    inputs["observation.state"] = PolicyFeature(FeatureType.STATE, (6 * arms,))
    config = XVLAConfig(
        **{**TINY_ARCHITECTURE, "image_size": (SIZE, SIZE)}, action_mode="so101_ee6d", device="cpu", push_to_hub=False,
        tokenizer_name=str(build_word_tokenizer(root / "tokenizer")), input_features=inputs,
        output_features={"action": PolicyFeature(FeatureType.ACTION, (6 * arms,))},
    )
    space = make(task).unwrapped.action_space
    low, high = torch.from_numpy(space.low.astype(np.float32)), torch.from_numpy(space.high.astype(np.float32))
    stats = {"min": low, "max": high, "mean": (low + high) / 2, "std": (high - low) / 4}
    return str(save_checkpoint(config, root / "checkpoint", dataset_stats={"observation.state": dict(stats), "action": stats}))


@pytest.mark.parametrize("task", TASKS)
def test_lerobot_eval_runs_an_end_effector_checkpoint_in_the_simulated_arms(task, tmp_path, monkeypatch):
    """`lerobot-eval --env.type=so101_reach` with an so101_ee6d checkpoint, as a user evaluates: the policy predicts
    poses, its postprocessor turns them into joint targets by IK, the env executes them. Every target the arms
    received is finite, inside the joints' ranges and within max_joint_step_deg of the measured joints it was
    computed from (lerobot-eval post-processes one action per step, so each IK call is seeded from them). (The envs run in
    this process, where the test sees them; LeRobot 0.6's default, a subprocess per env, runs the same code.)"""
    from lerobot.scripts.lerobot_eval import main

    checkpoint = ee_checkpoint_for(task, tmp_path)
    received: list[np.ndarray] = []  # (the target, the joints measured when it was sent) per env step
    original_step = SO101ReachEnv.step

    @functools.wraps(original_step)
    def step(self, action):
        received.append((np.array(action, dtype=np.float64), np.concatenate([arm.joints() for arm in self.robot])))
        return original_step(self, action)

    monkeypatch.setattr(SO101ReachEnv, "step", step)
    run_lerobot_cli(monkeypatch, [
        "lerobot-eval", f"--policy.path={checkpoint}", "--env.type=so101_reach", f"--env.task={task}",
        f"--env.observation_height={SIZE}", f"--env.observation_width={SIZE}", "--env.episode_length=12",
        "--eval.n_episodes=2", "--eval.batch_size=2", "--eval.use_async_envs=false", "--policy.device=cpu", f"--output_dir={tmp_path / 'eval'}",
    ], main)

    info = json.loads((tmp_path / "eval" / "eval_info.json").read_text())
    assert info["overall"]["n_episodes"] == 2
    assert len(received) == 2 * 12  # two envs, every step of both episodes (none reached its ball by chance)
    sent, measured = (np.stack(values).reshape(24, -1, 6) for values in zip(*received, strict=True))  # [step x env, arm, 6]
    space = make(task).unwrapped.action_space
    assert np.isfinite(sent).all()
    assert (sent.reshape(24, -1) >= space.low - 1e-4).all() and (sent.reshape(24, -1) <= space.high + 1e-4).all()
    assert np.abs(sent[..., :5] - measured[..., :5]).max() <= 10.0 + 1e-3
    assert list((tmp_path / "eval" / "videos").rglob("*.mp4"))
