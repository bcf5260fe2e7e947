"""Faithful config translation: a checkpoint's config reads as the code that wrote it read it.

Fields a `florence_config` leaves out take the defaults of the writer's config classes: Microsoft's
remote-code Florence-2 classes for LeRobot 0.4.x (Florence-2-large, a 1000-row image position table, a
51289-token vocabulary), transformers' for LeRobot >= 0.6 (Florence-2-base widths, 50 rows, BART's 50265
tokens), the original X-VLA's for its config.json. Checkpoints are also refused when a tensor's dtype kind or
values could not be what the model holds.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from lerobot.policies.xvla.configuration_xvla import XVLAConfig as BuiltinConfig
from lerobot.policies.xvla.modeling_xvla import XVLAPolicy as BuiltinPolicy
from safetensors.torch import load_file, save_file

from lerobot_xvla import XVLAPolicy, builtin_xvla
from lerobot_xvla.checkpoints import CheckpointMismatchError, checkpoint_florence_config, to_native, to_vendored
from lerobot_xvla.compat import LEROBOT_06
from lerobot_xvla.florence import (
    ORIGINAL_XVLA,
    REMOTE_CODE,
    TRANSFORMERS,
    complete_florence_config,
    native_florence_config,
)
from lerobot_xvla.modeling_xvla import load_config
from lerobot_xvla.offline import TINY_FLORENCE_CONFIG

from conftest import features, make_batch, randomize_, tiny_config, tiny_kwargs

IMAGE = (224, 224)
TOLERANCE = 1e-5
TINY_TRANSFORMER = {"hidden_size": 64, "depth": 2, "num_heads": 4, "num_domains": 8, "len_soft_prompts": 4}

# A tiny Florence-2 that writes out only its sizes: every other field takes its reader's default.
MINIMAL_FLORENCE = {
    "vision_config": {
        "dim_embed": [16, 32, 64, 128], "num_heads": [2, 2, 2, 4], "num_groups": [2, 2, 2, 4],
        "depths": [1, 1, 1, 1], "projection_dim": 64,
    },
    "text_config": {
        "d_model": 64, "encoder_layers": 2, "encoder_ffn_dim": 128, "encoder_attention_heads": 2,
        "decoder_layers": 1, "decoder_ffn_dim": 128, "decoder_attention_heads": 2,
    },
    # LeRobot 0.4.x sizes the transformer's input projection from here (default 1024, too wide for this encoder).
    "projection_dim": 64,
}  # fmt: skip
# What each reader fills in: (image position rows, vocabulary, DaViT widths).
EXPECTED = {REMOTE_CODE: (1000, 51289, [16, 32, 64, 128]), TRANSFORMERS: (50, 50265, [16, 32, 64, 128])}


def chunk(policy, batch, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return policy.predict_action_chunk(batch)


def architecture(florence_config: dict, defaults: str | None = None) -> tuple[int, int, list[int]]:
    config = native_florence_config(florence_config, defaults)
    vision = config.vision_config
    return vision.max_position_embeddings, config.text_config.vocab_size, list(vision.embed_dim)


# ----------------------------------------------------------------------------------------------------------
# Defaults of each reader
# ----------------------------------------------------------------------------------------------------------
def test_missing_fields_take_the_defaults_of_the_writer():
    assert architecture(MINIMAL_FLORENCE) == EXPECTED[REMOTE_CODE]  # the remote-code format's own classes
    for defaults, expected in EXPECTED.items():
        assert architecture(MINIMAL_FLORENCE, defaults) == expected
    # Nothing written: Florence-2-large for Microsoft's classes, Florence-2-base widths for transformers'.
    empty = {"vision_config": {}, "text_config": {}}
    assert architecture(empty, REMOTE_CODE) == (1000, 51289, [256, 512, 1024, 2048])
    assert architecture(empty, TRANSFORMERS) == (50, 50265, [128, 256, 512, 1024])
    # A field that is written wins over every default, and a null counts as left out.
    written = copy.deepcopy(MINIMAL_FLORENCE)
    written["vision_config"]["image_pos_embed"] = {"type": "learned_abs_2d", "max_pos_embeddings": 50}
    written["text_config"]["vocab_size"] = None
    assert architecture(written, REMOTE_CODE) == (50, 51289, [16, 32, 64, 128])


def test_original_configs_need_their_position_tables():
    with pytest.raises(ValueError, match="florence_config.vision_config has no image_pos_embed or visual_temporal_embedding"):
        complete_florence_config(MINIMAL_FLORENCE, ORIGINAL_XVLA)
    tiny = {part: TINY_FLORENCE_CONFIG[part] for part in ("vision_config", "text_config")}
    assert complete_florence_config(tiny, ORIGINAL_XVLA)["vision_config"]["image_pos_embed"]["max_pos_embeddings"] == 50


def test_remote_code_defaults_are_lerobot_04_vendored_classes():
    """The table we fill remote-code configs from is what LeRobot 0.4.x's vendored Microsoft classes default to."""
    vendored = pytest.importorskip("lerobot.policies.xvla.configuration_florence2")  # LeRobot 0.4.x only
    completed = complete_florence_config({"vision_config": {}, "text_config": {}}, REMOTE_CODE)
    vision, text = vendored.Florence2VisionConfig(), vendored.Florence2LanguageConfig()
    assert completed["vision_config"] == {k: getattr(vision, k) for k in completed["vision_config"]}
    assert completed["text_config"] == {k: getattr(text, k) for k in completed["text_config"]}


