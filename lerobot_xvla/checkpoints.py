"""X-VLA checkpoint layouts: detection, conversion and strict loading.

Three layouts of the same weights exist:

* `lerobot-0.4`: LeRobot 0.4.x's built-in X-VLA (vendored remote-code Florence-2 key names, `model.` prefix).
  This is what `lerobot/xvla-*` on the Hub holds.
* `lerobot-0.6`: LeRobot >= 0.6 (transformers' native `Florence2Model` key names). Our modules use it.

We load all three and write the one the installed LeRobot's built-in X-VLA writes (`compat.SAVED_LAYOUT`).
* `original`: the `2toINF/X-VLA-*` repositories (vendored key names without the `model.` prefix, and an
  original `config.json` with `num_actions`, `florence_config`, ...).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.constants import CONFIG_NAME
from lerobot.configs.types import FeatureType, PolicyFeature
from lerobot.utils.constants import ACTION, OBS_STATE
from torch import nn

from .action_modes import build_action_mode
from .compat import SAVED_LAYOUT
from .florence import ORIGINAL_XVLA, REMOTE_CODE, TRANSFORMERS, complete_florence_config

logger = logging.getLogger(__name__)

VENDORED, NATIVE, ORIGINAL = "lerobot-0.4", "lerobot-0.6", "original"

# (vendored, native) fragments of Florence-2 key names. `{n}` stands for a block index. Each key needs
# one rule at most and the first match wins, so the more specific rules come first.
_FLORENCE_RENAMES: list[tuple[str, str]] = [
    ("vlm.image_projection", "vlm.multi_modal_projector.image_projection.weight"),
    ("vlm.image_proj_norm.", "vlm.multi_modal_projector.image_proj_norm."),
    ("vlm.image_pos_embed.", "vlm.multi_modal_projector.image_position_embed."),
    ("vlm.visual_temporal_embed.", "vlm.multi_modal_projector.visual_temporal_embed."),
    ("vlm.language_model.model.", "vlm.language_model."),
    ("vision_tower.convs.{n}.proj.", "vision_tower.convs.{n}.conv."),
    ("_block.conv1.fn.dw.", "_block.conv1."),
    ("_block.conv2.fn.dw.", "_block.conv2."),
    ("spatial_block.window_attn.norm.", "spatial_block.norm1."),
    ("channel_block.channel_attn.norm.", "channel_block.norm1."),
    ("_block.ffn.norm.", "_block.norm2."),
    ("window_attn.fn.", "window_attn."),
    ("channel_attn.fn.", "channel_attn."),
    ("_block.ffn.fn.net.", "_block.ffn."),
]
# The vendored projection is an `x @ P` parameter; the native one is an nn.Linear weight (P transposed).
_PROJECTION = {VENDORED: "model.vlm.image_projection", NATIVE: "model.vlm.multi_modal_projector.image_projection.weight"}
# Buffer the vendored text model carries and never uses in the encoder.
_FINAL_LOGITS_BIAS = "model.vlm.language_model.final_logits_bias"
_TIED = ("model.vlm.language_model.shared.weight", "model.vlm.language_model.encoder.embed_tokens.weight")
# Florence-2 parts that X-VLA deletes; a full Florence-2 state dict may still carry them.
_UNUSED_FLORENCE = re.compile(r"^model\.vlm\.language_model\.(model\.)?decoder\.|^model\.vlm\.language_model\.lm_head\.")


def _compile(pattern: str, replacement: str) -> tuple[re.Pattern, str]:
    return re.compile(re.escape(pattern).replace(r"\{n\}", r"(\d+)")), replacement.replace("{n}", r"\1")


_TO_NATIVE = [_compile(v, n) for v, n in _FLORENCE_RENAMES]
_TO_VENDORED = [_compile(n, v) for v, n in _FLORENCE_RENAMES]


def _rename(key: str, rules: list[tuple[re.Pattern, str]]) -> str:
    for pattern, replacement in rules:
        renamed, count = pattern.subn(replacement, key, count=1)
        if count:
            return renamed
    return key


class CheckpointMismatchError(ValueError):
    """The checkpoint's keys or shapes do not match the model built from the config."""


