"""A checkpoint's config.json, statistics and checkpoint_reinit are untrusted input (issue 23): every size has an upper
bound and the parameter estimate (exact, checked against built networks) a memory bound, both before any tensor
exists; statistics no dataset gives are refused by feature, statistic and index; checkpoint_reinit names a part of
the model and leaves some of it to load, and says at WARNING what it re-initialised."""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil

import pytest
import torch
from conftest import tiny_config
from lerobot.configs.types import NormalizationMode
from safetensors.torch import load_file, save_file
from test_config import florence as tiny_florence

from lerobot_xvla import XVLAConfig, XVLAConfigError, XVLAPolicy, configuration_xvla
from lerobot_xvla.checkpoints import CheckpointMismatchError, load_state_dict_strict, original_config_to_lerobot
from lerobot_xvla.configuration_xvla import estimate_parameters
from lerobot_xvla.modeling_xvla import XVLAModel, load_for_inference
from lerobot_xvla.offline import TINY_FLORENCE_CONFIG
from lerobot_xvla.processor_xvla import make_xvla_pre_post_processors

STATE = "observation.state"
GiB = 2**30
# Transformers' own Florence-2 vision classes (Florence-2-base widths) and BART's text defaults.
NATIVE_FLORENCE = {"vision_config": {"model_type": "florence_vision"}, "text_config": {}}
# A tiny one in transformers' format, with the fields the remote-code format cannot set.
TINY_NATIVE_FLORENCE = {
    "vision_config": {"model_type": "florence_vision", "embed_dim": [16, 32, 64, 128], "num_heads": [2, 2, 2, 4],
                      "num_groups": [2, 2, 2, 4], "depths": [1, 2, 1, 1], "projection_dim": 64, "mlp_ratio": 3.0,
                      "qkv_bias": False},
    "text_config": TINY_FLORENCE_CONFIG["text_config"],
}  # fmt: skip


def built_parameters(config: XVLAConfig) -> int:
    with torch.device("meta"):  # shapes only: no memory, even for X-VLA-0.9B
        return sum(p.numel() for p in XVLAModel(config).parameters())


# ----------------------------------------------------------------------------------------------------------
# The parameter estimate and the memory bound
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [
    pytest.param(lambda: tiny_config(views=1), id="tiny"),
    pytest.param(lambda: tiny_config(action=9, action_mode="auto", max_action_dim=24, use_hetero_proj=True,
                                     len_soft_prompts=0, use_proprio=False, mlp_ratio=2.5), id="tiny-hetero-auto"),
    pytest.param(lambda: tiny_config(action=12, action_mode="so101_bimanual", num_domains=3, max_len_seq=300,
                                     florence_config=tiny_florence({"patch_prenorm": [True, False, True, False]})),
                 id="tiny-so101"),
    pytest.param(lambda: tiny_config(florence_config=TINY_NATIVE_FLORENCE), id="tiny-native-florence"),
    pytest.param(lambda: XVLAConfig(device="cpu"), id="X-VLA-0.9B"),
    pytest.param(lambda: XVLAConfig(device="cpu", florence_config=NATIVE_FLORENCE, hidden_size=768, depth=12, num_heads=12),
                 id="florence-2-base-widths"),
])  # fmt: skip
def test_the_parameter_estimate_is_the_built_networks_count(config):
    config = config()
    assert estimate_parameters(config) == built_parameters(config)


def test_the_default_config_is_x_vla_0_9b():
    assert estimate_parameters(XVLAConfig(device="cpu")) == 876_336_728


def test_a_network_beyond_this_machines_memory_is_refused_with_its_size():
    # Every field within its bound; together 8.3e11 parameters, more than any machine holds.
    with pytest.raises(XVLAConfigError, match=r"^this config has about 8\.3e\+11 parameters \(3\.3 TB in float32\), "
                                              r"more than this machine's [\d.]+ GiB of memory; check hidden_size"):
        XVLAConfig(device="cpu", hidden_size=16384, depth=256, num_heads=16)


def test_the_memory_bound_is_this_machines(monkeypatch):
    monkeypatch.setattr(configuration_xvla, "machine_memory", lambda: 2 * GiB)
    with pytest.raises(XVLAConfigError, match=re.escape(
            "this config has about 8.8e+08 parameters (3.5 GB in float32), more than this machine's 2.0 GiB of memory")):
        XVLAConfig(device="cpu")
    tiny_config(views=1)  # 4 MB
    XVLAConfig(device="cpu", inference_backend="onnxruntime")  # an ONNX export builds no torch network
    monkeypatch.setattr(configuration_xvla, "machine_memory", lambda: None)  # a platform that does not tell
    XVLAConfig(device="cpu")


