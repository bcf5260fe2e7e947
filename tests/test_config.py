"""XVLAConfig: pretrained defaults, compatibility with LeRobot's built-in config, validation errors."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import subprocess

import draccus
import pytest
import torch
from draccus.utils import DecodingError
from lerobot.configs.policies import PreTrainedConfig
from lerobot.configs.train import TrainPipelineConfig
from lerobot.configs.types import FeatureType, NormalizationMode, PolicyFeature
from lerobot.policies.xvla.configuration_xvla import XVLAConfig as BuiltinConfig

from lerobot_xvla import XVLAConfig, builtin_xvla
from lerobot_xvla.configuration_xvla import XVLAConfigError
from lerobot_xvla.demo import lerobot_command
from lerobot_xvla.modeling_xvla import XVLAModel
from lerobot_xvla.offline import TINY_FLORENCE_CONFIG

from conftest import LEROBOT_ENV, features, tiny_config, tiny_kwargs


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


def florence(vision=None, text=None, **top):
    """The tiny florence_config with some fields changed."""
    changed = copy.deepcopy(TINY_FLORENCE_CONFIG)
    changed["vision_config"].update(vision or {})
    changed["text_config"].update(text or {})
    return {**changed, **top}


REGISTERED = "['agibot_ee6d', 'auto', 'ee6d', 'franka_joint7', 'joint', 'so101_bimanual', 'so101_ee6d']"


# Every field with a constrained value, and what the message says (tiny config: 2 cameras of 64x64, 16 text
# tokens, 30 actions, hidden 64 over 4 heads, 8 domains).
@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"n_obs_steps": 0}, "n_obs_steps must be an integer >= 1, got 0"),
        ({"chunk_size": 0}, "chunk_size must be an integer >= 1, got 0"),
        ({"n_action_steps": 31}, "n_action_steps must be in 1..30, got 31"),
        ({"dtype": "float16"}, "dtype must be one of ['float32', 'bfloat16'], got 'float16'"),
        ({"weights_dtype": "int8"}, "weights_dtype must be one of ['float32', 'bfloat16'], got 'int8'"),
        ({"normalization_mapping": {"ACTIONS": NormalizationMode.MEAN_STD}}, "normalization_mapping must map feature types ['STATE', 'VISUAL', 'ENV', 'ACTION', 'REWARD', 'LANGUAGE'] to normalization modes"),
        ({"florence_config": {"vision_config": {}}}, "florence_config needs a 'text_config' dict, got keys ['vision_config']"),
        ({"florence_config": florence(vision={"num_heads": [3, 2, 2, 4]})}, "florence_config.vision_config.dim_embed [16, 32, 64, 128] must be divisible by florence_config.vision_config.num_heads [3, 2, 2, 4] stage by stage"),
        ({"florence_config": florence(vision={"depths": [1, 1, 1]})}, "florence_config.vision_config.dim_embed must be a list with one value per DaViT stage (as depths), got [16, 32, 64, 128]"),
        ({"florence_config": florence(text={"d_model": 32})}, "florence_config.vision_config.projection_dim=64 must equal florence_config.text_config.d_model=32"),
        ({"florence_config": florence(text={"vocab_size": 0})}, "florence_config.text_config.vocab_size must be an integer >= 1, got 0"),
        ({"florence_config": florence(vision={"image_pos_embed": {"type": "sine"}})}, "florence_config.vision_config.image_pos_embed.type must be 'learned_abs_2d'"),
        ({"tokenizer_name": ""}, "tokenizer_name must name a tokenizer (Hub id or directory), got ''"),
        ({"tokenizer_max_length": 0}, "tokenizer_max_length must be an integer >= 1, got 0"),
        ({"default_task": " "}, "default_task must be an instruction or None, got ' '"),
        ({"tokenizer_padding_side": "middle"}, "tokenizer_padding_side must be one of ['right', 'left'], got 'middle'"),
        ({"pad_language_to": "max"}, "pad_language_to must be one of ['longest', 'max_length', 'do_not_pad'], got 'max'"),
        ({"hidden_size": 0}, "hidden_size must be an integer >= 1, got 0"),
        ({"hidden_size": 66}, "hidden_size=66 must be divisible by num_heads=4"),
        ({"depth": 0}, "depth must be an integer >= 1, got 0"),
        ({"num_heads": 0}, "num_heads must be an integer >= 1, got 0"),
        ({"mlp_ratio": 0.0}, "mlp_ratio must be a number > 0, got 0.0"),
        ({"num_domains": -1}, "num_domains must be an integer >= 1, got -1"),
        ({"len_soft_prompts": -1}, "len_soft_prompts must be an integer >= 0, got -1"),
        ({"dim_time": 0}, "dim_time must be an integer >= 1, got 0"),
        ({"max_len_seq": 0}, "max_len_seq must be an integer >= 1, got 0"),
        ({"max_len_seq": 40}, "1 view(s) at 64x64, 16 text tokens and 30 actions make 51 tokens > max_len_seq=40"),
        ({"action_mode": "ee7d"}, f"action_mode must be one of the registered modes {REGISTERED}, got 'ee7d'"),
        ({"num_denoising_steps": 0}, "num_denoising_steps must be an integer >= 1, got 0"),
        ({"max_state_dim": 0}, "max_state_dim must be an integer >= 1, got 0"),
        ({"max_action_dim": 0}, "max_action_dim must be an integer >= 1, got 0"),
        ({"domain_id": 8}, "domain_id must be in [0, num_domains=8), got 8"),
        ({"domain_map": {"koch": -1}}, "domain_map['koch'] must be in [0, num_domains=8), got -1"),
        ({"image_size": (0, 64)}, "image_size must be (height, width), two integers >= 1, got (0, 64)"),
        ({"image_size": (64,)}, "image_size must be (height, width), two integers >= 1, got (64,)"),
        ({"image_size": (4096, 4096)}, "4096x4096 images make a 128x128 DaViT patch grid; florence_config's image position table holds 1..50 rows and columns"),
        ({"resize_imgs_with_padding": (64, 0)}, "resize_imgs_with_padding must be (height, width), two integers >= 1, got (64, 0)"),
        ({"num_image_views": 0}, "num_image_views must be an integer >= 1 when set, got 0"),
        ({"empty_cameras": -1}, "empty_cameras must be an integer >= 0, got -1"),
        ({"compile_mode": "fast"}, "compile_mode must be one of ['default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs'], got 'fast'"),
        ({"chunk_blend_steps": -1}, "chunk_blend_steps must be an integer >= 0, got -1"),
        ({"anchor_horizon_s": 1.0}, "anchor_horizon_s and anchor_fps go together: set both (time anchors) or neither"),
        ({"anchor_horizon_s": 1.0, "anchor_fps": 0.0}, "anchor_horizon_s and anchor_fps must be > 0, got 1.0, 0.0"),
        ({"init_domain_from": 2}, "init_domain_from=2 needs domain_id set to the new robot's (another) id"),
        ({"log_loss_terms_every": -1}, "log_loss_terms_every must be an integer >= 0, got -1"),
        ({"optimizer_lr": 0.0}, "optimizer_lr must be a number > 0, got 0.0"),
        ({"optimizer_lr": float("nan")}, "optimizer_lr must be a number > 0, got nan"),
        ({"optimizer_betas": (0.9, 1.0)}, "optimizer_betas must be two numbers in [0, 1), got (0.9, 1.0)"),
        ({"optimizer_eps": -1e-8}, "optimizer_eps must be a number >= 0, got -1e-08"),
        ({"optimizer_weight_decay": -0.1}, "optimizer_weight_decay must be a number >= 0, got -0.1"),
        ({"optimizer_grad_clip_norm": -1.0}, "optimizer_grad_clip_norm must be a number >= 0, got -1.0"),
        ({"learning_coef": -0.1}, "learning_coef must be a number >= 0, got -0.1"),
        ({"optimizer_soft_prompt_lr_scale": -1.0}, "optimizer_soft_prompt_lr_scale must be a number >= 0, got -1.0"),
        ({"optimizer_soft_prompt_warmup_lr_scale": -0.5}, "optimizer_soft_prompt_warmup_lr_scale must be a number >= 0, got -0.5"),
        ({"freeze_steps": -1}, "freeze_steps must be an integer >= 0, got -1"),
        ({"scheduler_warmup_steps": -1}, "scheduler_warmup_steps must be an integer >= 0, got -1"),
        ({"lr_decay": "linear"}, "lr_decay must be one of ['constant', 'cosine'], got 'linear'"),
        ({"scheduler_decay_steps": -1}, "scheduler_decay_steps must be an integer >= 0, got -1"),
        ({"scheduler_decay_lr": -1e-5}, "scheduler_decay_lr must be a number >= 0, got -1e-05"),
    ],
)
def test_invalid_fields_are_refused(overrides, message):
    with pytest.raises(XVLAConfigError, match=re.escape(message)):
        tiny_config(**overrides)


def test_the_builtin_defaults_are_valid():
    """Every value LeRobot's built-in config defaults to parses (its empty florence_config aside, which the
    built-in cannot build a policy from either)."""
    builtin = BuiltinConfig(device="cpu")
    values = {f.name: getattr(builtin, f.name) for f in dataclasses.fields(BuiltinConfig) if f.init and f.name != "florence_config"}
    config = XVLAConfig(**values)
    assert (config.chunk_size, config.tokenizer_max_length, config.max_state_dim) == (32, 64, 32)
    assert config.optimizer_betas == (0.9, 0.99) and config.optimizer_grad_clip_norm == 10.0


def test_draccus_shows_the_reason():
    """LeRobot's parser builds the config with draccus, which hides the message of a ValueError."""
    with pytest.raises(XVLAConfigError, match=re.escape("num_domains must be an integer >= 1, got -1")):
        draccus.parse(XVLAConfig, args=["--device=cpu", "--num_domains=-1"])
    message = "`policy.hidden_size`: hidden_size=100 must be divisible by num_heads=16 (XVLAConfigError)"  # config_errors.py
    with pytest.raises(DecodingError, match=re.escape(message)):
        draccus.parse(TrainPipelineConfig, args=["--policy.type=xvla", "--policy.hidden_size=100", "--dataset.repo_id=x"])


