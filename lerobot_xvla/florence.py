"""Florence-2 as X-VLA uses it: the DaViT vision tower, the multimodal projector and the BART encoder.

The network itself is `transformers.Florence2Model`; nothing here re-implements it. This module only
translates the `florence_config` dict that X-VLA checkpoints carry (Microsoft's remote-code format, which
LeRobot's built-in and the original code both write) into the native transformers config, builds the
model without its text decoder, and runs the encoder the way the original `forward_vlm` does.

A `florence_config` may leave fields out; they mean what the config classes of the code that wrote it default
them to, which differ (`complete_florence_config`): Microsoft's classes (LeRobot 0.4.x, the original) default
to Florence-2-large with a 1000-row image position table, transformers' (LeRobot >= 0.6) to Florence-2-base
widths, 50 rows and BART's vocabulary.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from transformers import BartConfig, Florence2Config, Florence2Model, Florence2VisionConfig

# Florence-2-large in the remote-code format of `config.json` files: the vision-language backbone of X-VLA-0.9B.
FLORENCE2_LARGE: dict[str, Any] = {
    "vision_config": {
        "model_type": "davit",
        "drop_path_rate": 0.1,
        "patch_size": [7, 3, 3, 3],
        "patch_stride": [4, 2, 2, 2],
        "patch_padding": [3, 1, 1, 1],
        "patch_prenorm": [False, True, True, True],
        "enable_checkpoint": False,
        "dim_embed": [256, 512, 1024, 2048],
        "num_heads": [8, 16, 32, 64],
        "num_groups": [8, 16, 32, 64],
        "depths": [1, 1, 9, 1],
        "window_size": 12,
        "projection_dim": 1024,
        "visual_temporal_embedding": {"type": "COSINE", "max_temporal_embeddings": 100},
        "image_pos_embed": {"type": "learned_abs_2d", "max_pos_embeddings": 50},
        "image_feature_source": ["spatial_avg_pool", "temporal_avg_pool"],
    },
    "text_config": {
        "model_type": "florence2_language",
        "vocab_size": 51289,
        "max_position_embeddings": 1024,
        "d_model": 1024,
        "encoder_layers": 12,
        "encoder_ffn_dim": 4096,
        "encoder_attention_heads": 16,
        "decoder_layers": 12,
        "decoder_ffn_dim": 4096,
        "decoder_attention_heads": 16,
        "activation_function": "gelu",
        "dropout": 0.1,
        "attention_dropout": 0.0,
        "activation_dropout": 0.0,
        "scale_embedding": False,
        "pad_token_id": 1,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "decoder_start_token_id": 2,
    },
    "vocab_size": 51289,
    "projection_dim": 1024,
}

_VISION_KEYS = (
    "in_channels", "depths", "patch_size", "patch_stride", "patch_padding", "patch_prenorm", "num_heads",
    "num_groups", "window_size", "drop_path_rate", "mlp_ratio", "qkv_bias", "activation_function",
    "projection_dim", "embed_dim", "max_position_embeddings", "max_temporal_embeddings",
)  # fmt: skip
# The architecture fields of a remote-code (Microsoft, X-VLA config.json) vision config.
_REMOTE_VISION_KEYS = (
    "depths", "dim_embed", "num_heads", "num_groups", "patch_size", "patch_stride", "patch_padding",
    "patch_prenorm", "window_size", "drop_path_rate", "projection_dim", "image_pos_embed",
    "visual_temporal_embedding", "image_feature_source",
)  # fmt: skip
_TEXT_KEYS = (
    "vocab_size", "max_position_embeddings", "d_model", "encoder_layers", "encoder_ffn_dim",
    "encoder_attention_heads", "encoder_layerdrop", "activation_function", "dropout", "attention_dropout",
    "activation_dropout", "init_std", "scale_embedding", "pad_token_id", "bos_token_id", "eos_token_id",
    "decoder_start_token_id",
)  # fmt: skip
_IMAGE_FEATURE_SOURCE = ["spatial_avg_pool", "temporal_avg_pool"]  # what X-VLA was trained with

# Whose defaults fill in the fields a `florence_config` leaves out: the config classes of the code that wrote it.
# Microsoft's remote-code Florence-2 classes, which LeRobot 0.4.x vendors (and lerobot_xvla follows):
REMOTE_CODE = "remote-code"
# the original X-VLA's copy of them, which leaves the two position tables without a default (a config without
# them cannot build its model):
ORIGINAL_XVLA = "original"
# transformers' Florence2VisionConfig and BartConfig, which LeRobot >= 0.6 translates every config into:
TRANSFORMERS = "transformers"
FLORENCE_DEFAULTS = (REMOTE_CODE, ORIGINAL_XVLA, TRANSFORMERS)

# Microsoft's Florence2VisionConfig defaults to Florence-2-large, except for a 1000-row image position table
# (the released Florence-2-large config sets 50).
_REMOTE_VISION_DEFAULTS = {
    **{k: FLORENCE2_LARGE["vision_config"][k] for k in _REMOTE_VISION_KEYS},
    "image_pos_embed": {"type": "learned_abs_2d", "max_pos_embeddings": 1000},
}
_ORIGINAL_REQUIRED = ("image_pos_embed", "visual_temporal_embedding")
# Microsoft's Florence2LanguageConfig is BART-large with Florence-2's vocabulary (BART's plus location tokens).
_FLORENCE_VOCAB_SIZE = 51289


def _is_native_vision(vision: dict[str, Any]) -> bool:
    """transformers' format (`embed_dim`, model_type "florence_vision") rather than the remote-code one; a config
    with the marks of neither is in the remote-code format, as every X-VLA config.json."""
    native = "embed_dim" in vision or vision.get("model_type") == "florence_vision"
    if native and ("dim_embed" in vision or vision.get("model_type") == "davit"):
        raise ValueError(
            "florence_config.vision_config mixes transformers' format ('embed_dim', model_type 'florence_vision') "
            "with the remote-code one ('dim_embed', model_type 'davit'); use one of them"
        )
    return native


def _remote_vision(native: dict[str, Any]) -> dict[str, Any]:
    """transformers Florence2VisionConfig values -> the same vision config in remote-code keys."""
    remote = {k: native[k] for k in _REMOTE_VISION_KEYS if k in native}
    remote["dim_embed"] = native["embed_dim"]
    remote["image_pos_embed"] = {"type": "learned_abs_2d", "max_pos_embeddings": native["max_position_embeddings"]}
    temporal = native["max_temporal_embeddings"]
    remote["visual_temporal_embedding"] = {"type": "COSINE", "max_temporal_embeddings": temporal}
    remote["image_feature_source"] = list(_IMAGE_FEATURE_SOURCE)
    return remote


def _transformers_vision_defaults() -> dict[str, Any]:
    defaults = Florence2VisionConfig()
    return {k: copy.deepcopy(getattr(defaults, k)) for k in _VISION_KEYS}


def _vision_defaults(defaults: str, native: bool) -> dict[str, Any]:
    if native:  # whoever wrote it, a config in transformers' format is read with transformers' class
        return _transformers_vision_defaults()
    if defaults == TRANSFORMERS:
        return _remote_vision(_transformers_vision_defaults())
    if defaults == ORIGINAL_XVLA:
        return {k: v for k, v in _REMOTE_VISION_DEFAULTS.items() if k not in _ORIGINAL_REQUIRED}
    return copy.deepcopy(_REMOTE_VISION_DEFAULTS)


def _text_defaults(defaults: str) -> dict[str, Any]:
    bart = BartConfig()
    text = {k: getattr(bart, k) for k in _TEXT_KEYS}
    return text if defaults == TRANSFORMERS else {**text, "vocab_size": _FLORENCE_VOCAB_SIZE}


def complete_florence_config(florence_config: dict[str, Any], defaults: str | None = None) -> dict[str, Any]:
    """`florence_config` with every architecture field it leaves out filled in with the defaults of `defaults`'
    config classes, in its own format; fields it has are kept as they are. None, when nothing says who wrote it:
    the classes of its format (Microsoft's for the remote-code format, transformers' for theirs).

    The top-level `projection_dim` and `vocab_size`, which LeRobot 0.4.x and the original size the model's
    projection from, follow the vision and text parts when left out."""
    _check_parts(florence_config)
    completed = copy.deepcopy(florence_config)
    vision, text = completed["vision_config"], completed["text_config"]
    native = _is_native_vision(vision)
    defaults = defaults or (TRANSFORMERS if native else REMOTE_CODE)
    if defaults not in FLORENCE_DEFAULTS:
        raise ValueError(f"florence_config defaults must be one of {FLORENCE_DEFAULTS}, got {defaults!r}")
    if defaults == ORIGINAL_XVLA and not native:
        missing = [k for k in _ORIGINAL_REQUIRED if vision.get(k) is None]
        if missing:
            raise ValueError(
                f"florence_config.vision_config has no {' or '.join(missing)}: the original X-VLA's "
                "Florence2VisionConfig has no default for them (it cannot build its model without them)"
            )
    _fill(vision, _vision_defaults(defaults, native))
    _fill(text, _text_defaults(defaults))
    _fill(completed, {"projection_dim": vision["projection_dim"], "vocab_size": text["vocab_size"]})
    return completed


def _fill(config: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Set the fields `config` leaves out; a null counts as left out (the config classes treat it so)."""
    for key, value in defaults.items():
        if config.get(key) is None:
            config[key] = value


