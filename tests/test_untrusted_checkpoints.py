"""A checkpoint is untrusted input: loading one runs no code it names and reads no file outside it, while the
checkpoints LeRobot and we write keep loading, and LeRobot's built-in X-VLA classes keep working beside ours."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from lerobot.configs.policies import PreTrainedConfig
from lerobot.configs.types import FeatureType, PolicyFeature
from lerobot.policies.act.configuration_act import ACTConfig
from lerobot.policies.act.processor_act import make_act_pre_post_processors
from lerobot.policies.factory import make_pre_post_processors
from lerobot.policies.xvla.configuration_xvla import XVLAConfig as BuiltinConfig
from lerobot.policies.xvla.modeling_xvla import XVLAPolicy as BuiltinPolicy
from lerobot.policies.xvla.processor_xvla import LiberoProcessorStep
from lerobot.processor import PolicyProcessorPipeline, TokenizerProcessorStep

from lerobot_xvla import XVLAConfig, XVLAPolicy
from lerobot_xvla.compat import LEROBOT_06
from lerobot_xvla.modeling_xvla import CheckpointNotFoundError, load_for_inference
from lerobot_xvla.offline import TINY_ARCHITECTURE, build_word_tokenizer
from lerobot_xvla.processor_files import UntrustedCheckpointError
from lerobot_xvla.processor_xvla import make_xvla_pre_post_processors
from lerobot_xvla_cli import main as cli_main

from conftest import LEROBOT_ENV, randomize_, tiny_kwargs

CAMERA = "observation.images.top"
STATS = {key: {"mean": torch.zeros(6), "std": torch.ones(6), "min": -torch.ones(6), "max": torch.ones(6)}
         for key in ("observation.state", "action")}  # fmt: skip
PREPROCESSOR, POSTPROCESSOR = "policy_preprocessor.json", "policy_postprocessor.json"
OTHER_WORDS = ["alpha", "beta", "gamma"]  # a tokenizer of 7 tokens: BART's 4 special ones and these


def tiny_xvla(tokenizer: Path | str) -> XVLAConfig:
    return XVLAConfig(
        **copy.deepcopy(TINY_ARCHITECTURE), action_mode="auto", tokenizer_name=str(tokenizer), device="cpu",
        push_to_hub=False, input_features={CAMERA: PolicyFeature(FeatureType.VISUAL, (3, 64, 64)),
                                           "observation.state": PolicyFeature(FeatureType.STATE, (6,))},
        output_features={"action": PolicyFeature(FeatureType.ACTION, (6,))},
    )  # fmt: skip


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    """A checkpoint as lerobot-train writes one (policy, then both processors); its tokenizer's original directory
    is gone, so only its own copy can give 58 tokens."""
    tokenizer = build_word_tokenizer(tmp_path / "tokenizer_files")
    directory = tmp_path / "checkpoint"
    config = tiny_xvla(tokenizer)
    randomize_(XVLAPolicy(config)).save_pretrained(directory)
    for pipeline in make_xvla_pre_post_processors(config, dataset_stats=STATS):
        pipeline.save_pretrained(directory)
    shutil.rmtree(tokenizer)
    return directory


def observation() -> dict:
    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 64, 64), generator=generator, dtype=torch.uint8)
    return {CAMERA: image, "observation.state": torch.randn(6, generator=generator), "task": "pick up the red cube"}


def vocabulary(preprocessor) -> int:
    return len(next(s for s in preprocessor.steps if isinstance(s, TokenizerProcessorStep)).input_tokenizer)


def edit(path: Path, change) -> None:
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))


def tokenizer_entry(document: dict) -> dict:
    return next(s for s in document["steps"] if s.get("registry_name") == "tokenizer_processor")["config"]


def as_lerobot_loads(checkpoint: Path, *cli_overrides: str):
    """The processors `--policy.path=<checkpoint>` gives in every LeRobot command (lerobot-eval, -train, -record,
    -rollout): the config from config.json with the command line's overrides, pretrained_path set."""
    config = PreTrainedConfig.from_pretrained(checkpoint, cli_overrides=list(cli_overrides))
    config.pretrained_path = checkpoint
    return make_pre_post_processors(config, pretrained_path=str(checkpoint))