@pytest.mark.parametrize(
    "flag,message",
    [
        ("--policy.chunk_size=0", "chunk_size must be an integer >= 1, got 0"),
        ("--policy.action_mode=ee7d", f"action_mode must be one of the registered modes {REGISTERED}, got 'ee7d'"),
    ],
)
def test_config_errors_reach_the_command_line(tmp_path, flag, message):
    command = [lerobot_command("lerobot-train"), "--policy.type=xvla", flag, "--dataset.repo_id=x", f"--output_dir={tmp_path / 'run'}"]
    result = subprocess.run(command, capture_output=True, text=True, env=LEROBOT_ENV, timeout=600)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-3000:]


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
    ],
)
def test_features_that_do_not_fit_are_refused(kwargs, message):
    config = tiny_config(**kwargs)
    with pytest.raises(ValueError, match=re.escape(message)):
        config.validate_features()


def test_the_sequence_must_fit_every_view():
    config = tiny_config(4, image_size=(224, 224), max_len_seq=200)  # one view fits, four do not
    with pytest.raises(XVLAConfigError, match=re.escape("4 view(s) at 224x224, 16 text tokens and 30 actions make 246 tokens > max_len_seq=200")):
        config.validate_features()


def test_image_features_must_be_rgb_chw():
    config = tiny_config()
    config.input_features["observation.images.cam0"] = PolicyFeature(FeatureType.VISUAL, (64, 64, 3))
    with pytest.raises(ValueError, match=re.escape("image feature 'observation.images.cam0' has shape (64, 64, 3); expected [3, H, W] (RGB)")):
        config.validate_features()