def test_machine_memory_is_at_most_the_ram():
    memory = configuration_xvla.machine_memory()
    assert 0 < memory <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# ----------------------------------------------------------------------------------------------------------
# Upper bounds of every size, named
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("florence_config", "message"), [
    (tiny_florence({"depths": [1, 1, 1000, 1]}), "florence_config.vision_config.depths must hold integers <= 256 (far above Florence-2-large), got [1, 1, 1000, 1]"),
    (tiny_florence({"dim_embed": [16, 32, 64, 2**20], "num_heads": [2, 2, 2, 4], "num_groups": [2, 2, 2, 4]}), "florence_config.vision_config.dim_embed must hold integers <= 16384"),
    (tiny_florence({"patch_size": [7, 3, 3, 10**4]}), "florence_config.vision_config.patch_size must hold integers <= 64"),
    (tiny_florence({key: [1] * 17 for key in ("depths", "dim_embed", "num_heads", "num_groups", "patch_size", "patch_stride", "patch_padding", "patch_prenorm")}),
     "florence_config.vision_config.depths must list at most 16 DaViT stages, got 17"),
    (tiny_florence({"window_size": 10**6}), "florence_config.vision_config.window_size must be at most 1024"),
    (tiny_florence({"image_pos_embed": {"type": "learned_abs_2d", "max_pos_embeddings": 10**6}}), "florence_config.vision_config.image_pos_embed.max_pos_embeddings must be at most 4096 (far above Florence-2-large), got 1000000"),
    (tiny_florence({"visual_temporal_embedding": {"type": "COSINE", "max_temporal_embeddings": 10**9}}), "florence_config.vision_config.visual_temporal_embedding.max_temporal_embeddings must be at most 4096"),
    (tiny_florence(text={"vocab_size": 10**9}), "florence_config.text_config.vocab_size must be at most 1048576"),
    (tiny_florence(text={"encoder_layers": 10**6}), "florence_config.text_config.encoder_layers must be at most 256"),
    (tiny_florence(text={"encoder_ffn_dim": 10**7}), "florence_config.text_config.encoder_ffn_dim must be at most 65536"),
    (tiny_florence(text={"max_position_embeddings": 10**8}), "florence_config.text_config.max_position_embeddings must be at most 65536"),
    ({"vision_config": {**NATIVE_FLORENCE["vision_config"], "in_channels": 10**6}, "text_config": {}}, "florence_config.vision_config.in_channels must be 3 (the cameras are RGB), got 1000000"),
    ({"vision_config": {**NATIVE_FLORENCE["vision_config"], "mlp_ratio": float("nan")}, "text_config": {}}, r"florence_config.vision_config.mlp_ratio must be a number in \(0, 64\], got nan"),
])  # fmt: skip
def test_florence_sizes_beyond_their_bounds_are_refused_by_name(florence_config, message):
    with pytest.raises(XVLAConfigError, match=message if "\\(" in message else re.escape(message)):
        tiny_config(views=1, florence_config=florence_config)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"num_image_views": 33}, "num_image_views must be at most 32 (far above any published X-VLA's 3), got 33"),
    ({"image_size": (224, 5000)}, "image_size must be at most 4096 x 4096 pixels (the checkpoints see 224 x 224), got (224, 5000)"),
    ({"resize_imgs_with_padding": (10**6, 224)}, "resize_imgs_with_padding must be at most 4096 x 4096 pixels"),
    ({"anchor_horizon_s": 10.0**6, "anchor_fps": 50.0}, "anchor_horizon_s * anchor_fps must be at most 4096 frames (a sample loads every frame of the horizon), got 1000000.0 s * 50.0 fps = 5e+07"),
    ({"mlp_ratio": 1000.0}, "mlp_ratio must be at most 64 (far above any published X-VLA), got 1000.0"),
    ({"chunk_blend_steps": 10**6}, "chunk_blend_steps must be at most 4096 (far above any published X-VLA), got 1000000"),
])  # fmt: skip
def test_other_sizes_beyond_their_bounds_are_refused_by_name(overrides, message):
    with pytest.raises(XVLAConfigError, match=re.escape(message)):
        tiny_config(views=1, **overrides)


def test_cameras_and_empty_slots_beyond_the_view_bound_are_refused_when_the_features_are_checked():
    config = tiny_config(views=17, empty_cameras=16)
    with pytest.raises(XVLAConfigError, match=re.escape("num_image_views must be at most 32 (far above any published "
                                                        "X-VLA's 3), got 33 (the cameras and empty_cameras count as views)")):
        config.validate_features()  # what the policy runs with the dataset's features


