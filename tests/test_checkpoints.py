"""Checkpoint layouts: LeRobot 0.4.x (built-in), LeRobot >= 0.6 (native), original 2toINF/X-VLA; strict loading."""

from __future__ import annotations

import json
import re

import pytest
import torch
from lerobot.policies.xvla.configuration_xvla import XVLAConfig as BuiltinConfig
from lerobot.policies.xvla.modeling_xvla import XVLAPolicy as BuiltinPolicy
from safetensors.torch import load_file, save_file

from lerobot_xvla import XVLAPolicy, builtin_xvla
from lerobot_xvla.checkpoints import (
    NATIVE,
    ORIGINAL,
    VENDORED,
    CheckpointMismatchError,
    detect_layout,
    to_native,
    to_vendored,
)
from lerobot_xvla.compat import SAVED_LAYOUT
from lerobot_xvla_cli import main as cli_main
from lerobot_xvla.offline import TINY_FLORENCE_CONFIG, build_word_tokenizer

from conftest import make_batch, randomize_, tiny_config, tiny_kwargs

IMAGE = (224, 224)  # what every checkpoint was trained at; our policy would resize anything else


def builtin_policy(views: int = 3, **overrides) -> BuiltinPolicy:
    with builtin_xvla():
        policy = BuiltinPolicy(BuiltinConfig(**tiny_kwargs(views, size=IMAGE, **overrides)))
    return randomize_(policy).eval()


