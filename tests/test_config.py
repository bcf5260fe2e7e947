"""XVLAConfig: pretrained defaults, compatibility with LeRobot's built-in config, validation errors."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from lerobot.configs.policies import PreTrainedConfig
from lerobot.configs.types import FeatureType, NormalizationMode, PolicyFeature
from lerobot.policies.xvla.configuration_xvla import XVLAConfig as BuiltinConfig

from lerobot_xvla import XVLAConfig, builtin_xvla
from lerobot_xvla.modeling_xvla import XVLAModel

from conftest import features, tiny_config, tiny_kwargs


def test_defaults_match_the_pretrained_checkpoints():
    config = XVLAConfig(device="cpu")
    assert (config.chunk_size, config.n_action_steps) == (30, 30)
    assert config.tokenizer_max_length == 50
    assert config.max_state_dim == 20
    assert config.image_size == (224, 224) and config.resize_imgs_with_padding is None
    assert config.dtype == "float32"
    assert (config.hidden_size, config.depth, config.num_heads, config.num_domains) == (1024, 24, 16, 30)
    assert config.florence_config["vision_config"]["dim_embed"] == [256, 512, 1024, 2048]
    assert config.optimizer_betas == (0.9, 0.95) and config.optimizer_grad_clip_norm == 1.0


def test_default_builds_the_full_size_architecture():
    with torch.device("meta"):
        model = XVLAModel(XVLAConfig(device="cpu"))
    count = sum(p.numel() for p in model.parameters())
    assert 870e6 < count < 885e6, count  # X-VLA-0.9B: Florence-2-large encoder + 24 x 1024 transformer
    assert sum(p.numel() for p in model.transformer.parameters()) == 308_775_512


def test_accepts_every_field_of_the_builtin_config():
    ours = {f.name for f in dataclasses.fields(XVLAConfig)}
    builtin = {f.name for f in dataclasses.fields(BuiltinConfig)}
    assert builtin <= ours, builtin - ours


def test_parses_a_config_json_written_by_the_builtin(tmp_path):
    with builtin_xvla():
        BuiltinConfig(**tiny_kwargs(3, optimizer_soft_prompt_lr_scale=0.5, resize_imgs_with_padding=(96, 96)))._save_pretrained(tmp_path)
    config = PreTrainedConfig.from_pretrained(tmp_path)
    assert type(config) is XVLAConfig
    assert config.optimizer_soft_prompt_lr_scale == 0.5
    assert config.model_image_size == (96, 96)
    assert list(config.image_features) == [f"observation.images.cam{i}" for i in range(3)]


def test_saved_config_leaves_out_plugin_defaults_and_round_trips(tmp_path):
    config = tiny_config(domain_id=3, image_size=(224, 224))
    config._save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["type"] == "xvla" and saved["domain_id"] == 3
    for name in ("image_size", "primary_camera", "gradient_checkpointing", "checkpoint_reinit", "learning_coef"):
        assert name not in saved
    reloaded = PreTrainedConfig.from_pretrained(tmp_path)
    assert reloaded.domain_id == 3 and reloaded.image_size == (224, 224)
    assert reloaded.input_features == config.input_features


def test_normalization_follows_the_action_mode():
    assert tiny_config().normalization_mapping["ACTION"] is NormalizationMode.IDENTITY
    joints = tiny_config(action=12, action_mode="so101_bimanual").normalization_mapping
    assert joints["STATE"] is NormalizationMode.MEAN_STD and joints["ACTION"] is NormalizationMode.MEAN_STD
    explicit = tiny_config(action=12, action_mode="so101_bimanual", normalization_mapping={"ACTION": NormalizationMode.MIN_MAX})
    assert explicit.normalization_mapping == {"ACTION": NormalizationMode.MIN_MAX}


def test_empty_cameras_add_view_slots_once():
    config = tiny_config(2, empty_cameras=1)
    config.validate_features()
    config.validate_features()  # idempotent, unlike LeRobot's built-in (lerobot#4245)
    assert config.num_image_views == 3
    assert config.camera_order == ["observation.images.cam0", "observation.images.cam1"]  # slots, not features


def test_builtin_empty_camera_features_become_slots():
    """LeRobot's built-in writes its empty slots as VISUAL input features; robots never provide them, so
    lerobot-rollout's camera check would refuse the checkpoint (lerobot#4245)."""
    inputs, outputs = features(2)
    inputs["observation.images.empty_camera_0"] = PolicyFeature(FeatureType.VISUAL, (3, 64, 64))
    config = XVLAConfig(**{**tiny_kwargs(2), "input_features": inputs, "output_features": outputs})
    config.validate_features()
    assert "observation.images.empty_camera_0" not in config.input_features
    assert config.empty_cameras == 1 and config.num_image_views == 3


