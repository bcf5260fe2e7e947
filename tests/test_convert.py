"""`lerobot-xvla convert` keeps everything a checkpoint has and never loses data; the checkpoints we save
carry their tokenizer (no path of the saving machine in their JSON) and load anywhere, offline."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from lerobot.configs.policies import PreTrainedConfig
from lerobot.configs.types import FeatureType, PolicyFeature
from lerobot.policies.factory import make_pre_post_processors
from lerobot.processor import NormalizerProcessorStep, UnnormalizerProcessorStep

from lerobot_xvla import XVLAConfig, XVLAPolicy
from lerobot_xvla_cli import main as cli_main
from lerobot_xvla.demo import lerobot_command
from lerobot_xvla.modeling_xvla import load_for_inference
from lerobot_xvla.offline import TINY_ARCHITECTURE, build_word_tokenizer
from lerobot_xvla.processor_xvla import ActionGuardStep, make_xvla_pre_post_processors

from conftest import LEROBOT_ENV, randomize_

CAMERA = "observation.images.top"
# A joint-space robot far from the origin: MEAN_STD statistics move every action by hundreds of units.
MEAN = 262.0 + torch.arange(14, dtype=torch.float32)
STATS = {
    key: {"mean": MEAN.clone(), "std": torch.full((14,), 3.0), "min": MEAN - 5, "max": MEAN + 5}
    for key in ("observation.state", "action")
}


def joint_config(tokenizer: Path) -> XVLAConfig:
    """A tiny X-VLA for a 14-joint robot with one camera; action_mode=auto normalises with MEAN_STD."""
    return XVLAConfig(
        **copy.deepcopy(TINY_ARCHITECTURE),
        action_mode="auto",
        tokenizer_name=str(tokenizer),
        device="cpu",
        push_to_hub=False,
        input_features={
            CAMERA: PolicyFeature(FeatureType.VISUAL, (3, 64, 64)),
            "observation.state": PolicyFeature(FeatureType.STATE, (14,)),
        },
        output_features={"action": PolicyFeature(FeatureType.ACTION, (14,))},
    )


def save_checkpoint(directory: Path, tokenizer: Path, seed: int = 1) -> Path:
    """A checkpoint written the way lerobot-train writes one: policy.save_pretrained, then both processors."""
    config = joint_config(tokenizer)
    randomize_(XVLAPolicy(config), seed=seed).save_pretrained(directory)
    for pipeline in make_xvla_pre_post_processors(config, dataset_stats=STATS):
        pipeline.save_pretrained(directory)
    return directory


@pytest.fixture
def tokenizer(tmp_path) -> Path:
    """A tokenizer directory of this test alone (some tests delete it)."""
    return build_word_tokenizer(tmp_path / "tokenizer_files")


@pytest.fixture
def source(tmp_path, tokenizer) -> Path:
    return save_checkpoint(tmp_path / "source", tokenizer)


def observation() -> dict:
    generator = torch.Generator().manual_seed(0)
    return {
        CAMERA: torch.randint(0, 256, (3, 64, 64), generator=generator, dtype=torch.uint8),
        "observation.state": MEAN + torch.randn(14, generator=generator),
        "task": "pick up the red cube",
    }


def act(policy, preprocessor, postprocessor) -> torch.Tensor:
    """The action chunk a robot receives for `observation()`, in its own units (same noise every call)."""
    torch.manual_seed(0)
    return postprocessor(policy.predict_action_chunk(preprocessor(observation())))


def loaded_action(checkpoint: Path) -> torch.Tensor:
    return act(*load_for_inference(checkpoint))


def files(directory: Path) -> dict[str, bytes] | None:
    """Every file under `directory` with its bytes; None when the directory does not exist."""
    if not directory.exists():
        return None
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def convert(*args: str) -> subprocess.CompletedProcess:
    """`lerobot-xvla convert ...` as a user runs it."""
    command = [lerobot_command("lerobot-xvla"), "convert", *args]
    return subprocess.run(command, capture_output=True, text=True, env=LEROBOT_ENV, timeout=600)


def guard(postprocessor) -> ActionGuardStep:
    return next(s for s in postprocessor.steps if isinstance(s, ActionGuardStep))


def saved_tokenizer_name(checkpoint: Path) -> str:
    """The tokenizer name in a checkpoint's preprocessor file (LeRobot's tokenizer step)."""
    steps = json.loads((checkpoint / "policy_preprocessor.json").read_text())["steps"]
    return next(s for s in steps if s["registry_name"] == "tokenizer_processor")["config"]["tokenizer_name"]


def step_stats(pipeline, step_type) -> dict[str, dict[str, torch.Tensor]]:
    return next(s for s in pipeline.steps if isinstance(s, step_type))._tensor_stats


# ---------------------------------------------------------------------------------------------------------
# Nothing is lost
# ---------------------------------------------------------------------------------------------------------
def test_convert_keeps_the_statistics_and_the_action_guard(source, tmp_path):
    result = convert(str(source), str(tmp_path / "converted"))
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"wrote {tmp_path / 'converted'}" in result.stdout
    policy, pre, post = load_for_inference(tmp_path / "converted")
    _, source_pre, source_post = load_for_inference(source)
    pairs = ((pre, source_pre, NormalizerProcessorStep), (post, source_post, UnnormalizerProcessorStep))
    for pipeline, source_pipeline, step in pairs:
        converted_stats, source_stats = step_stats(pipeline, step), step_stats(source_pipeline, step)
        assert converted_stats.keys() == source_stats.keys() == {"observation.state", "action"}
        for key, stats in source_stats.items():
            assert all(torch.equal(converted_stats[key][name], value) for name, value in stats.items()), key
    assert guard(post).low == (MEAN - 5).tolist() and guard(post).high == (MEAN + 5).tolist()
    action = act(policy, pre, post)
    assert torch.equal(action, loaded_action(source))
    assert (action - MEAN).abs().max() <= 5  # in the robot's units, inside the training range
    assert post(torch.full((1, 14), 100.0)).tolist() == [(MEAN + 5).tolist()]  # 100 normalised units: clamped


# ---------------------------------------------------------------------------------------------------------
# Refusals: exact message, exit status 2, source and destination untouched
# ---------------------------------------------------------------------------------------------------------
def refused(capsys, *args: str) -> str:
    assert cli_main(["convert", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    return captured.err


@pytest.mark.parametrize("command", ["convert", "export", "serve"])
def test_a_source_that_is_not_a_checkpoint_is_named_in_one_line(command, source, tmp_path, capsys, monkeypatch):
    """A missing path, a file, a directory without config.json, one without weights, a Hub id that is neither
    here nor in the offline cache: each is said in one line, exit status 2, nothing written."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "file.json").write_text("{}")
    (tmp_path / "not_a_checkpoint").mkdir()
    weightless = tmp_path / "weightless"
    shutil.copytree(source, weightless)
    (weightless / "model.safetensors").unlink()
    cases = {
        str(tmp_path / "missing"): f"'{tmp_path / 'missing'}' does not exist (and is not a Hub id)",
        str(tmp_path / "file.json"): f"'{tmp_path / 'file.json'}' is a file; expected a checkpoint directory (config.json, model.safetensors) or a Hub id",
        str(tmp_path / "not_a_checkpoint"): f"'{tmp_path / 'not_a_checkpoint'}' is a directory but not an X-VLA checkpoint: it has no config.json",
        str(weightless): f"'{weightless}' has a config.json but no model.safetensors: not a complete X-VLA checkpoint",
        "outputs/nope": "'outputs/nope' is not a directory here, and as a Hub id it is not in the local Hugging Face cache "
                        "(offline: HF_HUB_OFFLINE=1, or the Hub cannot be reached)",
    }
    for name, message in cases.items():
        destination = tmp_path / "destination"
        argv = [command, name] + ([str(destination)] if command != "serve" else ["--port", "0"])
        assert cli_main(argv) == 2, name
        captured = capsys.readouterr()
        assert captured.err == f"lerobot-xvla {command}: error: {message}\n"
        assert not destination.exists()