def chunk(policy, batch, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return policy.predict_action_chunk(batch)


VENDORED_SHARED = "model.vlm.language_model.model.shared.weight"
VENDORED_SIGNATURES = ("model.vlm.image_projection", "model.vlm.language_model.final_logits_bias", VENDORED_SHARED)


def test_key_mapping_is_a_bijection():
    """Ours -> vendored -> ours is the identity, and both match the installed built-in's own keys."""
    ours = randomize_(XVLAPolicy(tiny_config(3, size=IMAGE))).state_dict()
    vendored = to_vendored(ours, vocab_size=1000)
    assert detect_layout(vendored) == VENDORED and detect_layout(ours) == NATIVE
    assert set(VENDORED_SIGNATURES[:2]) <= vendored.keys()
    back = to_native(vendored)
    assert back.keys() == ours.keys()
    assert all(torch.equal(back[k], ours[k]) for k in ours)
    builtin = builtin_policy().state_dict()  # vendored on LeRobot 0.4.x, native on 0.6.x
    assert to_native(builtin).keys() == ours.keys()
    assert all(to_native(builtin)[k].shape == ours[k].shape for k in ours)
    if detect_layout(builtin) == VENDORED:
        assert to_vendored(ours, vocab_size=1000).keys() == builtin.keys() - {VENDORED_SHARED}


def test_builtin_to_ours_to_builtin(tmp_path):
    builtin = builtin_policy()
    with builtin_xvla():
        builtin.save_pretrained(tmp_path / "builtin")
    ours = XVLAPolicy.from_pretrained(tmp_path / "builtin")
    batch = make_batch(ours.config)
    assert torch.equal(chunk(ours, batch), chunk(ours, batch))
    assert (chunk(ours, batch) - chunk(builtin, batch)).abs().max() <= 1e-5

    ours.save_pretrained(tmp_path / "ours")
    saved = lambda name: detect_layout(load_file(str(tmp_path / name / "model.safetensors")))  # noqa: E731
    assert saved("ours") == saved("builtin") == SAVED_LAYOUT  # the layout the installed LeRobot writes
    with builtin_xvla():
        again = BuiltinPolicy.from_pretrained(tmp_path / "ours")
    assert type(again) is BuiltinPolicy
    assert torch.equal(chunk(again, batch), chunk(builtin, batch))


def layout_state_dict(policy, layout: str) -> dict[str, torch.Tensor]:
    """The policy's weights as a checkpoint of `layout` stores them (tied text embedding once)."""
    full = to_native(policy.state_dict())  # ours or the installed built-in's, in our layout
    if layout == NATIVE:
        return {k: v.clone() for k, v in full.items() if k != "model.vlm.language_model.shared.weight"}
    vendored = to_vendored(full, vocab_size=1000)
    return vendored if layout == VENDORED else {k.removeprefix("model."): v for k, v in vendored.items()}


@pytest.mark.parametrize("layout", [VENDORED, NATIVE, ORIGINAL])
def test_loads_every_layout(tmp_path, layout):
    source = randomize_(XVLAPolicy(tiny_config(3, size=IMAGE)))
    source.config._save_pretrained(tmp_path)
    save_file(layout_state_dict(source, layout), str(tmp_path / "model.safetensors"))
    assert detect_layout(load_file(str(tmp_path / "model.safetensors"))) == layout
    loaded = XVLAPolicy.from_pretrained(tmp_path)
    batch = make_batch(source.config)
    assert torch.equal(chunk(loaded, batch), chunk(source.eval(), batch))


def write_original_checkpoint(builtin: BuiltinPolicy, directory, tokenizer: bool = True) -> None:
    """An X-VLA checkpoint as 2toINF/X-VLA-* repositories hold it: no `model.` prefix, original config."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file(layout_state_dict(builtin, ORIGINAL), str(directory / "model.safetensors"))
    cfg = builtin.config
    original = {
        "model_type": "xvla",
        "architectures": ["XVLA"],
        "florence_config": {**TINY_FLORENCE_CONFIG, "model_type": "florence2", "return_dict": True},
        "hidden_size": cfg.hidden_size,
        "depth": cfg.depth,
        "num_heads": cfg.num_heads,
        "mlp_ratio": cfg.mlp_ratio,
        "num_domains": cfg.num_domains,
        "len_soft_prompts": cfg.len_soft_prompts,
        "soft_prompt_length": cfg.len_soft_prompts,
        "dim_time": cfg.dim_time,
        "max_len_seq": cfg.max_len_seq,
        "use_hetero_proj": cfg.use_hetero_proj,
        "num_actions": cfg.chunk_size,
        "action_mode": cfg.action_mode,
        "use_proprio": True,
        "max_action_dim": 20,
        "real_action_dim": 20,
        "torch_dtype": "float32",
        "transformers_version": "4.51.3",
    }
    (directory / "config.json").write_text(json.dumps(original))
    if tokenizer:
        build_word_tokenizer(directory)


def original_batch(config, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    batch = {f"observation.images.image{i}": torch.randn(2, 3, *IMAGE, generator=generator) for i in range(3)}
    batch["observation.state"] = torch.randn(2, 20, generator=generator) * 0.1
    batch["observation.language.tokens"] = torch.randint(4, 1000, (2, config.tokenizer_max_length), generator=generator)
    return batch


def test_loads_the_original_format_directly(tmp_path):
    builtin = builtin_policy(3)
    write_original_checkpoint(builtin, tmp_path)
    ours = XVLAPolicy.from_pretrained(tmp_path)
    assert ours.config.chunk_size == 30 and ours.config.tokenizer_name == str(tmp_path)
    assert ours.config.camera_order == [f"observation.images.image{i}" for i in range(3)]
    batch = original_batch(ours.config)
    builtin_batch = {f"observation.images.cam{i}": batch[f"observation.images.image{i}"] for i in range(3)}
    builtin_batch.update({k: v for k, v in batch.items() if "images" not in k})
    assert (chunk(ours, batch) - chunk(builtin, builtin_batch)).abs().max() <= 1e-5


def test_convert_command_writes_a_lerobot_checkpoint(tmp_path, capsys):
    builtin = builtin_policy(3)
    write_original_checkpoint(builtin, tmp_path / "original")
    cli_main(["convert", str(tmp_path / "original"), str(tmp_path / "converted")])
    assert "wrote" in capsys.readouterr().out
    written = {p.name for p in (tmp_path / "converted").iterdir()}
    assert {"config.json", "model.safetensors", "policy_preprocessor.json", "policy_postprocessor.json"} <= written
    assert json.loads((tmp_path / "converted" / "config.json").read_text())["type"] == "xvla"
    assert detect_layout(load_file(str(tmp_path / "converted" / "model.safetensors"))) == SAVED_LAYOUT
    converted = XVLAPolicy.from_pretrained(tmp_path / "converted")
    direct = XVLAPolicy.from_pretrained(tmp_path / "original")
    batch = original_batch(converted.config)
    assert torch.equal(chunk(converted, batch), chunk(direct, batch))


def test_detects_the_original_layout():
    state = {"vlm.image_projection": torch.zeros(1), "transformer.pos_emb": torch.zeros(1)}
    assert detect_layout(state) == ORIGINAL


def test_mismatched_checkpoints_are_refused_with_the_keys(tmp_path):
    source = XVLAPolicy(tiny_config())
    state = dict(source.state_dict())
    state.pop("model.transformer.norm.weight")
    state["model.transformer.extra.weight"] = torch.zeros(3)
    state["model.transformer.pos_emb"] = torch.zeros(1, 100, 64)
    source.config._save_pretrained(tmp_path)
    save_file({k: v.clone() for k, v in state.items() if not k.endswith("language_model.shared.weight")}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError) as error:
        XVLAPolicy.from_pretrained(tmp_path)
    message = str(error.value)
    assert "missing keys: model.transformer.norm.weight" in message
    assert "unexpected keys: model.transformer.extra.weight" in message
    assert "shape mismatches: model.transformer.pos_emb: checkpoint (1, 100, 64) vs model (1, 512, 64)" in message


def test_more_domains_and_another_action_width_on_purpose(tmp_path):
    source = randomize_(XVLAPolicy(tiny_config(action=9, action_mode="auto", max_action_dim=20)))
    source.save_pretrained(tmp_path)
    reinit = ["transformer.soft_prompt_hub", "transformer.action_encoder", "transformer.action_decoder"]
    grown = tiny_config(action=9, action_mode="auto", max_action_dim=24, num_domains=12, checkpoint_reinit=reinit)
    with pytest.raises(CheckpointMismatchError, match=re.escape("model.transformer.soft_prompt_hub.weight: checkpoint (8, 256) vs model (12, 256)")):
        XVLAPolicy.from_pretrained(tmp_path, config=tiny_config(action=9, action_mode="auto", num_domains=12))
    loaded = XVLAPolicy.from_pretrained(tmp_path, config=grown)
    old, new = source.model.transformer, loaded.model.transformer
    assert torch.equal(new.soft_prompt_hub.weight[:8], old.soft_prompt_hub.weight)
    assert not torch.equal(new.soft_prompt_hub.weight[8:], torch.zeros_like(new.soft_prompt_hub.weight[8:]))
    assert new.action_decoder.fc.weight.shape == (12, 64 * 24)  # re-initialised for the wider action
    assert torch.equal(new.blocks[0].attn.qkv.weight, old.blocks[0].attn.qkv.weight)