def detect_layout(keys: Iterable[str]) -> str:
    keys = list(keys)
    if not any(k.startswith("model.") for k in keys):
        if any(k.startswith(("vlm.", "transformer.")) for k in keys):
            return ORIGINAL
        raise CheckpointMismatchError(f"not an X-VLA state dict: first keys {keys[:5]}")
    if any(k.startswith("model.vlm.multi_modal_projector.") for k in keys):
        return NATIVE
    return VENDORED


def to_native(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any X-VLA layout -> the layout of `XVLAPolicy.state_dict()`."""
    layout = detect_layout(state_dict)
    if layout == ORIGINAL:
        state_dict = {f"model.{k}": v for k, v in state_dict.items()}
    converted: dict[str, torch.Tensor] = {}
    unused = 0
    for key, value in state_dict.items():
        if key == _FINAL_LOGITS_BIAS:
            continue
        if _UNUSED_FLORENCE.match(key):
            unused += 1
            continue
        if layout != NATIVE:
            if key == _PROJECTION[VENDORED]:
                value = value.t()
            key = _rename(key, _TO_NATIVE)
        converted[key] = value
    if unused:
        logger.info("ignored %d Florence-2 decoder / LM-head tensors: X-VLA uses the encoder only", unused)
    for name, alias in (_TIED, _TIED[::-1]):  # the tied text embedding may be stored under either name
        if name in converted and alias not in converted:
            converted[alias] = converted[name]
    return converted


def to_saved_layout(state_dict: Mapping[str, torch.Tensor], vocab_size: int) -> dict[str, torch.Tensor]:
    """Our layout -> the installed LeRobot's (`SAVED_LAYOUT`), ready for safetensors."""
    if SAVED_LAYOUT == VENDORED:
        return to_vendored(state_dict, vocab_size)
    # The tied text embedding is stored once, as the encoder's (LeRobot's loaders restore the alias).
    return {k: v.contiguous() for k, v in state_dict.items() if k != _TIED[0]}


def to_vendored(state_dict: Mapping[str, torch.Tensor], vocab_size: int) -> dict[str, torch.Tensor]:
    """Our layout -> LeRobot 0.4.x's, which every LeRobot X-VLA loads (ready for safetensors)."""
    converted = {}
    for key, value in state_dict.items():
        if key == _TIED[0]:
            continue  # stored once, as the encoder's embedding (what LeRobot's loader copies back)
        if key == _PROJECTION[NATIVE]:
            value = value.t()
        converted[_rename(key, _TO_VENDORED)] = value.contiguous()
    reference = next(iter(state_dict.values()))
    converted[_FINAL_LOGITS_BIAS] = torch.zeros(1, vocab_size, dtype=reference.dtype)
    return converted


def _describe(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _dtype_kind(tensor: torch.Tensor) -> str:
    if tensor.dtype == torch.bool:
        return "bool"
    if tensor.is_floating_point():
        return "float"
    return "complex" if tensor.is_complex() else "integer"


def _check_dtype_kinds(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    """Loading casts each tensor to the model's dtype: fine between float precisions, but an integer or boolean
    tensor where the model holds floats (or the reverse) would load truncated or rounded values."""
    wrong = [
        f"{k}: checkpoint {state[k].dtype} vs model {v.dtype}"
        for k, v in expected.items()
        if k in state and _dtype_kind(state[k]) != _dtype_kind(v)
    ]
    if wrong:
        raise CheckpointMismatchError(
            "the checkpoint stores tensors of another kind than the model's (a damaged or foreign file): "
            + _describe(wrong)
        )


def _check_finite(state: Mapping[str, torch.Tensor], keys: Iterable[str]) -> None:
    """Refuse NaN or infinite weights, which would only show as non-finite actions. One sum per tensor (about half
    a second for X-VLA-0.9B on two CPU cores); `isfinite` confirms the tensors whose sum is not finite."""
    suspects = [k for k in keys if state[k].is_floating_point() and not bool(state[k].sum().isfinite())]
    bad = [k for k in suspects if not bool(torch.isfinite(state[k]).all())]
    if bad:
        raise CheckpointMismatchError(f"the checkpoint holds NaN or infinite values in {_describe(bad)}")


def load_state_dict_strict(
    module: nn.Module, state_dict: Mapping[str, torch.Tensor], reinit: Iterable[str] = ()
) -> None:
    """Load `state_dict` (any layout) into a policy, refusing missing, unexpected or mis-shaped keys, tensors
    of another kind than the model's (integers for floats, ...) and NaN or infinite values.

    `reinit` lists parameter-name prefixes (relative to `model.`) allowed to differ: those keep the module's
    fresh initialisation, except per-domain tables that only grew along the domain dimension, which keep
    the checkpoint's rows. Each prefix must name part of the model, and together they must leave some of it to
    load; what they re-initialise is logged at WARNING with its parameter count.
    """
    reinit = list(reinit)
    allowed = _check_reinit(module, reinit)
    state = to_native(state_dict)
    expected = module.state_dict()
    missing = [k for k in expected if k not in state and not k.startswith(allowed)]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape and not k.startswith(allowed)
    ]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"missing keys: {_describe(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {_describe(unexpected)}")
        if mismatched:
            problems.append(f"shape mismatches: {_describe(mismatched)}")
        raise CheckpointMismatchError(
            "the checkpoint does not match the model built from the config; "
            + "; ".join(problems)
            + ". Check the architecture fields of the config (florence_config, hidden_size, depth, num_domains, "
            "max_state_dim, action_mode, ...), or list the parts to re-initialise in checkpoint_reinit."
        )
    _check_dtype_kinds(state, expected)
    _check_finite(state, [k for k in expected if k in state])
    to_load = {}
    parameters = dict(module.named_parameters())
    fresh = dict.fromkeys(reinit, 0)  # fresh parameters per checkpoint_reinit part (buffers are not learnt)
    for key, value in expected.items():
        loaded = state.get(key)
        if loaded is not None and loaded.shape == value.shape:
            to_load[key] = loaded
            continue
        if loaded is None:
            logger.info("re-initialised (not in checkpoint): %s", key)
            new = value.numel()
        elif loaded.shape[1:] == value.shape[1:] and loaded.ndim >= 1:
            rows = min(loaded.shape[0], value.shape[0])
            merged = value.detach().clone()
            merged[:rows] = loaded[:rows]
            to_load[key] = merged
            logger.info("kept %d of %d domain rows from the checkpoint: %s", rows, value.shape[0], key)
            new = value[rows:].numel()
        else:
            logger.info("re-initialised (shape %s -> %s): %s", tuple(loaded.shape), tuple(value.shape), key)
            new = value.numel()
        if key in parameters:
            fresh[next(part for part, prefix in zip(reinit, allowed) if key.startswith(prefix))] += new
    module.load_state_dict(to_load, strict=False)
    if reinit:
        logger.warning(
            "checkpoint_reinit: %s of the model's %s parameters keep their fresh initialisation (%s)",
            f"{sum(fresh.values()):,}",
            f"{sum(p.numel() for p in parameters.values()):,}",
            ", ".join(f"{part}: {count:,}" for part, count in fresh.items()),
        )


def _check_reinit(module: nn.Module, reinit: list[str]) -> tuple[str, ...]:
    """The `model.` prefixes of `reinit`; each must name some of the module's tensors, and together they must leave
    parameters to load (a checkpoint that loads nothing is a randomly initialised policy)."""
    prefixes = tuple(f"model.{part}" for part in reinit)
    names = [name for name, _ in module.named_parameters()]
    tensors = list(module.state_dict())
    for part, prefix in zip(reinit, prefixes):
        if not any(name.startswith(prefix) for name in tensors):
            parts = sorted({".".join(name.split(".")[1:3]) for name in names})
            raise CheckpointMismatchError(
                f"checkpoint_reinit names {part!r}, which is no part of this model; its parts: {', '.join(parts)}"
            )
    if prefixes and all(name.startswith(prefixes) for name in names):
        raise CheckpointMismatchError(
            f"checkpoint_reinit {reinit} covers every parameter of the model: nothing of the checkpoint would "
            "load, leaving a randomly initialised policy; name only the parts to re-initialise (e.g. "
            "transformer.action_decoder)"
        )
    return prefixes


# The config classes of the code that writes each layout, which filled in the florence fields it left out.
_WRITER_DEFAULTS = {VENDORED: REMOTE_CODE, NATIVE: TRANSFORMERS, ORIGINAL: ORIGINAL_XVLA}


def checkpoint_florence_config(
    florence_config: dict[str, Any], directory: str | Path, state_dict: Mapping[str, torch.Tensor]
) -> dict[str, Any]:
    """`florence_config` completed the way the code that wrote the checkpoint in `directory` read it; call it
    before building the policy that `state_dict` (the checkpoint's weights) will be loaded into.

    lerobot_xvla saves every florence field. A saved florence_config whose missing fields read differently
    with Microsoft's and transformers' defaults was written by LeRobot's built-in X-VLA, in the version the
    weights' layout tells: 0.4.x reads it with Microsoft's classes, as lerobot_xvla does; >= 0.6 with
    transformers' (Florence-2-base widths, 50 image position rows, BART's 50265-token vocabulary).
    """
    saved = json.loads((Path(directory) / CONFIG_NAME).read_text()).get("florence_config")
    if not saved or complete_florence_config(saved, REMOTE_CODE) == complete_florence_config(saved, TRANSFORMERS):
        return complete_florence_config(florence_config)
    defaults = _WRITER_DEFAULTS[detect_layout(state_dict)]
    logger.info("florence_config fields the checkpoint leaves out take the defaults of %s's classes", defaults)
    return complete_florence_config(florence_config, defaults)


# ----------------------------------------------------------------------------------------------------------
# The original 2toINF/X-VLA format
# ----------------------------------------------------------------------------------------------------------
# The original XVLAConfig's defaults (models/configuration_xvla.py), for the fields a config.json leaves out.
_ORIGINAL_DEFAULTS: dict[str, Any] = {
    "hidden_size": 1024, "depth": 24, "num_heads": 16, "mlp_ratio": 4.0, "num_domains": 30, "len_soft_prompts": 32,
    "dim_time": 32, "max_len_seq": 512, "use_hetero_proj": False, "max_action_dim": 20, "real_action_dim": 20,
    "num_actions": 30, "action_mode": "ee6d",
}  # fmt: skip
_SHARED_FIELDS = (
    "hidden_size", "depth", "num_heads", "mlp_ratio", "num_domains", "len_soft_prompts", "dim_time", "max_len_seq",
    "use_hetero_proj", "max_action_dim",
)  # fmt: skip
ORIGINAL_CAMERAS = ("observation.images.image0", "observation.images.image1", "observation.images.image2")


def is_original_config(config: Mapping[str, Any]) -> bool:
    """An original config.json has no LeRobot "type"; transformers writes its model_type, "xvla"."""
    return "type" not in config and (config.get("model_type") == "xvla" or "num_actions" in config)


def original_config_to_lerobot(config: Mapping[str, Any]) -> dict[str, Any]:
    """Map an original `config.json` onto `XVLAConfig` keyword arguments, features included; fields it leaves
    out take the original classes' defaults.

    The original feeds three views (`image0` is the primary one), conditions on a proprio as wide as the
    model action (20 for ee6d, `use_proprio` is never read) and tokenizes with the checkpoint's own BART
    tokenizer. Its action spaces are ee6d, joint, agibot_ee6d and auto; only `auto` reads `real_action_dim`
    (the robot's width, `max_action_dim` being the model's), the others return the whole model vector.
    """
    config = {**_ORIGINAL_DEFAULTS, **config}
    kwargs = {k: config[k] for k in _SHARED_FIELDS}
    kwargs["chunk_size"] = kwargs["n_action_steps"] = config["num_actions"]
    kwargs["action_mode"] = config["action_mode"].lower()
    florence = config.get("florence_config") or {}
    parts = {part: florence[part] for part in ("vision_config", "text_config") if part in florence}
    kwargs["florence_config"] = complete_florence_config(parts, ORIGINAL_XVLA)
    real_dim = config["real_action_dim"] if kwargs["action_mode"] == "auto" else None
    mode = build_action_mode(kwargs["action_mode"], real_dim, kwargs["max_action_dim"])
    kwargs["use_proprio"] = True
    kwargs["max_state_dim"] = mode.dim_action
    kwargs["input_features"] = {
        **{key: PolicyFeature(type=FeatureType.VISUAL, shape=(3, 224, 224)) for key in ORIGINAL_CAMERAS},
        OBS_STATE: PolicyFeature(type=FeatureType.STATE, shape=(mode.dim_action,)),
    }
    kwargs["output_features"] = {ACTION: PolicyFeature(type=FeatureType.ACTION, shape=(mode.action_dim,))}
    return kwargs
