"""Discovery shim: LeRobot imports installed `lerobot_policy_*` distributions by name."""

import lerobot_xvla  # noqa: F401