def test_the_bounds_admit_the_published_configs_with_room(monkeypatch):
    """X-VLA-0.9B (every 2toINF/X-VLA-* and lerobot/xvla-* checkpoint), LeRobot's built-in defaults and an original
    config.json; then, memory aside (machine-dependent), each size at 4x the published one."""
    XVLAConfig(device="cpu")
    XVLAConfig(device="cpu", chunk_size=32, n_action_steps=32, tokenizer_max_length=64, max_state_dim=32)
    XVLAConfig(device="cpu", **original_config_to_lerobot({"florence_config": configuration_xvla.FLORENCE2_LARGE}))
    monkeypatch.setattr(configuration_xvla, "machine_memory", lambda: None)
    large = copy.deepcopy(configuration_xvla.FLORENCE2_LARGE)
    large["vision_config"]["depths"] = [4, 4, 36, 4]
    large["text_config"].update(encoder_layers=48, vocab_size=4 * 51289, encoder_ffn_dim=4 * 4096)
    XVLAConfig(
        device="cpu", florence_config=large, hidden_size=4096, depth=96, num_heads=64, num_domains=120,
        len_soft_prompts=128, chunk_size=120, n_action_steps=120, tokenizer_max_length=200, max_len_seq=2048,
        num_denoising_steps=40, max_state_dim=80, max_action_dim=80, num_image_views=12, empty_cameras=9,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Statistics that make sense
# ----------------------------------------------------------------------------------------------------------
def stats(**changes) -> dict:
    """Good state and action statistics, with changes given as feature__statistic=(index, value)."""
    good = {key: {"mean": torch.zeros(20), "std": torch.ones(20), "min": -torch.ones(20), "max": torch.ones(20),
                  "count": torch.tensor([5_000_000])} for key in (STATE, "action")}  # fmt: skip
    for name, (index, value) in changes.items():
        key, statistic = name.split("__")
        good[{"state": STATE}.get(key, key)][statistic][index] = value
    return good


@pytest.mark.parametrize(("changes", "message"), [
    ({"action__std": (0, 1e30)}, "the dataset statistics hold magnitudes beyond +-1e+06, the bound of robot states: action std[0]=1e+30"),
    ({"state__mean": (4, 1e30)}, "beyond +-1e+06, the bound of robot states: observation.state mean[4]=1e+30"),
    ({"action__min": (2, -1e7)}, "beyond +-1e+06, the bound of robot states: action min[2]=-1e+07"),
    ({"state__std": (3, 0.0)}, "the dataset statistics are impossible for any dataset: observation.state std[3]=0 but min[3]=-1 < max[3]=1 (only a constant channel has std 0)"),
])  # fmt: skip
def test_statistics_no_dataset_gives_are_refused_by_feature_statistic_and_index(tokenizer_dir, changes, message):
    config = tiny_config(views=1, tokenizer_name=tokenizer_dir)
    with pytest.raises(ValueError, match=re.escape(message)):
        make_xvla_pre_post_processors(config, dataset_stats=stats(**changes))


def test_a_std_of_zero_without_min_and_max_is_refused(tokenizer_dir):
    unverifiable = stats(state__std=(3, 0.0))
    del unverifiable[STATE]["min"], unverifiable[STATE]["max"]
    with pytest.raises(ValueError, match=re.escape("observation.state std[3]=0 but no min and max (only a constant")):
        make_xvla_pre_post_processors(tiny_config(views=1, tokenizer_name=tokenizer_dir), dataset_stats=unverifiable)


def test_a_constant_channel_has_std_zero_and_normalises_to_its_mean(tokenizer_dir):
    """A gripper that never moved: min == max, std 0. LeRobot's normaliser divides by std + 1e-8, so the constant
    maps to 0 and back to itself; a frame count above the magnitude bound is not a value of the feature."""
    constant = stats(state__std=(9, 0.0), state__min=(9, 0.5), state__max=(9, 0.5), state__mean=(9, 0.5),
                     action__std=(9, 0.0), action__min=(9, 0.5), action__max=(9, 0.5), action__mean=(9, 0.5))  # fmt: skip
    IDENTITY, MEAN_STD = NormalizationMode.IDENTITY, NormalizationMode.MEAN_STD
    mapping = {"VISUAL": IDENTITY, "STATE": MEAN_STD, "ACTION": MEAN_STD}
    config = tiny_config(views=1, tokenizer_name=tokenizer_dir, normalization_mapping=mapping)
    pre, post = make_xvla_pre_post_processors(config, dataset_stats=constant)
    state = torch.zeros(1, 20)
    state[0, 9] = 0.5
    out = pre({"observation.images.cam0": torch.rand(1, 3, 64, 64), STATE: state, "task": ["pick up the cube"]})
    assert out[STATE][0, 9] == 0
    assert post(torch.zeros(1, 20))[0, 9] == pytest.approx(0.5)


def test_statistics_edited_in_a_checkpoint_are_refused_at_load(tmp_path, tokenizer_dir):
    config = tiny_config(views=1, tokenizer_name=tokenizer_dir)
    XVLAPolicy(config).save_pretrained(tmp_path)
    for pipeline in make_xvla_pre_post_processors(config, dataset_stats=stats()):
        pipeline.save_pretrained(tmp_path)
    load_for_inference(tmp_path)
    (path,) = tmp_path.glob("policy_preprocessor_step_*_normalizer_processor.safetensors")
    tensors = load_file(str(path))
    tensors["action.std"][5] = 1e30
    save_file(tensors, str(path))
    message = "the checkpoint's preprocessor statistics hold magnitudes beyond +-1e+06, the bound of robot states: "
    with pytest.raises(ValueError, match=re.escape(message + "action std[5]=1e+30")):
        load_for_inference(tmp_path)


# ----------------------------------------------------------------------------------------------------------
# checkpoint_reinit
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer_dir):
    directory = tmp_path_factory.mktemp("reinit") / "checkpoint"
    XVLAPolicy(tiny_config(views=1, tokenizer_name=tokenizer_dir)).save_pretrained(directory)
    return directory


