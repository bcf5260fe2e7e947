"""Executing action chunks smoothly: what `XVLAPolicy.select_action` does between two predictions.

A chunk of `chunk_size` actions is predicted, its first `n_action_steps` are executed, then the next chunk
is predicted from the new observation. Executed plainly, the arm jumps at every chunk boundary when two
chunks disagree (lerobot#2942). Options, all in the config:

* `rtc_guidance` (real-time chunking adapted to X-VLA): while the next chunk is denoised, its first actions
  are steered towards the previous chunk's actions that were predicted for the same time steps and not
  executed yet. X-VLA predicts the clean chunk at every step, so the guidance is inpainting of that
  estimate with RTC's soft prefix weights (1 for actions executed during the inference delay, then an
  exponential decay over the overlap) instead of RTC's velocity correction.
* `chunk_blend_steps`: the first actions of a new chunk are cross-faded with the previous chunk's
  overlapping actions (temporal ensembling at the boundary).
* time anchors (`anchor_horizon_s`, or a mixture domain's): a chunk holds anchors spaced horizon / chunk_size
  seconds apart; they are interpolated to the control rate (`anchor_fps`, or the domain's dataset fps), starting
  from the last commanded action.
* `use_predicted_proprio`: after the first chunk the proprio is the last commanded action instead of the
  measured state (the original LIBERO client's open-loop mode).
"""

from __future__ import annotations

from collections import deque

import torch
import torch.nn.functional as F  # noqa: N812
from lerobot.configs.types import RTCAttentionSchedule
from lerobot.policies.rtc.configuration_rtc import RTCConfig
from lerobot.policies.rtc.modeling_rtc import RTCProcessor
from torch import Tensor

from .configuration_xvla import XVLAConfig

_RTC_WEIGHTS = RTCProcessor(RTCConfig(prefix_attention_schedule=RTCAttentionSchedule.EXP))


def guidance_weights(overlap: int, horizon: int, inference_delay: int = 0, rtc: RTCProcessor = _RTC_WEIGHTS) -> Tensor:
    """RTC's soft prefix weights over a chunk of `horizon` steps whose first `overlap` are known [horizon]:
    1 for the `inference_delay` steps executed while the chunk is computed, then the schedule of `rtc`'s
    config (exponential decay by default) down to 0 at `overlap`."""
    return rtc.get_prefix_weights(inference_delay, overlap, horizon)


def check_rtc_leftover(leftover: Tensor, inference_delay: int | None, width: int, horizon: int, batch_size: int) -> None:
    """Refuse, by name, an RTC leftover [T, width] / [B or 1, T, width] or inference_delay this policy cannot use:
    padded or cropped, a leftover of another width would guide the wrong channels."""
    if not isinstance(leftover, Tensor) or leftover.ndim not in (2, 3):
        shape = tuple(leftover.shape) if isinstance(leftover, Tensor) else type(leftover).__name__
        raise ValueError(f"prev_chunk_left_over must be a tensor [T, {width}] or [B, T, {width}], got {shape}")
    if leftover.shape[-1] != width:
        raise ValueError(f"prev_chunk_left_over has {leftover.shape[-1]} values per action; this policy's chunks have {width}")
    if leftover.ndim == 3 and leftover.shape[0] not in (1, batch_size):
        raise ValueError(f"prev_chunk_left_over has a batch of {leftover.shape[0]} for observations of batch {batch_size}")
    if leftover.device.type == "cpu" and not bool(torch.isfinite(leftover).all()):
        raise ValueError("prev_chunk_left_over holds NaN or inf")
    if inference_delay is not None and (isinstance(inference_delay, bool) or not isinstance(inference_delay, int) or not 0 <= inference_delay <= horizon):
        raise ValueError(f"inference_delay must be a whole number of steps in 0..{horizon} (chunk_size), got {inference_delay!r}")