def test_the_saved_florence_config_writes_every_field(tmp_path):
    config = tiny_config(florence_config=copy.deepcopy(MINIMAL_FLORENCE))
    config._save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["florence_config"]
    assert saved == complete_florence_config(MINIMAL_FLORENCE)
    # The same architecture whichever reader's defaults apply: nothing is left to them.
    assert architecture(saved, REMOTE_CODE) == architecture(saved, TRANSFORMERS) == EXPECTED[REMOTE_CODE]


# ----------------------------------------------------------------------------------------------------------
# Checkpoints of LeRobot's built-in X-VLA, whose config leaves out what its classes default
# ----------------------------------------------------------------------------------------------------------
def minimal_builtin_checkpoint(directory) -> BuiltinPolicy:
    """The installed built-in, configured with what it requires (a florence_config and the features) plus a
    tiny transformer; chunk_size, tokenizer_max_length, max_state_dim, ... keep its own defaults."""
    inputs, outputs = features(2, size=IMAGE)
    with builtin_xvla():
        config = BuiltinConfig(
            florence_config=copy.deepcopy(MINIMAL_FLORENCE), input_features=inputs, output_features=outputs,
            device="cpu", push_to_hub=False, **TINY_TRANSFORMER,
        )  # fmt: skip
        policy = randomize_(BuiltinPolicy(config)).eval()
        policy.save_pretrained(directory)
    return policy


def builtin_parity(builtin: BuiltinPolicy, ours: XVLAPolicy) -> float:
    batch = make_batch(ours.config)
    expected, actual = chunk(builtin, batch), chunk(ours, batch)
    assert actual.shape == expected.shape == (2, 32, 20)  # the built-in's default chunk_size
    return (actual - expected).abs().max().item()


