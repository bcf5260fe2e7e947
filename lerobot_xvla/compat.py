"""Everything that depends on the installed LeRobot's version, in one place.

lerobot_xvla supports LeRobot 0.4.x (Python >= 3.10, transformers 4.57) and 0.6.x (Python >= 3.12,
transformers 5). No other module tests a version: they use the names defined here.

What differs between the two, as far as the plugin is concerned:

* checkpoints: LeRobot 0.4.x's built-in X-VLA saves the vendored Florence-2 key layout, 0.6.x's saves
  transformers' native one (and converts the old one on load); we write what the installed LeRobot writes.
* deployment on a robot: `lerobot-record --policy.path=...` on 0.4.x, `lerobot-rollout` on 0.6.x
  (`lerobot-record` became teleoperation-only), which also brings LeRobot's RTC inference engine and a
  `--use_torch_compile` that `registration.py` maps onto our compile options.
* the training state helpers moved from `lerobot.utils.train_utils` to `lerobot.common.train_utils`, the
  image transforms from `lerobot.datasets.transforms` to `lerobot.transforms.transforms`, and
  `TrainPipelineConfig.eval_freq` became `env_eval_freq` (so the ready configs set neither).
* choosing a video decoder: LeRobot 0.6.x tries to import torchcodec each time a config or dataset picks its
  default decoder, and where FFmpeg's shared libraries are missing it logs torchcodec's whole loading report
  (five tracebacks) each time, a dozen times in one lerobot-train run, before falling back to pyav, which works.
  `quiet_video_backend_report` makes that one INFO line, once.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging

from packaging.version import Version

LEROBOT_VERSION = Version(importlib.metadata.version("lerobot"))
# The releases this plugin is tested with, oldest first (constraints/ pins each stack).
SUPPORTED_LEROBOT = (Version("0.4.3"), Version("0.7"))  # [low, high)
LEROBOT_06 = LEROBOT_VERSION >= Version("0.6")

# Checkpoint layout the installed LeRobot's built-in X-VLA writes (see checkpoints.py).
SAVED_LAYOUT = "lerobot-0.6" if LEROBOT_06 else "lerobot-0.4"
# The LeRobot command that runs a policy on a real robot.
DEPLOY_COMMAND = "lerobot-rollout" if LEROBOT_06 else "lerobot-record"
# `lerobot.rollout`, the engine behind lerobot-rollout, whose torch.compile step registration.py hooks.
HAS_LEROBOT_ROLLOUT = importlib.util.find_spec("lerobot.rollout") is not None

# Names whose module moved, imported on first use (LeRobot's training utilities pull in its optimizers and Hub
# code, which importing the plugin does not need).
_TRAIN_UTILS = "lerobot.common.train_utils" if LEROBOT_06 else "lerobot.utils.train_utils"
_MOVED = {
    "load_training_state": _TRAIN_UTILS,
    "save_training_state": _TRAIN_UTILS,
    # dataset features -> policy features (what make_policy does with a dataset's metadata)
    "dataset_to_policy_features": "lerobot.utils.feature_utils" if LEROBOT_06 else "lerobot.datasets.utils",
    # what `--dataset.image_transforms.*` builds for the training dataset
    "ImageTransforms": "lerobot.transforms.transforms" if LEROBOT_06 else "lerobot.datasets.transforms",
}


def __getattr__(name: str):
    if name in _MOVED:
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _VideoBackendReport(logging.Filter):
    """Replaces LeRobot's report of a torchcodec that cannot load with one line, and drops its repeats."""

    FALLBACK = "'torchcodec' is installed but cannot be loaded"
    NOTICE = "torchcodec cannot load FFmpeg's shared libraries (4 to 8) here; LeRobot decodes videos with pyav instead"

    def __init__(self) -> None:
        super().__init__()
        self.said = False

    def filter(self, record: logging.LogRecord) -> bool:
        if self.FALLBACK not in str(record.msg):
            return True
        if self.said:
            return False
        self.said = True
        record.msg, record.args, record.exc_info = self.NOTICE, (), None
        record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
        return True


def quiet_video_backend_report() -> None:
    """Install `_VideoBackendReport` on the logger of LeRobot's decoder choice (idempotent)."""
    chooser = logging.getLogger("lerobot.utils.import_utils")
    if not any(isinstance(f, _VideoBackendReport) for f in chooser.filters):
        chooser.addFilter(_VideoBackendReport())


def supported() -> bool:
    low, high = SUPPORTED_LEROBOT
    return low <= LEROBOT_VERSION < high


__all__ = [
    "DEPLOY_COMMAND",
    "HAS_LEROBOT_ROLLOUT",
    "ImageTransforms",
    "LEROBOT_06",
    "LEROBOT_VERSION",
    "dataset_to_policy_features",
    "SAVED_LAYOUT",
    "SUPPORTED_LEROBOT",
    "load_training_state",
    "quiet_video_backend_report",
    "save_training_state",
    "supported",
]