def test_every_field_has_its_own_help():
    """draccus shows the comment above a field (or inline) as its help: each of ours documents itself, and
    no help is shared with another field (a section heading would be)."""
    from draccus.wrappers.docstring import get_attribute_docstring, get_preferred_help_text

    ours = [f.name for f in dataclasses.fields(XVLAConfig) if f.name in XVLAConfig.__dict__.get("__annotations__", {})]
    helps = {name: get_preferred_help_text(get_attribute_docstring(XVLAConfig, name)) for name in ours}
    assert len(ours) > 60 and not [name for name, text in helps.items() if not text]
    assert len(set(helps.values())) == len(helps)


def test_lerobot_train_help_documents_each_field():
    result = subprocess.run(
        [lerobot_command("lerobot-train"), "--policy.type=xvla", "--help"], capture_output=True, text=True, env=LEROBOT_ENV, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    text = " ".join(result.stdout.split())  # argparse wraps the help lines
    for flag, help_text in (
        ("hidden_size", "Width of the transformer (1024 in X-VLA-0.9B). (default: 1024)"),
        ("compile_model", "torch.compile the sampler as two graphs: the observation encoding and one denoising step. (default: False)"),
        ("freeze_vision_encoder", "Freeze the DaViT vision tower. (default: False)"),
    ):
        assert f"--policy.{flag} {'int' if flag == 'hidden_size' else 'bool'} {help_text}" in text