def test_convert_refuses_its_source_as_destination(source, tmp_path, capsys):
    before = files(source)
    (tmp_path / "link").symlink_to(source)
    expected = (
        f"lerobot-xvla convert: error: the destination {source} is the source checkpoint; "
        "write the converted checkpoint to another directory\n"
    )
    assert refused(capsys, str(source), str(source)) == expected
    # The same directory through a symbolic link, even with --overwrite.
    assert refused(capsys, str(source), str(tmp_path / "link"), "--overwrite") == expected
    assert files(source) == before


def test_convert_refuses_a_destination_inside_its_source(source, capsys):
    before = files(source)
    inside = source / "converted"
    expected = (
        f"lerobot-xvla convert: error: the destination {inside} is inside the source checkpoint {source}; "
        "write the converted checkpoint outside it\n"
    )
    assert refused(capsys, str(source), str(inside)) == expected
    assert files(source) == before and not inside.exists()


def test_convert_refuses_to_replace_a_destination_that_holds_its_source(tmp_path, tokenizer, capsys):
    source = save_checkpoint(tmp_path / "runs" / "source", tokenizer)
    before = files(tmp_path / "runs")
    expected = (
        f"lerobot-xvla convert: error: the source checkpoint {source} is inside the destination {tmp_path / 'runs'}; "
        "replacing the destination would delete it\n"
    )
    assert refused(capsys, str(source), str(tmp_path / "runs"), "--overwrite") == expected
    assert files(tmp_path / "runs") == before