def by_load_for_inference(checkpoint: Path):
    return load_for_inference(checkpoint)[1:]


def by_convert(checkpoint: Path):
    """`lerobot-xvla convert`: a refusal is one line on stderr and exit status 2 (raised here as the error it names)."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        status = cli_main(["convert", str(checkpoint), str(checkpoint.parent / "converted")])
    lines = stderr.getvalue().strip().splitlines()
    if status == 2 and len(lines) == 1:
        raise UntrustedCheckpointError(lines[0].split(": error: ", 1)[1])
    assert status == 0, stderr.getvalue()


LOADERS = [by_load_for_inference, as_lerobot_loads, by_convert]


# ---------------------------------------------------------------------------------------------------------
# No code from a checkpoint
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("load", LOADERS)
@pytest.mark.parametrize(
    ("file", "index", "named", "module"),
    [
        (PREPROCESSOR, 10, "os.system", "os"),
        (POSTPROCESSOR, 0, "subprocess.getoutput", "subprocess"),
        (PREPROCESSOR, 0, "shipped_step.Step", "shipped_step"),  # a module the checkpoint brings along
        (PREPROCESSOR, 0, "lerobot.processor.pipeline.importlib", "lerobot.processor.pipeline"),  # not a step
    ],
)
def test_a_step_naming_code_is_refused_before_anything_is_imported(checkpoint, monkeypatch, load, file, index, named,
                                                                   module):
    marker = checkpoint.parent / "ran"
    (checkpoint / "shipped_step.py").write_text(f"open({str(marker)!r}, 'w').close()\nStep = print\n")
    monkeypatch.syspath_prepend(str(checkpoint))  # as when run from inside the checkpoint directory
    config = {"command": f"touch {marker}", "cmd": f"touch {marker}"}
    edit(checkpoint / file, lambda d: d["steps"].insert(index, {"class": named, "config": config}))
    refused = (f"{checkpoint / file}: step {index} names \"class\": {named!r}, which is not a processor step of the "
               f"installed LeRobot (it would import {module!r} and call it)")  # fmt: skip
    with pytest.raises(UntrustedCheckpointError) as error:
        load(checkpoint)
    assert str(error.value).startswith(refused) and "\n" not in str(error.value)
    assert not marker.exists() and "shipped_step" not in sys.modules


def test_an_unregistered_step_name_is_refused_naming_the_file_and_step(checkpoint):
    edit(checkpoint / POSTPROCESSOR, lambda d: d["steps"].append({"registry_name": "exfiltrate", "config": {}}))
    refused = (f"{checkpoint / POSTPROCESSOR}: step 3 names \"registry_name\": 'exfiltrate', which no installed "
               "package registers in LeRobot's ProcessorStepRegistry")  # fmt: skip
    with pytest.raises(UntrustedCheckpointError, match=re.escape(refused)):
        load_for_inference(checkpoint)


def test_every_policys_processor_files_are_checked_also_with_the_builtin_switch(tmp_path):
    """Not only X-VLA's: a processor file of any policy loads through the same loader, and LEROBOT_XVLA_BUILTIN=1
    hands X-VLA back to LeRobot but keeps the check."""
    marker = tmp_path / "ran"
    step = {"class": "os.system", "config": {"command": f"touch {marker}"}}
    (tmp_path / "processor.json").write_text(json.dumps({"name": "any_policy", "steps": [step]}))
    script = ("import lerobot_xvla\nfrom lerobot.processor import DataProcessorPipeline\n"
              f"DataProcessorPipeline.from_pretrained({str(tmp_path)!r}, 'processor.json')")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                            env={**LEROBOT_ENV, "LEROBOT_XVLA_BUILTIN": "1"})  # fmt: skip
    assert result.returncode == 1 and not marker.exists()
    refused = f"UntrustedCheckpointError: {tmp_path / 'processor.json'}: step 0 names \"class\": 'os.system'"
    assert refused in result.stderr


def test_files_lerobot_writes_keep_loading(tmp_path, tokenizer_dir):
    """Every step LeRobot saves is registered (ACT's, the built-in X-VLA's), or one of its own classes it does not
    register, saved by "class" (the built-in X-VLA's LiberoProcessorStep): all load through the checked loader."""
    act = ACTConfig(input_features={"observation.state": PolicyFeature(FeatureType.STATE, (6,))},
                    output_features={"action": PolicyFeature(FeatureType.ACTION, (6,))}, device="cpu")  # fmt: skip
    for pipeline in make_act_pre_post_processors(act, dataset_stats=STATS):
        pipeline.save_pretrained(tmp_path / "act")
    pre, post = make_pre_post_processors(act, pretrained_path=str(tmp_path / "act"))
    assert torch.equal(pre({"observation.state": torch.ones(6)})["observation.state"], torch.ones(1, 6))
    assert torch.equal(post(torch.ones(1, 6)), torch.ones(1, 6))

    PolicyProcessorPipeline(steps=[LiberoProcessorStep()], name="env").save_pretrained(tmp_path / "libero")
    saved = json.loads((tmp_path / "libero" / "env.json").read_text())["steps"]
    assert saved == [{"class": "lerobot.policies.xvla.processor_xvla.LiberoProcessorStep", "config": {}}]
    loaded = PolicyProcessorPipeline.from_pretrained(tmp_path / "libero", config_filename="env.json")
    assert [type(s) for s in loaded.steps] == [LiberoProcessorStep]


# ---------------------------------------------------------------------------------------------------------
# Nothing outside the checkpoint
# ---------------------------------------------------------------------------------------------------------
def move_state_file(checkpoint: Path, name_it) -> str:
    """Move the normaliser's state file out of the checkpoint; `name_it(outside path)` is what the file then names."""
    def change(document):
        step = next(s for s in document["steps"] if "state_file" in s)
        outside = checkpoint.parent / "stats.safetensors"
        (checkpoint / step["state_file"]).rename(outside)
        step["state_file"] = name_it(outside)

    edit(checkpoint / PREPROCESSOR, change)
    steps = json.loads((checkpoint / PREPROCESSOR).read_text())["steps"]
    return next(s["state_file"] for s in steps if "state_file" in s)


@pytest.mark.parametrize("load", LOADERS[:2])
@pytest.mark.parametrize("name_it", [lambda outside: f"../{outside.name}", str], ids=["dot-dot", "absolute"])
def test_a_state_file_outside_the_checkpoint_is_refused(checkpoint, load, name_it):
    named = move_state_file(checkpoint, name_it)
    refused = f"step 9 names \"state_file\": '{named}'; a state file is a file name inside the checkpoint"
    with pytest.raises(UntrustedCheckpointError, match=re.escape(f"{refused} (a relative path without '..')")):
        load(checkpoint)


def test_a_state_file_linking_outside_is_refused(checkpoint):
    name = move_state_file(checkpoint, lambda outside: "linked.safetensors")
    outside = checkpoint.parent / "stats.safetensors"
    (checkpoint / name).symlink_to(outside)
    with pytest.raises(UntrustedCheckpointError, match=re.escape(f"resolves to {outside}, outside")):
        PolicyProcessorPipeline.from_pretrained(checkpoint, config_filename=PREPROCESSOR)


@pytest.mark.parametrize("load", LOADERS[:2])
def test_a_checkpoint_copied_without_its_tokenizer_never_loads_the_current_directorys(checkpoint, tmp_path,
                                                                                       monkeypatch, load):
    shutil.rmtree(checkpoint / "tokenizer")
    build_word_tokenizer(tmp_path / "elsewhere" / "tokenizer", words=OTHER_WORDS)
    monkeypatch.chdir(tmp_path / "elsewhere")
    missing = f"but {checkpoint / 'tokenizer'} does not exist (copied without it?)"
    with pytest.raises(CheckpointNotFoundError, match=re.escape(missing)):
        load(checkpoint)


def record_tokenizer(checkpoint: Path, name: str) -> None:
    """config.json and the preprocessor name tokenizer `name` instead of the checkpoint's own copy."""
    shutil.rmtree(checkpoint / "tokenizer")
    edit(checkpoint / "config.json", lambda d: d.update(tokenizer_name=name))
    edit(checkpoint / PREPROCESSOR, lambda d: tokenizer_entry(d).update(tokenizer_name=name))


@pytest.mark.parametrize("load", LOADERS[:2])
@pytest.mark.parametrize("where", ["absolute", "current directory"])
def test_a_recorded_tokenizer_outside_the_checkpoint_is_refused_unless_the_user_names_it(checkpoint, tmp_path,
                                                                                          monkeypatch, load, where):
    other = build_word_tokenizer(tmp_path / "other" / "words", words=OTHER_WORDS)
    monkeypatch.chdir(tmp_path)
    name = str(other) if where == "absolute" else "other/words"  # the second also reads as a Hub id
    record_tokenizer(checkpoint, name)
    kind = "an absolute path" if where == "absolute" else "a directory of the current directory"
    recorded = f"the config.json of {checkpoint} records tokenizer_name='{name}', {kind}, outside the checkpoint"
    with pytest.raises(UntrustedCheckpointError, match=re.escape(recorded)):
        load(checkpoint)
    preprocessor, _ = as_lerobot_loads(checkpoint, f"--tokenizer_name={name}")  # --policy.tokenizer_name=...
    assert vocabulary(preprocessor) == 7


@pytest.mark.parametrize("part", ["tokenizer", "tokenizer/tokenizer.json", "config.json", PREPROCESSOR])
def test_a_file_linking_outside_the_checkpoint_is_refused(checkpoint, tmp_path, part):
    outside = tmp_path / "outside" / Path(part).name
    outside.parent.mkdir()
    (checkpoint / part).rename(outside)
    (checkpoint / part).symlink_to(outside)
    for load in LOADERS[:2]:
        refused = f"{checkpoint / part} resolves to {outside}, outside"
        with pytest.raises(UntrustedCheckpointError, match=re.escape(refused)):
            load(checkpoint)


def test_the_hub_cache_layout_loads(checkpoint, tmp_path, monkeypatch):
    """A snapshot in the Hugging Face cache is links into the entry's blobs (`../../blobs/<hash>`): inside."""
    entry = tmp_path / "hub" / "models--someone--xvla-tiny"
    snapshot = entry / "snapshots" / ("0" * 40)
    for file in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        blob = entry / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, blob)
        link = snapshot / file.relative_to(checkpoint)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    expected = load_for_inference(checkpoint)
    for cached in ("someone/xvla-tiny", snapshot):
        policy, preprocessor, postprocessor = load_for_inference(cached)
        assert vocabulary(preprocessor) == 58
        torch.manual_seed(0)
        actions = postprocessor(policy.predict_action_chunk(preprocessor(observation())))
        torch.manual_seed(0)
        assert torch.equal(actions, expected[2](expected[0].predict_action_chunk(expected[1](observation()))))