def lerobot_rtc_guidance(
    prev_chunk_left_over: Tensor, inference_delay: int, horizon: int, rtc_config: RTCConfig | None
) -> tuple[Tensor, Tensor]:
    """LeRobot's RTC interface (`predict_action_chunk(..., inference_delay=, prev_chunk_left_over=)`, used by
    `lerobot-rollout --inference.type=rtc`) as X-VLA guidance: (target [B, horizon, D], weights [horizon]).

    prev_chunk_left_over [T, D] or [B, T, D] holds the previous chunk's actions not executed yet, in model
    units. As in LeRobot's RTCProcessor, the first min(execution_horizon, T) steps are guided, with the
    config's prefix schedule; `max_guidance_weight` has no counterpart (the clean estimate is inpainted).
    """
    rtc = RTCProcessor(rtc_config or RTCConfig(prefix_attention_schedule=RTCAttentionSchedule.EXP))
    prev = prev_chunk_left_over if prev_chunk_left_over.ndim == 3 else prev_chunk_left_over.unsqueeze(0)
    overlap = min(rtc.rtc_config.execution_horizon, prev.shape[1], horizon)
    target = F.pad(prev[:, :overlap], (0, 0, 0, horizon - overlap))
    return target, guidance_weights(overlap, horizon, inference_delay, rtc).to(prev.device)


def interpolate(start: Tensor, points: Tensor, step: float, times: Tensor) -> Tensor:
    """Piecewise-linear trajectory through start [B, D] at t=0 and points [B, N, D] at t=step*(1..N),
    sampled at `times` [M] (clamped to the last point) -> [B, M, D]."""
    knots = torch.cat([start.unsqueeze(1), points], dim=1)
    position = (times / step).clamp(max=points.shape[1])
    low = position.floor().long().clamp(max=points.shape[1] - 1)
    weight = (position - low).to(points.dtype)[None, :, None]
    return knots[:, low] * (1 - weight) + knots[:, low + 1] * weight


class ChunkExecutor:
    """The action queue of one episode, with the smoothing options of `XVLAConfig`."""

    def __init__(self, config: XVLAConfig) -> None:
        self.config = config
        self.queue: deque[Tensor] = deque()
        self.leftover: Tensor | None = None  # predicted, not executed: [B, T', D] at the control rate
        self.last_action: Tensor | None = None  # [B, D], the last action handed out

    @property
    def needs_chunk(self) -> bool:
        return not self.queue

    def guidance(self, horizon: int) -> tuple[Tensor, Tensor] | None:
        """(previous actions [B, horizon, D], weights [horizon]) for the next chunk, when RTC guidance is on.

        With time anchors the leftover is at the control rate while the chunk holds anchors, so anchors
        skip the guidance (their time base differs)."""
        if not self.config.rtc_guidance or self.leftover is None or self.config.time_anchors is not None:
            return None
        overlap = min(self.leftover.shape[1], horizon)
        target = F.pad(self.leftover[:, :overlap], (0, 0, 0, horizon - overlap))  # [B, horizon, D], zeros past the overlap
        return target, guidance_weights(overlap, horizon).to(self.leftover.device)

    def add_chunk(self, chunk: Tensor) -> None:
        """Queue the first n_action_steps of a predicted chunk [B, T, D] (after interpolation and blending)."""
        cfg = self.config
        if cfg.time_anchors is not None:
            horizon_s, fps = cfg.time_anchors
            start = self.last_action if self.last_action is not None else chunk[:, 0]
            step = horizon_s / cfg.chunk_size
            times = torch.arange(1, cfg.executable_steps + 1, dtype=chunk.dtype, device=chunk.device) / fps
            chunk = interpolate(start, chunk, step, times)
        if cfg.chunk_blend_steps and self.leftover is not None:
            blend = min(cfg.chunk_blend_steps, self.leftover.shape[1], chunk.shape[1])
            weight = torch.arange(1, blend + 1, dtype=chunk.dtype, device=chunk.device) / (blend + 1)
            chunk = chunk.clone()
            chunk[:, :blend] = weight[None, :, None] * chunk[:, :blend] + (1 - weight[None, :, None]) * self.leftover[:, :blend]
        executed = min(cfg.n_action_steps, chunk.shape[1])
        self.queue.extend(chunk[:, :executed].transpose(0, 1))  # [B, T, D] -> T x [B, D]
        self.leftover = chunk[:, executed:] if executed < chunk.shape[1] else None

    def next_action(self) -> Tensor:
        self.last_action = self.queue.popleft()
        return self.last_action
