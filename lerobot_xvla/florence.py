"""Florence-2 as X-VLA uses it: the DaViT vision tower, the multimodal projector and the BART encoder.

The network itself is `transformers.Florence2Model`; nothing here re-implements it. This module only
translates the `florence_config` dict that X-VLA checkpoints carry (Microsoft's remote-code format, which
LeRobot's built-in and the original code both write) into the native transformers config, builds the
model without its text decoder, and runs the encoder the way the original `forward_vlm` does.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from transformers import BartConfig, Florence2Config, Florence2Model

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
_TEXT_KEYS = (
    "vocab_size", "max_position_embeddings", "d_model", "encoder_layers", "encoder_ffn_dim",
    "encoder_attention_heads", "encoder_layerdrop", "activation_function", "dropout", "attention_dropout",
    "activation_dropout", "init_std", "scale_embedding", "pad_token_id", "bos_token_id", "eos_token_id",
    "decoder_start_token_id",
)  # fmt: skip


def _native_vision_config(vision: dict[str, Any]) -> dict[str, Any]:
    """Remote-code DaViT config -> keyword arguments of `transformers.Florence2VisionConfig`."""
    vision = dict(vision)
    # Files written by transformers' remote-code classes sometimes carry an empty `model_type`; the key
    # names tell the two formats apart reliably.
    if "dim_embed" in vision:
        pos = vision.pop("image_pos_embed", None) or {"type": "learned_abs_2d", "max_pos_embeddings": 50}
        if pos.get("type") != "learned_abs_2d":
            raise ValueError(f"florence_config.vision_config.image_pos_embed.type must be 'learned_abs_2d', got {pos}")
        temporal = vision.pop("visual_temporal_embedding", None) or {"type": "COSINE", "max_temporal_embeddings": 100}
        if temporal.get("type") != "COSINE":
            raise ValueError(
                f"florence_config.vision_config.visual_temporal_embedding.type must be 'COSINE', got {temporal}"
            )
        source = vision.pop("image_feature_source", ["spatial_avg_pool", "temporal_avg_pool"])
        if list(source) != ["spatial_avg_pool", "temporal_avg_pool"]:
            raise ValueError(
                "florence_config.vision_config.image_feature_source must be "
                f"['spatial_avg_pool', 'temporal_avg_pool'] (what X-VLA was trained with), got {source}"
            )
        vision["embed_dim"] = vision.pop("dim_embed")
        vision["max_position_embeddings"] = pos["max_pos_embeddings"]
        vision["max_temporal_embeddings"] = temporal["max_temporal_embeddings"]
    elif "embed_dim" not in vision:
        raise ValueError(
            "florence_config.vision_config needs 'dim_embed' (remote-code DaViT format) or 'embed_dim' "
            f"(transformers Florence2VisionConfig format), got keys {sorted(vision)}"
        )
    return {k: vision[k] for k in _VISION_KEYS if k in vision}


def native_florence_config(florence_config: dict[str, Any]) -> Florence2Config:
    """Build the transformers `Florence2Config` of the encoder X-VLA uses.

    Accepts both the remote-code format (vision `model_type` "davit", `dim_embed`, ...) and the native one
    ("florence_vision", `embed_dim`, ...); keys that only describe HF bookkeeping are ignored. The text decoder
    is built with zero layers because X-VLA deletes it anyway.
    """
    for part in ("vision_config", "text_config"):
        if not isinstance(florence_config.get(part), dict):
            raise ValueError(f"florence_config needs a '{part}' dict, got keys {sorted(florence_config)}")
    text = {k: v for k, v in florence_config["text_config"].items() if k in _TEXT_KEYS}
    text_config = BartConfig(**text, decoder_layers=0, is_encoder_decoder=True)
    config = Florence2Config(
        vision_config=_native_vision_config(copy.deepcopy(florence_config["vision_config"])),
        text_config=text_config.to_dict(),
    )
    config._attn_implementation = "sdpa"
    config.text_config._attn_implementation = "sdpa"
    config.vision_config._attn_implementation = "sdpa"
    return config


def build_florence_encoder(florence_config: dict[str, Any]) -> Florence2Model:
    """`Florence2Model` without its text decoder: vision tower + projector + BART encoder."""
    vlm = Florence2Model(native_florence_config(florence_config))
    del vlm.language_model.decoder
    return vlm


def projection_dim(vlm: Florence2Model) -> int:
    return vlm.config.vision_config.projection_dim


def image_tokens_per_view(height: int, width: int) -> int:
    """DaViT downsamples by 32; the projector adds one pooled token in front of the patch tokens."""
    return 1 + (height // 32) * (width // 32)


def encode_views(vlm: Florence2Model, images: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] ImageNet-normalised images -> [N, T_img, D_proj] projected image tokens."""
    features = vlm.get_image_features(images)
    # transformers 5 wraps the tokens in an output object; 4.57 returns the tensor.
    return getattr(features, "pooler_output", features)