def test_a_tokenizer_the_user_names_is_loaded(checkpoint, tmp_path):
    mine = build_word_tokenizer(tmp_path / "mine", words=OTHER_WORDS)
    preprocessor, _ = as_lerobot_loads(checkpoint, f"--tokenizer_name={mine}")
    assert vocabulary(preprocessor) == 7  # not the checkpoint's own copy (58)
    assert vocabulary(load_for_inference(checkpoint, tokenizer_name=str(mine))[1]) == 7
    shutil.rmtree(checkpoint / "tokenizer")
    assert vocabulary(as_lerobot_loads(checkpoint, f"--tokenizer_name={mine}")[0]) == 7


def test_a_policy_saved_without_its_preprocessor_loads_again(tmp_path):
    tokenizer = build_word_tokenizer(tmp_path / "tokenizer_files")
    policy = XVLAPolicy(tiny_xvla(tokenizer))
    policy.save_pretrained(tmp_path / "alone")
    fresh, _ = make_xvla_pre_post_processors(policy.config)
    shutil.rmtree(tokenizer)
    assert json.loads((tmp_path / "alone" / "config.json").read_text())["tokenizer_name"] == "tokenizer"
    _, loaded, _ = load_for_inference(tmp_path / "alone")
    tokens = "observation.language.tokens"
    assert torch.equal(loaded(observation())[tokens], fresh(observation())[tokens])


