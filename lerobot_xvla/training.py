"""The paper's training recipe (reference: 2toinf/X-VLA@6bc2513 train.py, peft_train.py, datasets/).

* Four parameter groups: the VLM and the soft prompts at `lr * learning_coef`, the per-domain action heads
  and the transformer core (`vlm_proj` included) at `lr`.
* Two-stage adaptation: for `freeze_steps` steps only the soft prompts and the action heads move (the VLM
  and the core have learning rate 0), then the VLM and the core warm up linearly over `warmup_steps`, then
  every group stays constant or decays with a cosine to `min_lr_ratio` of its base rate.
* Time anchors: targets resampled to `chunk_size` points over a horizon in seconds instead of consecutive
  frames, with the proprio taken as the trajectory's first point.

The schedule is a LeRobot `LRSchedulerConfig` ("xvla_two_stage"), so lerobot-train builds, saves and
resumes it like any other; the per-group factors are pure functions of the step.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from lerobot.optim.schedulers import LRSchedulerConfig
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

logger = logging.getLogger(__name__)

# Groups that train from the first step (the "prompt warm-up"), and groups frozen until `freeze_steps`.
EARLY_GROUPS = ("soft_prompts", "action_heads")
LATE_GROUPS = ("vlm", "transformer_core")
ACTION_HEADS = ("transformer.action_encoder", "transformer.action_decoder")
SOFT_PROMPTS = "transformer.soft_prompt_hub"


def group_of(name: str) -> str:
    """Parameter group of a parameter named relative to `XVLAModel` (LoRA and PEFT wrappers included)."""
    if name.startswith("vlm."):
        return "vlm"
    if SOFT_PROMPTS in name:
        return "soft_prompts"
    if any(head in name for head in ACTION_HEADS):
        return "action_heads"
    return "transformer_core"


def parameter_groups(
    named_parameters: Iterable[tuple[str, nn.Parameter]], lr: float, learning_coef: float, soft_prompt_lr_scale: float
) -> list[dict]:
    """AdamW parameter groups of the original recipe; frozen parameters and empty groups are left out.

    The action heads come first: lerobot-train logs the rate of the first group, and theirs is the base
    rate at every step (the VLM and the core are at 0 during the freeze phase).
    """
    scale = {
        "action_heads": 1.0,
        "transformer_core": 1.0,
        "soft_prompts": learning_coef * soft_prompt_lr_scale,
        "vlm": learning_coef,
    }
    groups: dict[str, list[nn.Parameter]] = {name: [] for name in scale}
    for name, param in named_parameters:
        if param.requires_grad:
            groups[group_of(name)].append(param)
    return [{"name": n, "params": p, "lr": lr * scale[n]} for n, p in groups.items() if p]


@LRSchedulerConfig.register_subclass("xvla_two_stage")
@dataclass
class TwoStageSchedulerConfig(LRSchedulerConfig):
    """Freeze phase, then warm-up of the VLM and the core, then constant or cosine decay (see module docstring).

    Factors per step s, relative to each group's base rate, with F = freeze_steps, W = num_warmup_steps:
      soft prompts, action heads: 1 until F + W, then the decay;
      VLM, transformer core:      0 before F, (s - F + 1) / W during the warm-up, then the decay;
      decay: 1 ("constant"), or a cosine from 1 to min_lr_ratio over num_decay_steps ("cosine").
    """

    num_warmup_steps: int = 2000
    freeze_steps: int = 1000
    decay: str = "constant"
    num_decay_steps: int = 30_000
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        if self.decay not in ("constant", "cosine"):
            raise ValueError(f"scheduler decay must be 'constant' or 'cosine', got {self.decay!r}")
        if min(self.freeze_steps, self.num_warmup_steps, self.num_decay_steps) < 0:
            raise ValueError("freeze_steps, num_warmup_steps and num_decay_steps must be >= 0")

    def decay_factor(self, step: int, decay_steps: int) -> float:
        if self.decay == "constant":
            return 1.0
        progress = min(1.0, max(0, step - self.freeze_steps - self.num_warmup_steps) / max(1, decay_steps))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def factor(self, group: str, step: int, decay_steps: int | None = None) -> float:
        """Learning-rate factor of `group` at `step`."""
        decay_steps = self.num_decay_steps if decay_steps is None else decay_steps
        if group in LATE_GROUPS:
            if step < self.freeze_steps:
                return 0.0
            if step < self.freeze_steps + self.num_warmup_steps:
                return (step - self.freeze_steps + 1) / self.num_warmup_steps
        elif group not in EARLY_GROUPS:
            raise ValueError(f"the xvla_two_stage schedule does not know parameter group {group!r}")
        return self.decay_factor(step, decay_steps)

    def build(self, optimizer: Optimizer, num_training_steps: int) -> LambdaLR:
        names = [group.get("name") for group in optimizer.param_groups]
        decay_steps = self.num_decay_steps
        remaining = num_training_steps - self.freeze_steps - self.num_warmup_steps
        if self.decay == "cosine" and 0 < remaining < decay_steps:
            logger.info("cosine decay shortened to the %d steps left after freeze and warm-up", remaining)
            decay_steps = remaining
        if self.freeze_steps:
            logger.info(
                "X-VLA two-stage schedule: steps 0-%d train only the soft prompts and the action heads",
                self.freeze_steps - 1,
            )
        return LambdaLR(optimizer, [lambda step, n=n: self.factor(n, step, decay_steps) for n in names])


def resample_anchors(trajectory: torch.Tensor, valid: torch.Tensor | None, horizon: float | torch.Tensor, points: int) -> torch.Tensor:
    """Resample consecutive frames to `points` evenly spaced anchors over `horizon` frames (linear interpolation).

    trajectory [B, T, D] with T > horizon frames from the current one; horizon one number or one per sample [B]
    (a mixture's sources at their own fps); valid [B, T] marks real frames (None: all). As in the original data pipeline, a window that runs past the end of the episode is shrunk to the
    frames left, so the anchors are compressed rather than padded. Returns [B, points, D].
    """
    batch, frames, width = trajectory.shape
    if valid is None:
        available = trajectory.new_full((batch,), frames - 1.0)
    else:
        available = (valid.sum(dim=1) - 1).clamp_min(0).to(trajectory.dtype)
    span = torch.minimum(available, torch.as_tensor(horizon, dtype=trajectory.dtype, device=trajectory.device))  # [B] frames covered
    times = torch.linspace(0, 1, points, dtype=trajectory.dtype, device=trajectory.device)[None] * span[:, None]
    low = times.floor().long().clamp(max=frames - 1)
    high = (low + 1).clamp(max=frames - 1)
    weight = (times - low.to(times.dtype)).unsqueeze(-1)
    before = torch.gather(trajectory, 1, low.unsqueeze(-1).expand(-1, -1, width))
    after = torch.gather(trajectory, 1, high.unsqueeze(-1).expand(-1, -1, width))
    return before * (1 - weight) + after * weight