def _check_parts(florence_config: dict[str, Any]) -> None:
    for part in ("vision_config", "text_config"):
        if not isinstance(florence_config.get(part), dict):
            raise ValueError(f"florence_config needs a '{part}' dict, got keys {sorted(florence_config)}")


def _native_vision_config(vision: dict[str, Any]) -> dict[str, Any]:
    """A complete vision config -> keyword arguments of `transformers.Florence2VisionConfig`."""
    vision = dict(vision)
    if not _is_native_vision(vision):
        pos = vision.pop("image_pos_embed")
        if not isinstance(pos, dict) or pos.get("type") != "learned_abs_2d":
            raise ValueError(f"florence_config.vision_config.image_pos_embed.type must be 'learned_abs_2d', got {pos}")
        temporal = vision.pop("visual_temporal_embedding")
        if not isinstance(temporal, dict) or temporal.get("type") != "COSINE":
            raise ValueError(
                f"florence_config.vision_config.visual_temporal_embedding.type must be 'COSINE', got {temporal}"
            )
        source = vision.pop("image_feature_source")
        if list(source) != _IMAGE_FEATURE_SOURCE:
            raise ValueError(
                f"florence_config.vision_config.image_feature_source must be {_IMAGE_FEATURE_SOURCE} "
                f"(what X-VLA was trained with), got {source}"
            )
        vision["embed_dim"] = vision.pop("dim_embed")
        vision["max_position_embeddings"] = pos.get("max_pos_embeddings")
        vision["max_temporal_embeddings"] = temporal.get("max_temporal_embeddings")
    return {k: vision[k] for k in _VISION_KEYS if k in vision}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# Names of the native vision fields in the remote-code format, for messages that name what the user wrote.
