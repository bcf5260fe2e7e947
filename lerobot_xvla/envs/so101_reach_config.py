"""`--env.type=so101_reach`: LeRobot's env config of the simulated SO101 reach task (`so101_reach.py`).

`lerobot-eval --env.type=so101_reach` makes one arm, `--env.task=BiSO101Reach-v0` two. The features are what
LeRobot's SO101 robots record, so a policy trained on such a dataset (or on one recorded in this env) runs here
as on the arm: `observation.images.<camera>`, `observation.state` and `action` of 6 values per arm.

LeRobot builds an env by `gym.make(cfg.gym_id, **cfg.gym_kwargs)`; the ids live in this package's namespace,
registered when the plugin is imported, so neither stack looks for a `gym_so101_reach` package. MuJoCo and the
arm's model come with the `kinematics` extra; they are imported only when an env is made.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lerobot.configs.types import FeatureType, PolicyFeature
from lerobot.envs.configs import EnvConfig
from lerobot.utils.constants import ACTION, OBS_IMAGES, OBS_STATE

from ..robots.so101_steps import JOINTS_PER_ARM

GYM_NAMESPACE = "lerobot_xvla"
ENV_TYPE = "so101_reach"
TASK_ARMS = {"SO101Reach-v0": 1, "BiSO101Reach-v0": 2}


def camera_names(arms: int) -> tuple[str, ...]:
    """The env's cameras: one over the workspace and one on each wrist (named as bi_so_follower prefixes them)."""
    return ("front", "wrist") if arms == 1 else ("front", "left_wrist", "right_wrist")


def register_gym_envs() -> None:
    """Register the tasks with gymnasium; the env module (MuJoCo) is imported only when one is made."""
    import gymnasium as gym

    for task, arms in TASK_ARMS.items():
        env_id = f"{GYM_NAMESPACE}/{task}"
        if env_id not in gym.registry:
            gym.register(id=env_id, entry_point=f"{__package__}.so101_reach:SO101ReachEnv", kwargs={"arms": arms})


@EnvConfig.register_subclass(ENV_TYPE)
@dataclass
class SO101ReachEnvConfig(EnvConfig):
    """The simulated SO101 reach task, one arm (`SO101Reach-v0`) or two (`BiSO101Reach-v0`)."""

    task: str | None = "SO101Reach-v0"
    # Control ticks per second: LeRobot's SO101 default recording rate.
    fps: int = 30
    # Steps before an episode is cut off (5 s at 30 fps).
    episode_length: int = 150
    # Camera image size in pixels: small, for software rendering (X-VLA resizes to its own input size).
    observation_height: int = 128
    observation_width: int = 128
    # An arm has touched its ball when its fingertip frame is this close to the ball's centre (m).
    success_distance_m: float = 0.02
    render_mode: str = "rgb_array"
    features: dict[str, PolicyFeature] = field(default_factory=dict)
    features_map: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in TASK_ARMS:
            raise ValueError(f"--env.task for --env.type={ENV_TYPE} must be one of {', '.join(TASK_ARMS)}; got {self.task!r}")
        for name in ("fps", "episode_length", "observation_height", "observation_width"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--env.{name} must be > 0, got {getattr(self, name)}")
        if not self.success_distance_m > 0:
            raise ValueError(f"--env.success_distance_m must be > 0, got {self.success_distance_m}")
        arms = TASK_ARMS[self.task]
        image = PolicyFeature(type=FeatureType.VISUAL, shape=(self.observation_height, self.observation_width, 3))
        self.features = {
            **{f"pixels/{name}": image for name in camera_names(arms)},
            "agent_pos": PolicyFeature(type=FeatureType.STATE, shape=(JOINTS_PER_ARM * arms,)),
            ACTION: PolicyFeature(type=FeatureType.ACTION, shape=(JOINTS_PER_ARM * arms,)),
        }
        self.features_map = {
            **{f"pixels/{name}": f"{OBS_IMAGES}.{name}" for name in camera_names(arms)},
            "agent_pos": OBS_STATE,
            ACTION: ACTION,
        }

    @property
    def package_name(self) -> str:
        return GYM_NAMESPACE

    @property
    def gym_id(self) -> str:
        return f"{GYM_NAMESPACE}/{self.task}"

    @property
    def gym_kwargs(self) -> dict:
        return {
            "observation_height": self.observation_height,
            "observation_width": self.observation_width,
            "fps": self.fps,
            "success_distance_m": self.success_distance_m,
            "render_mode": self.render_mode,
            "max_episode_steps": self.episode_length,
        }