def test_builtin_checkpoint_with_a_minimal_florence_config(tmp_path):
    """The weights' layout tells which built-in wrote the checkpoint, hence whose defaults its config means."""
    builtin = minimal_builtin_checkpoint(tmp_path)
    config = load_config(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    config.florence_config = checkpoint_florence_config(config.florence_config, tmp_path, weights)
    assert architecture(config.florence_config) == EXPECTED[TRANSFORMERS if LEROBOT_06 else REMOTE_CODE]
    ours = XVLAPolicy.from_pretrained(tmp_path, config=config)
    assert builtin_parity(builtin, ours) <= TOLERANCE


    assert builtin_parity(builtin, XVLAPolicy.from_pretrained(tmp_path)) <= TOLERANCE


def test_our_checkpoints_keep_our_reading(tmp_path):
    """A run resumed from train_config.json, which keeps the florence_config as it was given, rebuilds what we
    saved in either layout: our config.json writes every field, so no built-in's defaults apply."""
    XVLAPolicy(tiny_config(florence_config=copy.deepcopy(MINIMAL_FLORENCE))).save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    completed = checkpoint_florence_config(MINIMAL_FLORENCE, tmp_path, weights)
    assert completed == complete_florence_config(MINIMAL_FLORENCE) and architecture(completed) == EXPECTED[REMOTE_CODE]


def test_the_installed_builtin_reads_our_checkpoint_of_a_minimal_config(tmp_path):
    ours = randomize_(XVLAPolicy(tiny_config(size=IMAGE, florence_config=copy.deepcopy(MINIMAL_FLORENCE)))).eval()
    ours.save_pretrained(tmp_path)
    with builtin_xvla():
        builtin = BuiltinPolicy.from_pretrained(tmp_path).eval()
    batch = make_batch(ours.config)
    assert (chunk(builtin, batch) - chunk(ours, batch)).abs().max().item() <= TOLERANCE


# ----------------------------------------------------------------------------------------------------------
# Original 2toINF/X-VLA checkpoints, one per action mode, with a minimal config.json
# ----------------------------------------------------------------------------------------------------------
# mode -> (model width = proprio width, robot width, the real_action_dim the original writes)
ORIGINAL_MODES = {
    "ee6d": (20, 20, 20),
    "joint": (14, 14, 20),  # the original writes its default real_action_dim, which only `auto` reads
    "agibot_ee6d": (20, 20, 20),
    "auto": (20, 9, 9),
    "franka_joint7": (20, 7, 20),  # LeRobot's mode, not in the original's registry
}
# The tiny Florence-2 without the fields whose defaults agree in every reader (patch layout, window, dropout, ...).
ORIGINAL_FLORENCE = {
    "vision_config": {
        k: TINY_FLORENCE_CONFIG["vision_config"][k]
        for k in ("dim_embed", "num_heads", "num_groups", "depths", "projection_dim", "image_pos_embed", "visual_temporal_embedding")
    },
    "text_config": {
        k: TINY_FLORENCE_CONFIG["text_config"][k]
        for k in ("vocab_size", "max_position_embeddings", "d_model", "encoder_layers", "encoder_ffn_dim", "encoder_attention_heads")
    },
}


def write_minimal_original_checkpoint(directory, mode: str) -> BuiltinPolicy:
    """An original-format checkpoint whose config.json writes only what differs from the original's defaults
    (num_actions, dim_time, max_len_seq, ... left out), with the weights of an equivalent built-in policy."""
    model_width, robot_width, real_action_dim = ORIGINAL_MODES[mode]
    kwargs = tiny_kwargs(3, state=model_width, action=robot_width, size=IMAGE, action_mode=mode, max_state_dim=model_width)
    with builtin_xvla():
        builtin = randomize_(BuiltinPolicy(BuiltinConfig(**kwargs))).eval()
    directory.mkdir(parents=True, exist_ok=True)
    vendored = to_vendored(to_native(builtin.state_dict()), vocab_size=1000)
    save_file({k.removeprefix("model."): v for k, v in vendored.items()}, str(directory / "model.safetensors"))
    original = {"model_type": "xvla", "florence_config": ORIGINAL_FLORENCE, **TINY_TRANSFORMER, "real_action_dim": real_action_dim}
    if mode != "ee6d":
        original["action_mode"] = mode
    (directory / "config.json").write_text(json.dumps(original))
    return builtin


@pytest.mark.parametrize("mode", sorted(ORIGINAL_MODES))
def test_minimal_original_checkpoint_of_every_action_mode(tmp_path, mode):
    builtin = write_minimal_original_checkpoint(tmp_path, mode)
    config = load_config(tmp_path)
    assert (config.chunk_size, config.action_mode, config.max_state_dim) == (30, mode, ORIGINAL_MODES[mode][0])
    ours = XVLAPolicy.from_pretrained(tmp_path, config=config)
    generator = torch.Generator().manual_seed(0)
    batch = {f"observation.images.image{i}": torch.randn(2, 3, *IMAGE, generator=generator) for i in range(3)}
    batch["observation.state"] = torch.randn(2, ORIGINAL_MODES[mode][0], generator=generator) * 0.1
    batch["observation.language.tokens"] = torch.randint(4, 1000, (2, config.tokenizer_max_length), generator=generator)
    actions = chunk(ours, batch)
    assert actions.shape == (2, 30, ORIGINAL_MODES[mode][1]) and bool(actions.isfinite().all())
    builtin_batch = {k.replace("images.image", "images.cam"): v for k, v in batch.items()}
    assert (actions - chunk(builtin, builtin_batch)).abs().max().item() <= TOLERANCE


# ----------------------------------------------------------------------------------------------------------
# Tensors that cannot be what the model holds
# ----------------------------------------------------------------------------------------------------------
def resave(directory, change) -> None:
    path = str(directory / "model.safetensors")
    weights = load_file(path)
    change(weights)
    save_file(weights, path)


POS_EMB = "model.transformer.pos_emb"


def test_an_integer_tensor_where_the_model_holds_floats_is_refused(tmp_path):
    randomize_(XVLAPolicy(tiny_config())).save_pretrained(tmp_path)
    resave(tmp_path, lambda w: w.update({POS_EMB: (w[POS_EMB] * 100).long()}))
    with pytest.raises(CheckpointMismatchError, match=f"another kind than the model's .*{POS_EMB}: checkpoint torch.int64 vs model torch.float32"):
        XVLAPolicy.from_pretrained(tmp_path)


def test_lower_float_precisions_load_cast(tmp_path):
    source = randomize_(XVLAPolicy(tiny_config()))
    source.save_pretrained(tmp_path)
    resave(tmp_path, lambda w: w.update({POS_EMB: w[POS_EMB].to(torch.bfloat16)}))
    loaded = XVLAPolicy.from_pretrained(tmp_path)
    assert torch.equal(loaded.model.transformer.pos_emb, source.model.transformer.pos_emb.to(torch.bfloat16).float())


def test_non_finite_weights_are_refused(tmp_path):
    randomize_(XVLAPolicy(tiny_config())).save_pretrained(tmp_path)

    def poison(weights):
        weights[POS_EMB][0, 3, 1] = float("nan")
        weights["model.transformer.norm.weight"][0] = float("inf")

    resave(tmp_path, poison)
    with pytest.raises(CheckpointMismatchError, match="NaN or infinite values in") as error:
        XVLAPolicy.from_pretrained(tmp_path)
    assert sorted(str(error.value).split(" in ")[-1].split(", ")) == ["model.transformer.norm.weight", POS_EMB]