def test_convert_refuses_a_non_empty_destination(source, tmp_path, tokenizer):
    destination = tmp_path / "other_checkpoint"
    save_checkpoint(destination, tokenizer, seed=2)
    before = files(destination)
    result = convert(str(source), str(destination))
    assert result.returncode == 2
    assert result.stderr == (
        f"lerobot-xvla convert: error: the destination {destination} is not empty; pass --overwrite to replace it\n"
    )
    assert files(destination) == before


def test_convert_refuses_a_file_as_destination(source, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("keep me")
    expected = f"lerobot-xvla convert: error: the destination {tmp_path / 'notes.txt'} is not a directory\n"
    assert refused(capsys, str(source), str(tmp_path / "notes.txt"), "--overwrite") == expected
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_every_convert_option_shows_its_default(capsys):
    with pytest.raises(SystemExit) as exit_status:
        cli_main(["convert", "--help"])
    assert exit_status.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--device DEVICE" in text and "(default: cpu)" in text
    assert "--overwrite" in text and "(default: False)" in text


# ---------------------------------------------------------------------------------------------------------
# Writing: whole or not at all
# ---------------------------------------------------------------------------------------------------------
def test_overwrite_replaces_the_destination_whole(source, tmp_path):
    destination = tmp_path / "converted"
    destination.mkdir()
    (destination / "stale_weights.safetensors").write_bytes(b"from another checkpoint")
    (destination / "notes").mkdir()
    (destination / "notes" / "todo.txt").write_text("old")
    siblings = {p.name for p in tmp_path.iterdir()}
    assert cli_main(["convert", str(source), str(destination), "--overwrite"]) == 0
    written = set(files(destination))
    assert {"config.json", "model.safetensors", "policy_preprocessor.json", "policy_postprocessor.json"} <= written
    assert not {"stale_weights.safetensors", "notes/todo.txt"} & written
    assert {p.name for p in tmp_path.iterdir()} == siblings  # no temporary directory left behind
    assert torch.equal(loaded_action(destination), loaded_action(source))


def test_an_empty_destination_directory_is_used(source, tmp_path):
    (tmp_path / "empty").mkdir()
    assert cli_main(["convert", str(source), str(tmp_path / "empty")]) == 0
    assert torch.equal(loaded_action(tmp_path / "empty"), loaded_action(source))


@pytest.mark.parametrize("old_destination", [False, True], ids=["no_destination", "old_destination"])
def test_a_failed_conversion_leaves_the_destination_as_it_was(tmp_path, tokenizer, old_destination, capsys):
    """config.json of one architecture, weights of another: loading fails before anything is written (a full
    disk while writing: test_cli_filesystem.py)."""
    destination = tmp_path / "converted"
    if old_destination:
        save_checkpoint(destination, tokenizer, seed=2)  # other weights than the source's
    source = save_checkpoint(tmp_path / "broken", tokenizer)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "depth": 3}))
    before, siblings = files(destination), {p.name for p in tmp_path.iterdir()}
    assert cli_main(["convert", str(source), str(destination), "--overwrite"]) == 2  # a CheckpointMismatchError, in one line
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert error.startswith("lerobot-xvla convert: error: the checkpoint does not match the model built from the config")
    assert files(destination) == before  # the old checkpoint, or still no directory
    assert {p.name for p in tmp_path.iterdir()} == siblings  # no temporary directory left behind