def test_cameras_missing_from_the_dataset_become_declared_slots():
    config = tiny_config(3, empty_cameras=1)
    provided = {"observation.images.cam0", "observation.images.cam1"}
    assert config.drop_cameras_missing_from(provided) == ["observation.images.cam2"]
    config.validate_features()
    assert config.camera_order == sorted(provided) and config.num_image_views == 3
    # Not covered by the declared slots, the primary camera, or no camera in common: nothing is dropped.
    assert tiny_config(3).drop_cameras_missing_from(provided) == []
    assert tiny_config(3, empty_cameras=1).drop_cameras_missing_from({"observation.images.cam1", "observation.images.cam2"}) == []
    assert tiny_config(3, empty_cameras=3).drop_cameras_missing_from({"observation.images.top"}) == []


def test_primary_camera_goes_first():
    config = tiny_config(3, primary_camera="observation.images.cam2")
    assert config.camera_order == ["observation.images.cam2", "observation.images.cam0", "observation.images.cam1"]


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"action_mode": "ee7d"}, "unknown action_mode 'ee7d'; registered modes: ['agibot_ee6d', 'auto', 'ee6d', 'franka_joint7', 'joint', 'so101_bimanual']"),
        ({"domain_id": 8}, "domain_id must be in [0, num_domains=8), got 8"),
        ({"n_action_steps": 31}, "n_action_steps must be in 1..30, got 31"),
        ({"dtype": "float16"}, "dtype must be 'float32' or 'bfloat16', got 'float16'"),
        ({"depth": 0}, "depth (transformer blocks) must be > 0, got 0"),
    ],
)
def test_invalid_fields_are_refused(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        tiny_config(**overrides)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"views": 0}, "X-VLA needs at least one camera: no VISUAL feature among input_features ['observation.state']"),
        ({"state": 21}, "observation.state has 21 values but max_state_dim=20"),
        ({"state": None}, "use_proprio=True needs an 'observation.state' feature"),
        ({"action": 7}, "action dimension 7 does not fit: action_mode 'ee6d' expects actions of width 20 or 10; modes that accept width 7: ['auto', 'franka_joint7']"),
        ({"action": 14, "action_mode": "so101_bimanual"}, "action_mode 'so101_bimanual' expects actions of width 12; modes that accept width 14: ['auto', 'joint']"),
        ({"action": 21, "action_mode": "auto"}, "action_mode 'auto' expects actions of width 1..max_action_dim=20"),
        ({"primary_camera": "observation.images.top"}, "primary_camera 'observation.images.top' is not an image feature"),
        ({"views": 4, "image_size": (224, 224), "max_len_seq": 200}, "4 views at 224x224, 16 text tokens and 30 actions make 246 tokens"),
    ],
)
def test_features_that_do_not_fit_are_refused(kwargs, message):
    config = tiny_config(**kwargs)
    with pytest.raises(ValueError, match=re.escape(message)):
        config.validate_features()


def test_image_features_must_be_rgb_chw():
    config = tiny_config()
    config.input_features["observation.images.cam0"] = PolicyFeature(FeatureType.VISUAL, (64, 64, 3))
    with pytest.raises(ValueError, match=re.escape("image feature 'observation.images.cam0' has shape (64, 64, 3); expected [3, H, W] (RGB)")):
        config.validate_features()
