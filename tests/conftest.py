"""Shared fixtures: tiny X-VLA configs, deterministic weights, batches and a local tokenizer (all offline)."""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*GenerationMixin.*")

import lerobot_xvla  # noqa: E402, F401  (owns `xvla` for every test)
from lerobot.configs.types import FeatureType, PolicyFeature  # noqa: E402
from lerobot_xvla import XVLAConfig  # noqa: E402
from lerobot_xvla.offline import TINY_ARCHITECTURE, build_word_tokenizer  # noqa: E402


def features(views: int = 2, state: int | None = 20, action: int = 20, size: tuple[int, int] = (64, 64)):
    """(input_features, output_features) of a robot with `views` cameras named observation.images.cam{i}."""
    inputs = {f"observation.images.cam{i}": PolicyFeature(FeatureType.VISUAL, (3, *size)) for i in range(views)}
    if state is not None:
        inputs["observation.state"] = PolicyFeature(FeatureType.STATE, (state,))
    return inputs, {"action": PolicyFeature(FeatureType.ACTION, (action,))}


def tiny_kwargs(views: int = 2, state: int | None = 20, action: int = 20, size=(64, 64), **overrides) -> dict:
    """Keyword arguments accepted by both XVLAConfig classes (ours and LeRobot's built-in)."""
    inputs, outputs = features(views, state, action, size)
    kwargs = {k: copy.deepcopy(v) for k, v in TINY_ARCHITECTURE.items() if k != "image_size"}
    kwargs.update(device="cpu", chunk_size=30, n_action_steps=30, max_state_dim=20, input_features=inputs, output_features=outputs, push_to_hub=False)
    kwargs.update(overrides)
    return kwargs


def tiny_config(views: int = 2, state: int | None = 20, action: int = 20, size=(64, 64), **overrides) -> XVLAConfig:
    overrides.setdefault("image_size", size)
    return XVLAConfig(**tiny_kwargs(views, state, action, size, **overrides))


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter a distinct deterministic value (biases and norms included), so a wrongly
    mapped weight cannot go unnoticed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.05
            is_norm_weight = name.endswith("weight") and param.ndim == 1
            param.copy_(1.0 + noise if is_norm_weight else noise)
    return module


def make_batch(config: XVLAConfig, batch_size: int = 2, seed: int = 0, image_size=None) -> dict:
    """A preprocessed batch (tokens, ImageNet-normalised images, state, targets) for `config`'s features."""
    generator = torch.Generator().manual_seed(seed)
    batch = {
        "observation.language.tokens": torch.randint(4, 1000, (batch_size, config.tokenizer_max_length), generator=generator)
    }
    for key, feature in config.image_features.items():
        if "empty_camera" in key:
            continue
        height, width = image_size or feature.shape[1:]
        batch[key] = torch.randn(batch_size, 3, height, width, generator=generator)
    if config.robot_state_feature is not None:
        batch["observation.state"] = torch.randn(batch_size, config.robot_state_feature.shape[0], generator=generator) * 0.1
    action_dim = config.action_feature.shape[0]
    actions = torch.randn(batch_size, config.chunk_size, action_dim, generator=generator) * 0.1
    if config.action_mode in ("ee6d", "joint"):  # binary grippers for the BCE terms
        grippers = {"ee6d": [9, 19], "joint": [6, 13]}[config.action_mode]
        grippers = [g for g in grippers if g < action_dim]
        actions[..., grippers] = (torch.rand(batch_size, config.chunk_size, len(grippers), generator=generator) > 0.5).float()
    batch["action"] = actions
    return batch


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> str:
    return str(build_word_tokenizer(tmp_path_factory.mktemp("tokenizer")))