def with_reinit(saved, tmp_path, reinit, keep=None):
    """A copy of `saved` whose config.json lists `reinit` and whose model.safetensors holds only the `keep` tensors."""
    directory = tmp_path / "edited"
    shutil.copytree(saved, directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "checkpoint_reinit": reinit}))
    if keep is not None:
        tensors = load_file(str(directory / "model.safetensors"))
        save_file({k: v for k, v in tensors.items() if keep(k)}, str(directory / "model.safetensors"))
    return directory


@pytest.mark.parametrize("reinit", [
    ["vlm", "transformer"],
    ["transformer", "vlm.vision_tower", "vlm.multi_modal_projector", "vlm.language_model"],
    ["t", "v"],
])  # fmt: skip
def test_checkpoint_reinit_cannot_reinitialise_the_whole_model(saved, tmp_path, reinit):
    """The issue's attack: a model.safetensors of one tensor loaded as a randomly initialised policy."""
    directory = with_reinit(saved, tmp_path, reinit, keep=lambda key: key.endswith("transformer.norm.weight"))
    message = f"checkpoint_reinit {reinit} covers every parameter of the model: nothing of the checkpoint would load"
    with pytest.raises(CheckpointMismatchError, match=re.escape(message)):
        XVLAPolicy.from_pretrained(directory)


def test_checkpoint_reinit_must_name_a_part_of_the_model(saved, tmp_path):
    directory = with_reinit(saved, tmp_path, ["transformer.action_decoder", "transformer.action_head"])
    with pytest.raises(CheckpointMismatchError, match=re.escape(
            "checkpoint_reinit names 'transformer.action_head', which is no part of this model; its parts: "
            "transformer.action_decoder, transformer.action_encoder, transformer.aux_visual_proj, transformer.blocks, ")):
        XVLAPolicy.from_pretrained(directory)


GROWN = ["transformer.action_encoder", "transformer.soft_prompt_hub"]  # the per-domain tables, grown from 6 to 8


def test_what_checkpoint_reinit_reinitialised_is_a_warning_with_parameter_counts(caplog):
    source = XVLAPolicy(tiny_config(views=1, num_domains=6))
    state = {k: v for k, v in source.state_dict().items() if ".action_decoder." not in k}
    target = XVLAPolicy(tiny_config(views=1, num_domains=8))
    total = sum(p.numel() for p in target.parameters())
    with caplog.at_level(logging.WARNING, logger="lerobot_xvla.checkpoints"):
        load_state_dict_strict(target, state, reinit=[*GROWN, "transformer.action_decoder", "transformer.norm"])
    # The 2 new domain rows of the encoder, 2 x ((20 + 32 + 20) x 64 + 64), and of the prompts, 2 x 4 x 64; the whole
    # decoder, 8 x (64 x 20 + 20); the norm loads as saved.
    (record,) = [r for r in caplog.records if r.name == "lerobot_xvla.checkpoints"]
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        f"checkpoint_reinit: 20,256 of the model's {total:,} parameters keep their fresh initialisation "
        "(transformer.action_encoder: 9,344, transformer.soft_prompt_hub: 512, transformer.action_decoder: 10,400, "
        "transformer.norm: 0)"
    )
    assert torch.equal(target.model.transformer.norm.weight, source.model.transformer.norm.weight)