_REMOTE_NAMES = {
    "embed_dim": "dim_embed",
    "max_position_embeddings": "image_pos_embed.max_pos_embeddings",
    "max_temporal_embeddings": "visual_temporal_embedding.max_temporal_embeddings",
}
# Each DaViT stage's list and the range of its values. The upper bounds, like every florence_config bound here, lie
# far above Florence-2-large (4 stages of depth <= 9 and width <= 2048; 12 text layers of width 1024, vocabulary
# 51289): a config.json from elsewhere cannot ask for a network no machine holds (the parameter estimate,
# `encoder_parameter_count`, bounds what their product asks for).
_STAGE_RANGES = {
    "depths": (0, 256), "embed_dim": (1, 16384), "num_heads": (1, 1024), "num_groups": (1, 1024),
    "patch_size": (1, 64), "patch_stride": (1, 64), "patch_padding": (0, 64),
}  # fmt: skip
_MAX_STAGES = 16
_VISION_MAXIMUM = {
    "window_size": 1024, "projection_dim": 16384, "max_position_embeddings": 4096, "max_temporal_embeddings": 4096,
}  # fmt: skip
_TEXT_MAXIMUM = {
    "vocab_size": 2**20, "max_position_embeddings": 65536, "d_model": 16384, "encoder_layers": 256,
    "encoder_ffn_dim": 65536, "encoder_attention_heads": 256,
}  # fmt: skip
_MAX_MLP_RATIO = 64


