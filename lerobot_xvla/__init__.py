"""lerobot_xvla: X-VLA (arXiv 2510.10274) as a LeRobot policy plugin.

Importing the package makes `--policy.type=xvla` and `xvla` checkpoints resolve to this implementation
(`lerobot_xvla.registration`; `LEROBOT_XVLA_BUILTIN=1` keeps LeRobot's built-in X-VLA), and registers the
main job's PushT variant with gymnasium (`demo_pusht.py`), so `lerobot-eval --env.task=PushTReach-v0` runs, and the
simulated SO101 arms with LeRobot and gymnasium (`envs/`), so `lerobot-eval --env.type=so101_reach` runs. It also
shortens LeRobot 0.6's report of a torchcodec without FFmpeg to one line (`compat.quiet_video_backend_report`).
"""

__version__ = "0.1.0"

from .action_modes import ACTION_MODES, ActionMode, build_action_mode, register_action_mode
from .compat import quiet_video_backend_report
from .configuration_xvla import XVLAConfig, XVLAConfigError
from .demo_pusht import register_reach_env
from .envs import register_gym_envs
from .registration import builtin_xvla, install

quiet_video_backend_report()
install()
register_reach_env()
register_gym_envs()


def __getattr__(name: str):
    # The network pulls in transformers' Florence-2; import it only when asked for.
    if name in ("XVLAPolicy", "XVLAModel"):
        from . import modeling_xvla

        return getattr(modeling_xvla, name)
    if name == "make_xvla_pre_post_processors":
        from .processor_xvla import make_xvla_pre_post_processors

        return make_xvla_pre_post_processors
    raise AttributeError(f"module 'lerobot_xvla' has no attribute {name!r}")


__all__ = [
    "ACTION_MODES",
    "ActionMode",
    "XVLAConfig",
    "XVLAConfigError",
    "XVLAModel",
    "XVLAPolicy",
    "build_action_mode",
    "builtin_xvla",
    "make_xvla_pre_post_processors",
    "register_action_mode",
]
