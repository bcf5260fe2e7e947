"""Offline building blocks for demos and tests: a tiny X-VLA architecture and a local tokenizer.

Nothing here downloads anything. The tiny architecture has the same structure as X-VLA-0.9B (DaViT with
four stages, a BART encoder, soft prompts, per-domain heads), so every code path runs; only the widths
and depths shrink (about 1M parameters).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from .florence import FLORENCE2_LARGE

def _shrink(florence_config: dict[str, Any], vision: dict[str, Any], text: dict[str, Any], **top: Any) -> dict[str, Any]:
    shrunk = copy.deepcopy(florence_config)
    shrunk["vision_config"].update(vision)
    shrunk["text_config"].update(text)
    shrunk.update(top)
    return shrunk


# Florence-2-large with every width and depth cut down.
TINY_FLORENCE_CONFIG: dict[str, Any] = _shrink(
    FLORENCE2_LARGE,
    vision={
        "drop_path_rate": 0.0,
        "dim_embed": [16, 32, 64, 128],
        "num_heads": [2, 2, 2, 4],
        "num_groups": [2, 2, 2, 4],
        "depths": [1, 1, 1, 1],
        "projection_dim": 64,
    },
    text={
        "vocab_size": 1000,
        "max_position_embeddings": 256,
        "d_model": 64,
        "encoder_layers": 2,
        "encoder_ffn_dim": 128,
        "encoder_attention_heads": 2,
        "decoder_layers": 1,
        "decoder_ffn_dim": 128,
        "decoder_attention_heads": 2,
    },
    # LeRobot's built-in X-VLA reads the projection width from the top level.
    projection_dim=64,
    vocab_size=1000,
)

# XVLAConfig fields of the tiny architecture.
TINY_ARCHITECTURE: dict[str, Any] = {
    "florence_config": TINY_FLORENCE_CONFIG,
    "hidden_size": 64,
    "depth": 2,
    "num_heads": 4,
    "len_soft_prompts": 4,
    "num_domains": 8,
    "tokenizer_max_length": 16,
    "image_size": (64, 64),
}

_SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]  # BART's ids 0..3


def build_word_tokenizer(directory: str | Path, words: list[str] | None = None) -> Path:
    """Write a word-level tokenizer with BART's special-token ids to `directory` and return it.

    `AutoTokenizer.from_pretrained(directory)` (what LeRobot's tokenizer step calls) loads it offline.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = words or _DEFAULT_WORDS
    vocab = {token: i for i, token in enumerate(_SPECIAL_TOKENS + sorted(set(w.lower() for w in words)))}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    directory = Path(directory)
    fast.save_pretrained(directory)
    return directory


_DEFAULT_WORDS = (
    "pick up place put the a an red green blue yellow cube block ball cup bowl plate box on in into onto to "
    "of from left right top bottom table drawer open close push pull move stack fold cloth towel shirt grasp "
    "lift insert peg socket transfer handover arm gripper and then with it"
).split()