def _check_sizes(vision: dict[str, Any], text: dict[str, Any], remote: bool) -> None:
    """Refuse sizes that transformers would reject with a shape error, or that lie beyond the bounds above, naming
    the florence_config field."""

    def name(key: str) -> str:
        return "florence_config.vision_config." + (_REMOTE_NAMES.get(key, key) if remote else key)

    stages = vision["depths"]
    for key in (*_STAGE_RANGES, "patch_prenorm"):
        if not isinstance(vision[key], (list, tuple)) or not stages or len(vision[key]) != len(stages):
            raise ValueError(
                f"{name(key)} must be a list with one value per DaViT stage (as depths), got {vision[key]!r}"
            )
    if len(stages) > _MAX_STAGES:
        raise ValueError(f"{name('depths')} must list at most {_MAX_STAGES} DaViT stages, got {len(stages)}")
    for key, (low, high) in _STAGE_RANGES.items():
        if not all(_is_int(v) and v >= low for v in vision[key]):
            raise ValueError(f"{name(key)} must hold integers >= {low}, got {vision[key]}")
        if max(vision[key]) > high:
            raise ValueError(
                f"{name(key)} must hold integers <= {high} (far above Florence-2-large), got {vision[key]}"
            )
    for key in ("num_heads", "num_groups"):
        if any(dim % n for dim, n in zip(vision["embed_dim"], vision[key])):
            raise ValueError(
                f"{name('embed_dim')} {vision['embed_dim']} must be divisible by {name(key)} {vision[key]} "
                "stage by stage"
            )
    if vision.get("in_channels", 3) != 3:
        raise ValueError(f"{name('in_channels')} must be 3 (the cameras are RGB), got {vision['in_channels']!r}")
    ratio = vision.get("mlp_ratio", 4.0)
    if not (isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and 0 < ratio <= _MAX_MLP_RATIO):
        raise ValueError(f"{name('mlp_ratio')} must be a number in (0, {_MAX_MLP_RATIO}], got {ratio!r}")
    sizes = {name(k): (vision[k], high) for k, high in _VISION_MAXIMUM.items()}
    sizes.update({f"florence_config.text_config.{k}": (text[k], high) for k, high in _TEXT_MAXIMUM.items()})
    for field_name, (value, high) in sizes.items():
        if not _is_int(value) or value < 1:
            raise ValueError(f"{field_name} must be an integer >= 1, got {value!r}")
        if value > high:
            raise ValueError(f"{field_name} must be at most {high} (far above Florence-2-large), got {value}")
    if text["d_model"] % text["encoder_attention_heads"]:
        raise ValueError(
            f"florence_config.text_config.d_model={text['d_model']} must be divisible by "
            f"encoder_attention_heads={text['encoder_attention_heads']}"
        )
    if vision["projection_dim"] != text["d_model"]:
        raise ValueError(
            f"{name('projection_dim')}={vision['projection_dim']} must equal florence_config.text_config.d_model="
            f"{text['d_model']}: the image tokens enter the language encoder with the text embeddings"
        )


def native_florence_config(florence_config: dict[str, Any], defaults: str | None = None) -> Florence2Config:
    """Build the transformers `Florence2Config` of the encoder X-VLA uses.

    Accepts both the remote-code format (vision `model_type` "davit", `dim_embed`, ...) and the native one
    ("florence_vision", `embed_dim`, ...); fields it leaves out are filled in as `complete_florence_config`
    does, keys that only describe HF bookkeeping are ignored, and sizes are checked. The text decoder is built
    with zero layers because X-VLA deletes it anyway.
    """
    completed = complete_florence_config(florence_config, defaults)
    vision = _native_vision_config(completed["vision_config"])
    text = {k: v for k, v in completed["text_config"].items() if k in _TEXT_KEYS}
    _check_sizes(vision, text, remote=not _is_native_vision(completed["vision_config"]))
    text_config = BartConfig(**text, decoder_layers=0, is_encoder_decoder=True)
    config = Florence2Config(vision_config=vision, text_config=text_config.to_dict())
    config._attn_implementation = "sdpa"
    config.text_config._attn_implementation = "sdpa"
    config.vision_config._attn_implementation = "sdpa"
    return config