# ---------------------------------------------------------------------------------------------------------
# LeRobot's built-in X-VLA classes, used directly while the plugin is installed
# ---------------------------------------------------------------------------------------------------------
def test_lerobots_builtin_xvla_saves_and_loads_its_own_checkpoints(tmp_path, tokenizer_dir):
    """LeRobot's X-VLA test logic, offline: a tiny built-in X-VLA predicts the same actions for the same seed, and
    after a save and a load with its own classes; its processors, saved and loaded through LeRobot's factory, turn
    a raw observation into actions."""
    config = BuiltinConfig(**tiny_kwargs(2, size=(224, 224), tokenizer_name=tokenizer_dir))  # 20-D state, actions
    policy = randomize_(BuiltinPolicy(config)).eval()
    stats = {key: {name: value.repeat(4)[:20] for name, value in entry.items()} for key, entry in STATS.items()}
    pre, post = make_pre_post_processors(config, dataset_stats=stats)
    raw = {**{f"observation.images.cam{i}": observation()[CAMERA] for i in range(2)},
           "observation.state": torch.linspace(-1, 1, 20), "task": "pick up the red cube"}  # fmt: skip
    batch = pre(raw)

    def chunk(model) -> torch.Tensor:
        torch.manual_seed(4)
        return model.predict_action_chunk(batch)

    assert torch.equal(chunk(policy), chunk(policy))
    policy.save_pretrained(tmp_path / "builtin")
    for pipeline in (pre, post):
        pipeline.save_pretrained(tmp_path / "builtin")
    assert json.loads((tmp_path / "builtin" / "config.json").read_text())["type"] == "xvla"

    loaded = BuiltinPolicy.from_pretrained(tmp_path / "builtin")
    assert type(loaded) is BuiltinPolicy and type(loaded.config) is BuiltinConfig
    if LEROBOT_06:  # LeRobot 0.4's draccus cannot parse a config subclass from its own file, plugin or not
        assert type(BuiltinConfig.from_pretrained(tmp_path / "builtin")) is BuiltinConfig
    assert torch.equal(chunk(loaded), chunk(policy))
    loaded_pre, loaded_post = make_pre_post_processors(loaded.config, pretrained_path=str(tmp_path / "builtin"))
    torch.manual_seed(4)
    action = loaded_post(loaded.select_action(loaded_pre(raw)))
    assert action.shape == (1, 20) and torch.isfinite(action).all()
    assert torch.equal(action, post(chunk(policy)[:, 0]))
    # `xvla` stays ours; the built-in records its tokenizer's absolute path, which ours loads only when named.
    named = PreTrainedConfig.from_pretrained(tmp_path / "builtin", cli_overrides=[f"--tokenizer_name={tokenizer_dir}"])
    assert type(named) is XVLAConfig
