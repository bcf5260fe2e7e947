"""Action modes: how X-VLA's output vector maps onto a robot, and how it is trained.

An action mode fixes four things that must agree with each other:

* `dim_action`, the width of the vector the network denoises (20 for the pretrained checkpoints);
* which dataset action widths fit it (`check_action_dim` says what would fit otherwise);
* the training loss over those channels, with the original loss weights;
* the input masking (`masked_channels`, zeroed in the proprio and the noisy action) and the decoding of the
  network output into robot units (`decode`: sigmoid on channels trained as logits, trim to the robot width).

A gripper trained with BCE on logits is decoded with a sigmoid; a gripper trained with MSE is not.

Register your own mode with `@register_action_mode("name")` on an `ActionMode` subclass; it is then
available as `--policy.action_mode=name`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from lerobot.configs.types import NormalizationMode

ACTION_MODES: dict[str, type[ActionMode]] = {}

Channels = Sequence[int]


def register_action_mode(name: str):
    """Class decorator adding an `ActionMode` subclass to the registry under `name`."""

    def wrap(cls: type[ActionMode]) -> type[ActionMode]:
        key = name.lower()
        if key in ACTION_MODES:
            raise ValueError(f"action mode '{key}' is already registered by {ACTION_MODES[key].__name__}")
        cls.name = key
        ACTION_MODES[key] = cls
        return cls

    return wrap


def get_action_mode_class(name: str) -> type[ActionMode]:
    try:
        return ACTION_MODES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown action_mode '{name}'; registered modes: {sorted(ACTION_MODES)}") from None


def build_action_mode(name: str, action_dim: int | None, max_action_dim: int) -> ActionMode:
    """Instantiate a mode for a dataset whose action vectors have `action_dim` values (None: the mode's default)."""
    return get_action_mode_class(name)(action_dim=action_dim, max_action_dim=max_action_dim)


def check_action_dim(mode: str, action_dim: int, max_action_dim: int) -> None:
    """Raise if actions of width `action_dim` do not fit `mode`, naming the modes that would."""
    problem = get_action_mode_class(mode).fits(action_dim, max_action_dim)
    if problem:
        others = sorted(n for n, c in ACTION_MODES.items() if c.fits(action_dim, max_action_dim) is None)
        hint = f"; modes that accept width {action_dim}: {others}" if others else ""
        raise ValueError(f"action dimension {action_dim} does not fit: {problem}{hint}")


def masked_mean(values: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Mean of values [B, T, C] over the steps where valid [B, T] is True (all of them when valid is None)."""
    if valid is None:
        return values.mean()
    weights = valid.unsqueeze(-1).to(values.dtype)
    return (values * weights).sum() / (weights.sum() * values.shape[-1]).clamp_min(1.0)


def mse(pred: torch.Tensor, target: torch.Tensor, channels: Channels, valid: torch.Tensor | None) -> torch.Tensor:
    idx = list(channels)
    return masked_mean((pred[..., idx] - target[..., idx]).square(), valid)


def bce(pred: torch.Tensor, target: torch.Tensor, channel: int, valid: torch.Tensor | None) -> torch.Tensor:
    loss = F.binary_cross_entropy_with_logits(pred[..., channel], target[..., channel], reduction="none")
    return masked_mean(loss.unsqueeze(-1), valid)


class ActionMode:
    """Base class. Subclasses set the class attributes and implement `loss`."""

    name: str = ""
    #: width of the vector the network denoises
    dim_action: int = 20
    #: dataset action widths this mode accepts; empty means any width up to `dim_action`
    accepted_dims: tuple[int, ...] = ()
    #: channels zeroed in the proprio and in the noisy action before the network sees them
    masked_channels: tuple[int, ...] = ()
    #: channels the network predicts as logits (decoded with a sigmoid)
    logit_channels: tuple[int, ...] = ()
    #: normalisation of state and action that fits the loss (ee6d checkpoints were trained on raw values)
    default_normalization: NormalizationMode = NormalizationMode.IDENTITY
    #: robot joints converted to and from the model vector by kinematics in the processors (`robots/`): the
    #: dataset's state and actions are joints, the network's are end-effector poses
    joint_space_robot: bool = False

    def __init__(self, action_dim: int | None, max_action_dim: int) -> None:
        # Without a dataset, the widest robot action the mode takes (the whole model vector where any width fits).
        self.action_dim = max(self.accepted_dims, default=self.dim_action) if action_dim is None else action_dim
        check_action_dim(self.name, self.action_dim, max_action_dim)

    @classmethod
    def fits(cls, action_dim: int, max_action_dim: int) -> str | None:
        """None if dataset actions of width `action_dim` fit this mode, else what the mode expects."""
        if cls.accepted_dims and action_dim not in cls.accepted_dims:
            return f"action_mode '{cls.name}' expects actions of width {' or '.join(map(str, cls.accepted_dims))}"
        if not cls.accepted_dims and not 0 < action_dim <= cls.dim_action:
            return f"action_mode '{cls.name}' expects actions of width 1..{cls.dim_action}"
        return None

    def mask_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """Zero `masked_channels` of a proprio [B, P] or noisy action [B, T, A] (channels beyond the width are skipped)."""
        channels = [c for c in self.masked_channels if c < x.shape[-1]]
        if not channels:
            return x
        keep = torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
        keep[channels] = 0
        return x * keep

    @property
    def chunk_width(self) -> int:
        """Width of the chunks `decode` returns (what predict_action_chunk gives, and LeRobot's RTC hands back)."""
        return self.action_dim

    def decode(self, pred: torch.Tensor) -> torch.Tensor:
        """Network output [B, T, dim_action] -> actions in dataset units [B, T, chunk_width]."""
        if self.logit_channels:
            idx = list(self.logit_channels)
            pred = pred.clone()
            pred[..., idx] = torch.sigmoid(pred[..., idx])
        return pred[..., : self.chunk_width]

    def loss(self, pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """pred, target [B, T, dim_action]; valid [B, T] or None -> named, already weighted loss terms."""
        raise NotImplementedError


class _EndEffector6D(ActionMode):
    """Two arms x [xyz (3), 6D rotation (6), gripper (1)]; single-arm data leaves the second arm zero."""

    dim_action = 20
    accepted_dims = (20, 10)
    POSITION = ((0, 1, 2), (10, 11, 12))
    ROTATION = ((3, 4, 5, 6, 7, 8), (13, 14, 15, 16, 17, 18))
    GRIPPERS = (9, 19)
    POSITION_WEIGHT = 500.0
    ROTATION_WEIGHT = 10.0

    def pose_losses(self, pred, target, valid) -> dict[str, torch.Tensor]:
        return {
            "position_loss": sum(mse(pred, target, arm, valid) for arm in self.POSITION) * self.POSITION_WEIGHT,
            "rotate6D_loss": sum(mse(pred, target, arm, valid) for arm in self.ROTATION) * self.ROTATION_WEIGHT,
        }


@register_action_mode("ee6d")
class EE6DActionMode(_EndEffector6D):
    """Absolute end-effector poses, grippers as binary (1 = closed) logits trained with BCE."""

    masked_channels = _EndEffector6D.GRIPPERS
    logit_channels = _EndEffector6D.GRIPPERS

    def loss(self, pred, target, valid):
        gripper = sum(bce(pred, target, g, valid) for g in self.GRIPPERS) / len(self.GRIPPERS)
        return {**self.pose_losses(pred, target, valid), "gripper_loss": gripper}


@register_action_mode("so101_ee6d")
class SO101EE6DActionMode(EE6DActionMode):
    """SO101 arms in X-VLA's ee6d space: datasets and robots give joints (width 6 for one arm, 12 for
    `bi_so_follower`, left then right), the processors turn them into ee6d poses by forward kinematics and
    back by inverse kinematics (`robots/so101_steps.py`). Losses as `ee6d`; with one arm the second arm's
    channels are masked and carry no loss. `decode` returns the whole 20-D pose vector, for the IK step.
    """

    accepted_dims = (6, 12)
    joint_space_robot = True

    def __init__(self, action_dim: int | None, max_action_dim: int) -> None:
        super().__init__(action_dim, max_action_dim)
        self.arms = self.action_dim // 6  # five joints and a gripper per arm
        if self.arms == 1:
            self.masked_channels = (self.GRIPPERS[0], *range(10, 20))
            self.logit_channels = self.GRIPPERS[:1]
            self.POSITION, self.ROTATION, self.GRIPPERS = self.POSITION[:1], self.ROTATION[:1], self.GRIPPERS[:1]

    @property
    def chunk_width(self) -> int:
        return self.dim_action

    def decode(self, pred: torch.Tensor) -> torch.Tensor:
        pred = pred.clone()
        pred[..., list(self.GRIPPERS)] = torch.sigmoid(pred[..., list(self.GRIPPERS)])
        return pred


@register_action_mode("agibot_ee6d")
class AgibotEE6DActionMode(_EndEffector6D):
    """The ee6d layout with continuous grippers trained by MSE (x10); nothing masked, nothing squashed."""

    accepted_dims = (20,)

    def loss(self, pred, target, valid):
        gripper = mse(pred, target, self.GRIPPERS, valid) * 10.0
        return {**self.pose_losses(pred, target, valid), "gripper_loss": gripper}


@register_action_mode("joint")
class JointActionMode(ActionMode):
    """Two arms x [6 joints, gripper]; grippers as BCE logits (x0.1)."""

    dim_action = 14
    accepted_dims = (14,)
    masked_channels = (6, 13)
    logit_channels = (6, 13)

    def loss(self, pred, target, valid):
        joints = [c for c in range(self.dim_action) if c not in self.masked_channels]
        gripper = sum(bce(pred, target, g, valid) for g in self.masked_channels) / len(self.masked_channels)
        return {"joints_loss": mse(pred, target, joints, valid), "gripper_loss": gripper * 0.1}


class _PaddedJointMode(ActionMode):
    """Joint-space robots padded into the 20-D model vector; the loss covers the real channels only."""

    dim_action = 20
    default_normalization = NormalizationMode.MEAN_STD

    def loss(self, pred, target, valid):
        return {"joints_loss": mse(pred, target, range(self.action_dim), valid)}


@register_action_mode("franka_joint7")
class FrankaJoint7ActionMode(_PaddedJointMode):
    """Franka Panda: 7 joint positions."""

    accepted_dims = (7,)


@register_action_mode("auto")
class AutoActionMode(_PaddedJointMode):
    """Any action width up to `max_action_dim`, MSE on the real channels."""

    def __init__(self, action_dim: int | None, max_action_dim: int) -> None:
        self.dim_action = max_action_dim
        super().__init__(action_dim, max_action_dim)

    @classmethod
    def fits(cls, action_dim: int, max_action_dim: int) -> str | None:
        if 0 < action_dim <= max_action_dim:
            return None
        return f"action_mode 'auto' expects actions of width 1..max_action_dim={max_action_dim}"


@register_action_mode("so101_bimanual")
class BimanualSO101ActionMode(_PaddedJointMode):
    """Two SO101 arms: [shoulder_pan, shoulder_lift, elbow_flex, wrist_flex, wrist_roll, gripper] x 2.

    Grippers are continuous positions, trained with MSE and decoded as they are (no sigmoid), and their
    state stays visible to the network. Each joint is counted once in the loss.
    """

    accepted_dims = (12,)
    GRIPPERS = (5, 11)

    def loss(self, pred, target, valid):
        joints = [c for c in range(12) if c not in self.GRIPPERS]
        return {
            "joints_loss": mse(pred, target, joints, valid),
            "gripper_loss": mse(pred, target, self.GRIPPERS, valid),
        }
