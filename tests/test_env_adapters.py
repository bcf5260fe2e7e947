"""The LIBERO adapter: applied to lerobot_xvla policies in LIBERO only, with the checkpoint's conventions."""

from __future__ import annotations

import copy

import pytest
import torch
from lerobot.envs.configs import AlohaEnv, LiberoEnv, PushtEnv
from lerobot.envs.factory import make_env_pre_post_processors
from lerobot.policies.factory import make_policy
from scipy.spatial.transform import Rotation

from lerobot_xvla import XVLAConfig, builtin_xvla
from lerobot_xvla.compat import LEROBOT_06
from lerobot_xvla.env_adapters import LiberoActionStep, LiberoAdapter, LiberoObservationStep
from lerobot_xvla.offline import TINY_ARCHITECTURE


def libero_observation(batch: int = 2, seed: int = 0) -> tuple[dict, torch.Tensor]:
    rotations = torch.as_tensor(Rotation.random(batch, random_state=seed).as_matrix(), dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    observation = {
        "observation.images.image": torch.rand(batch, 3, 8, 8, generator=generator),
        "observation.images.image2": torch.rand(batch, 3, 8, 8, generator=generator),
        "observation.robot_state": {
            "eef": {"pos": torch.rand(batch, 3, generator=generator, dtype=torch.float64), "mat": rotations, "quat": torch.zeros(batch, 4)},
            "gripper": {"qpos": torch.rand(batch, 2, generator=generator)},
        },
        "task": ["put the bowl on the plate"] * batch,
    }
    return observation, rotations


def test_observation_becomes_the_checkpoints_20d_proprio():
    observation, rotations = libero_observation()
    agent_view, wrist = observation["observation.images.image"].clone(), observation["observation.images.image2"].clone()
    position = observation["observation.robot_state"]["eef"]["pos"].float()
    preprocessor, _ = LiberoAdapter.processors()
    processed = preprocessor(observation)  # as lerobot-eval calls it
    state = processed["observation.state"]
    assert state.shape == (2, 20) and state.dtype == torch.float32
    assert torch.equal(state[:, :3], position)
    contiguous = torch.cat([rotations[:, :, 0], rotations[:, :, 1]], dim=-1).float()  # column 0, then column 1
    assert torch.allclose(state[:, 3:9], contiguous)
    assert state[:, 9:].abs().sum() == 0  # gripper channel and the absent second arm
    assert torch.equal(processed["observation.images.image"], torch.flip(agent_view, dims=[-2, -1]))
    assert torch.equal(processed["observation.images.image2"], wrist)
    assert "observation.robot_state" not in processed


def test_action_becomes_libero_7d_axis_angle():
    _, rotations = libero_observation(batch=3, seed=1)
    action = torch.zeros(3, 20)
    action[:, :3] = torch.tensor([[0.1, 0.2, 0.3]])
    action[:, 3:9] = torch.cat([rotations[:, :, 0], rotations[:, :, 1]], dim=-1).float()
    action[:, 9] = torch.tensor([0.9, 0.1, 0.51])
    _, postprocessor = LiberoAdapter.processors()
    out = postprocessor({"action": action})["action"]  # as lerobot-eval calls it
    expected = torch.as_tensor(Rotation.from_matrix(rotations.numpy()).as_rotvec(), dtype=torch.float32)
    assert out.shape == (3, 7)
    assert torch.allclose(out[:, 3:6], expected, atol=1e-5)
    assert out[:, 6].tolist() == [1.0, -1.0, 1.0]
    assert torch.equal(out[:, :3], action[:, :3])


def tiny_libero_config() -> XVLAConfig:
    return XVLAConfig(**copy.deepcopy(TINY_ARCHITECTURE), device="cpu", push_to_hub=False, domain_id=3)


def test_lerobot_uses_the_adapter_for_xvla_in_libero_only():
    pre, post = make_env_pre_post_processors(LiberoEnv(), tiny_libero_config())
    assert [type(s) for s in pre.steps] == [LiberoObservationStep] and [type(s) for s in post.steps] == [LiberoActionStep]
    for env in (PushtEnv(), AlohaEnv()):
        pre, post = make_env_pre_post_processors(env, tiny_libero_config())
        assert not pre.steps and not post.steps
    with builtin_xvla() as builtin:
        pre, _ = make_env_pre_post_processors(LiberoEnv(), builtin())
        assert LiberoObservationStep not in [type(s) for s in pre.steps]


def test_policy_in_libero_predicts_20d_ee6d():
    policy = make_policy(tiny_libero_config(), env_cfg=LiberoEnv(control_mode="absolute"))
    assert policy.config.action_feature.shape == (20,)
    assert policy.config.robot_state_feature.shape == (20,)
    assert list(policy.config.image_features) == ["observation.images.image", "observation.images.image2"]
    assert policy.model.action_mode.name == "ee6d"


def test_policy_cameras_have_the_size_the_env_renders():
    """LeRobot 0.6 renders the configured size; LeRobot 0.4 declares it (360x360 by default) but renders 256x256
    (tests/test_libero_sim.py compares with the real renders)."""
    env_cfg = LiberoEnv(control_mode="absolute", observation_height=128, observation_width=96)
    policy = make_policy(tiny_libero_config(), env_cfg=env_cfg)
    rendered = (3, 128, 96) if LEROBOT_06 else (3, 256, 256)
    assert [f.shape for f in policy.config.image_features.values()] == [rendered, rendered]


@pytest.mark.parametrize("mode", ["relative", "delta", None])
def test_control_modes_but_absolute_are_refused(mode):
    """LeRobot's default, relative, would apply X-VLA's absolute poses as deltas: refused before any step."""
    env_cfg = LiberoEnv() if mode is None else LiberoEnv(control_mode=mode)
    refusal = f"needs --env.control_mode=absolute, got --env.control_mode={mode or 'relative'}"
    with pytest.raises(ValueError, match=refusal):
        make_policy(tiny_libero_config(), env_cfg=env_cfg)


def test_adapter_refuses_missing_robot_state():
    observation, _ = libero_observation()
    observation.pop("observation.robot_state")
    with pytest.raises(ValueError, match="X-VLA needs --env.obs_type=pixels_agent_pos"):
        LiberoObservationStep().observation(observation)