# ---------------------------------------------------------------------------------------------------------
# Self-contained checkpoints
# ---------------------------------------------------------------------------------------------------------
def written_by(how: str, source: Path, tmp_path: Path) -> Path:
    if how == "save_pretrained":
        return source
    assert cli_main(["convert", str(source), str(tmp_path / "converted")]) == 0
    return tmp_path / "converted"


@pytest.mark.parametrize("how", ["save_pretrained", "convert"])
def test_no_json_of_a_checkpoint_names_the_tokenizer_directory(how, source, tmp_path, tokenizer):
    checkpoint = written_by(how, source, tmp_path)
    documents = sorted(checkpoint.rglob("*.json"))
    assert {p.name for p in documents} >= {"config.json", "policy_preprocessor.json", "tokenizer_config.json"}
    for document in documents:
        text = document.read_text()
        assert str(tmp_path) not in text and str(tmp_path.resolve()) not in text, document
    assert json.loads((checkpoint / "config.json").read_text())["tokenizer_name"] == "tokenizer"
    assert saved_tokenizer_name(checkpoint) == "tokenizer"
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in (checkpoint / "tokenizer").iterdir()}


@pytest.mark.parametrize("how", ["save_pretrained", "convert"])
def test_a_copied_checkpoint_loads_without_the_tokenizer_directory(how, source, tmp_path, tokenizer):
    checkpoint = written_by(how, source, tmp_path)
    policy, pre, post = load_for_inference(checkpoint)
    expected, tokens = act(policy, pre, post), pre(observation())["observation.language.tokens"]
    assert 3 not in tokens[0, :6].tolist()  # "pick up the red cube" as words of the vocabulary, not <unk>
    moved = tmp_path / "another_machine" / "checkpoint"
    shutil.copytree(checkpoint, moved)
    shutil.rmtree(tokenizer)
    shutil.rmtree(checkpoint)
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # nothing may come from the Hub

    assert torch.equal(loaded_action(moved), expected)  # load_for_inference
    # As lerobot-eval and lerobot-train --policy.path load it: the config from config.json, pretrained_path set.
    config = PreTrainedConfig.from_pretrained(moved)
    config.pretrained_path = moved
    policy = XVLAPolicy.from_pretrained(moved, config=config)
    cpu = {"device_processor": {"device": "cpu"}}
    pre, post = make_pre_post_processors(config, pretrained_path=str(moved), preprocessor_overrides=cpu)
    assert torch.equal(act(policy, pre, post), expected)
    fresh_pre, _ = make_xvla_pre_post_processors(config)  # the config names the checkpoint's copy too
    assert torch.equal(fresh_pre(observation())["observation.language.tokens"], tokens)
    assert torch.equal(act(XVLAPolicy.from_pretrained(moved), pre, post), expected)  # config read by the policy


def test_a_checkpoint_saved_again_carries_the_tokenizer_on(source, tmp_path, tokenizer):
    """Fine-tuning saves processors loaded from a checkpoint: the new checkpoint has its own copy."""
    config = PreTrainedConfig.from_pretrained(source)
    config.pretrained_path = source
    pre, post = make_pre_post_processors(config, pretrained_path=str(source))
    XVLAPolicy.from_pretrained(source, config=config).save_pretrained(tmp_path / "finetuned")
    pre.save_pretrained(tmp_path / "finetuned")
    post.save_pretrained(tmp_path / "finetuned")
    expected = loaded_action(source)
    shutil.rmtree(tokenizer)
    shutil.rmtree(source)
    assert saved_tokenizer_name(tmp_path / "finetuned") == "tokenizer"
    assert torch.equal(loaded_action(tmp_path / "finetuned"), expected)
