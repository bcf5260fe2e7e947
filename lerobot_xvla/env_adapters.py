"""Adapters between LeRobot gym envs and X-VLA where their conventions differ.

`lerobot-eval` runs: env preprocessor -> policy preprocessor -> policy -> policy postprocessor -> env
postprocessor. For an env listed here, and only when the policy is lerobot_xvla's, `registration.py` makes
LeRobot use the adapter's env processors, and builds the policy with the features the adapter produces
(instead of the env's raw ones). Envs without an adapter (aloha, pusht, ...) need none.

LIBERO (`--env.type=libero --env.control_mode=absolute`, how X-VLA's LIBERO checkpoint acts):

* any other control mode is refused when the policy is built, with an error naming `--env.control_mode`:
  LeRobot's default, `relative`, makes the controller read the absolute poses X-VLA predicts as deltas, and
  `lerobot-eval` would otherwise run to the end with the arm flung away (0.342 m in 20 steps of a hold action);
* the cameras keep their names and take the size the env renders: LeRobot 0.6 renders the config's
  `observation_height` x `observation_width` (360x360 by default), LeRobot 0.4 declares those but renders its
  env's own 256x256;
* the agent-view camera (`observation.images.image`) is turned by 180 degrees, as in the checkpoint's
  training data; the wrist camera (`image2`) is not;
* the robot state becomes the 20-D end-effector proprio of the original LIBERO client:
  [eef xyz, 6D rotation of the controller's orientation matrix (contiguous layout), 0] + 10 zeros;
* the 20-D ee6d action becomes LIBERO's 7-D [xyz, axis-angle, gripper +1 (close) / -1 (open)]: absolute
  targets of robosuite's OSC_POSE controller in the frame of the state, so the state fed back holds the arm
  still (`tests/test_libero_sim.py` checks all of it in the real simulator).

The simulator itself (LeRobot's `libero` extra and LIBERO's assets) comes with `pip install
'lerobot_policy_xvla[libero]'` and `lerobot-xvla libero-setup` (`libero_setup.py`), offline.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from lerobot.configs.types import FeatureType, PolicyFeature
from lerobot.envs.configs import EnvConfig
from lerobot.processor import EnvTransition, ObservationProcessorStep, PolicyProcessorPipeline, ProcessorStep, TransitionKey
from lerobot.utils.constants import ACTION, OBS_IMAGES, OBS_PREFIX, OBS_STATE

from .rotations import matrix_to_rot6d, rot6d_to_axis_angle

LIBERO_AGENT_VIEW = f"{OBS_IMAGES}.image"
LIBERO_ROBOT_STATE = f"{OBS_PREFIX}robot_state"
LIBERO_ROT6D_LAYOUT = "contiguous"  # the LIBERO checkpoint's layout (every other X-VLA dataset interleaves)
LIBERO_CONTROL_MODE = "absolute"  # the checkpoints' actions are absolute end-effector poses
# The camera size of lerobot.envs.libero.LiberoEnv when its config passes none (LeRobot 0.4's config declares
# observation_height/width but does not hand them to the env).
LIBERO_ENV_RENDER_SIZE = 256


@dataclass
class LiberoObservationStep(ObservationProcessorStep):
    """LIBERO env observation -> what X-VLA's LIBERO checkpoint saw (see the module docstring)."""

    def observation(self, observation: dict[str, Any]) -> dict[str, Any]:
        if LIBERO_AGENT_VIEW in observation:
            observation[LIBERO_AGENT_VIEW] = torch.flip(observation[LIBERO_AGENT_VIEW], dims=[-2, -1])
        robot_state = observation.pop(LIBERO_ROBOT_STATE, None)
        if robot_state is None:
            raise ValueError(
                f"the LIBERO observation has no '{LIBERO_ROBOT_STATE}'; X-VLA needs --env.obs_type=pixels_agent_pos"
            )
        position = robot_state["eef"]["pos"].float()  # [B, 3]
        rotation = matrix_to_rot6d(robot_state["eef"]["mat"].float(), LIBERO_ROT6D_LAYOUT)  # [B, 6]
        arm = torch.cat([position, rotation, torch.zeros_like(position[:, :1])], dim=-1)
        observation[OBS_STATE] = torch.cat([arm, torch.zeros_like(arm)], dim=-1)  # [B, 20]
        return observation

    def transform_features(self, features):
        return features