def build_florence_encoder(florence_config: dict[str, Any]) -> Florence2Model:
    """`Florence2Model` without its text decoder: vision tower + projector + BART encoder."""
    vlm = Florence2Model(native_florence_config(florence_config))
    del vlm.language_model.decoder
    return vlm


def encoder_parameter_count(config: Florence2Config) -> int:
    """The parameters of `build_florence_encoder` for the native `config` (`native_florence_config`), by arithmetic
    alone, before any tensor exists: the DaViT stages, the projector with its image position table, and the BART
    encoder with the text embedding (which it shares with the deleted decoder)."""
    vision, text = config.vision_config, config.text_config
    count, channels = 0, vision.in_channels
    for depth, dim, kernel, prenorm in zip(vision.depths, vision.embed_dim, vision.patch_size, vision.patch_prenorm):
        count += channels * dim * kernel**2 + dim + 2 * (channels if prenorm else dim)  # strided conv and its norm
        hidden = int(dim * vision.mlp_ratio)
        # A block has a window-attention and a channel-attention half of one shape: two depthwise 3x3 convs and two
        # norms, the qkv and output projections, and an MLP.
        half = 2 * 10 * dim + 4 * dim + 3 * dim * dim + (3 * dim if vision.qkv_bias else 0) + dim * dim + dim
        count += depth * 2 * (half + 2 * dim * hidden + hidden + dim)
        channels = dim
    width, projection = vision.embed_dim[-1], vision.projection_dim
    count += width * projection + 2 * projection + vision.max_position_embeddings * width
    model, ffn = text.d_model, text.encoder_ffn_dim
    layer = 4 * model * (model + 1) + 2 * model + 2 * model * ffn + ffn + model + 2 * model
    # BART's learned positions have 2 rows more than max_position_embeddings; 2 * model: the embedding's norm.
    embeddings = text.vocab_size * model + (text.max_position_embeddings + 2) * model + 2 * model
    return count + embeddings + text.encoder_layers * layer


def projection_dim(vlm: Florence2Model) -> int:
    return vlm.config.vision_config.projection_dim


def _vision_of(florence_config: dict[str, Any]) -> dict[str, Any]:
    return _native_vision_config(complete_florence_config(florence_config)["vision_config"])


def image_grid(florence_config: dict[str, Any], height: int, width: int) -> tuple[int, int]:
    """Rows and columns of DaViT's patch grid for height x width images: each stage's strided conv shrinks it
    (224 -> 56 -> 28 -> 14 -> 7 for Florence-2)."""
    vision = _vision_of(florence_config)
    for kernel, stride, padding in zip(vision["patch_size"], vision["patch_stride"], vision["patch_padding"]):
        height, width = ((size + 2 * padding - kernel) // stride + 1 for size in (height, width))
    return height, width


def image_tokens_per_view(florence_config: dict[str, Any], height: int, width: int) -> int:
    """The patch tokens of one view, plus the pooled token the projector puts in front of them."""
    rows, columns = image_grid(florence_config, height, width)
    return 1 + rows * columns


def check_image_size(florence_config: dict[str, Any], height: int, width: int) -> None:
    """Refuse images whose patch grid is empty or longer than the image position table."""
    rows, columns = image_grid(florence_config, height, width)
    table = _vision_of(florence_config)["max_position_embeddings"]
    if min(rows, columns) < 1 or max(rows, columns) > table:
        raise ValueError(
            f"{height}x{width} images make a {rows}x{columns} DaViT patch grid; florence_config's image position "
            f"table holds 1..{table} rows and columns (vision_config.image_pos_embed.max_pos_embeddings)"
        )


def encode_views(vlm: Florence2Model, images: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] ImageNet-normalised images -> [N, T_img, D_proj] projected image tokens."""
    features = vlm.get_image_features(images)
    # transformers 5 wraps the tokens in an output object; 4.57 returns the tensor.
    return getattr(features, "pooler_output", features)
