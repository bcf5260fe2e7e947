"""Simulated robots as LeRobot gym envs: `--env.type=so101_reach` (`so101_reach_config.py`, `so101_reach.py`)."""

from .so101_reach_config import SO101ReachEnvConfig, register_gym_envs

__all__ = ["SO101ReachEnvConfig", "register_gym_envs"]