@dataclass
class LiberoActionStep(ProcessorStep):
    """20-D ee6d action [B, 20] -> LIBERO's 7-D [xyz, axis-angle, gripper +-1] (first arm only)."""

    def __call__(self, transition: EnvTransition) -> EnvTransition:
        action = transition[TransitionKey.ACTION]
        if action.shape[-1] < 10:
            raise ValueError(f"the LIBERO adapter needs ee6d actions (>= 10 values), got {tuple(action.shape)}")
        gripper = torch.where(action[..., 9:10] > 0.5, 1.0, -1.0).to(action.dtype)
        axis_angle = rot6d_to_axis_angle(action[..., 3:9], LIBERO_ROT6D_LAYOUT)
        transition = transition.copy()
        transition[TransitionKey.ACTION] = torch.cat([action[..., :3], axis_angle, gripper], dim=-1)
        return transition

    def transform_features(self, features):
        return features


def check_control_mode(env_cfg: EnvConfig) -> None:
    """Refuse a control mode in which X-VLA's absolute end-effector poses would not be read as such."""
    mode = getattr(env_cfg, "control_mode", None)
    if mode != LIBERO_CONTROL_MODE:
        raise ValueError(
            f"X-VLA in LIBERO needs --env.control_mode={LIBERO_CONTROL_MODE}, got --env.control_mode={mode}: X-VLA "
            "predicts absolute end-effector poses, and in 'relative' mode (LeRobot's LIBERO default) the "
            "controller applies them as deltas"
        )


def rendered_camera_shape(env_cfg: EnvConfig) -> tuple[int, int, int]:
    """(height, width, 3) of the images the LIBERO env renders: the size the config hands the env (LeRobot
    0.6: observation_height x observation_width), else the env's own default (LeRobot 0.4)."""
    env_kwargs = env_cfg.gym_kwargs
    height = env_kwargs.get("observation_height", LIBERO_ENV_RENDER_SIZE)
    width = env_kwargs.get("observation_width", LIBERO_ENV_RENDER_SIZE)
    return (height, width, 3)


class LiberoAdapter:
    env_type = "libero"

    @staticmethod
    def policy_env_config(env_cfg: EnvConfig) -> EnvConfig:
        """The env config as the policy sees it: its cameras at the size the env renders, a 20-D state and a
        20-D ee6d action. Refuses control modes other than absolute (`check_control_mode`)."""
        check_control_mode(env_cfg)
        adapted = copy.copy(env_cfg)  # not dataclasses.replace: LiberoEnv.__post_init__ would re-add raw features
        camera_shape = rendered_camera_shape(env_cfg)
        cameras = {
            k: PolicyFeature(type=FeatureType.VISUAL, shape=camera_shape)
            for k, v in env_cfg.features.items()
            if v.type is FeatureType.VISUAL
        }
        adapted.features = {
            **cameras,
            OBS_STATE: PolicyFeature(type=FeatureType.STATE, shape=(20,)),
            ACTION: PolicyFeature(type=FeatureType.ACTION, shape=(20,)),
        }
        adapted.features_map = {**{k: env_cfg.features_map[k] for k in cameras}, OBS_STATE: OBS_STATE, ACTION: ACTION}
        return adapted

    @staticmethod
    def processors() -> tuple[PolicyProcessorPipeline, PolicyProcessorPipeline]:
        return (
            PolicyProcessorPipeline(steps=[LiberoObservationStep()], name="xvla_libero_env_preprocessor"),
            PolicyProcessorPipeline(steps=[LiberoActionStep()], name="xvla_libero_env_postprocessor"),
        )


ENV_ADAPTERS = {LiberoAdapter.env_type: LiberoAdapter}


def env_adapter(env_cfg: EnvConfig | None) -> type[LiberoAdapter] | None:
    """The adapter for an env config, None when the env needs none."""
    if env_cfg is None:
        return None
    return next((a for name, a in ENV_ADAPTERS.items() if env_cfg.type.startswith(name)), None)
