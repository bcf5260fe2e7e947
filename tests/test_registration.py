"""`xvla` resolves to lerobot_xvla everywhere LeRobot looks it up, in any import order, with a way back."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import draccus
import pytest
from lerobot.configs.policies import PreTrainedConfig
from lerobot.configs.train import TrainPipelineConfig
from lerobot.policies import factory

from lerobot_xvla import XVLAConfig, XVLAPolicy, builtin_xvla
from lerobot_xvla.cli import PLUGIN_IMPORT_ERROR
from lerobot_xvla.processor_xvla import ImageNetNormalizeStep, ImageToFloatStep

from conftest import tiny_config


def run_python(code: str, **env: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env}, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


RESOLVE = (
    "from lerobot.policies.factory import get_policy_class, make_policy_config; "
    "from lerobot.configs.policies import PreTrainedConfig; "
    "print(PreTrainedConfig.get_choice_class('xvla').__module__, get_policy_class('xvla').__module__, "
    "type(make_policy_config('xvla')).__module__)"
)


def test_factory_functions_resolve_to_the_plugin(tokenizer_dir):
    assert PreTrainedConfig.get_choice_class("xvla") is XVLAConfig
    assert factory.get_policy_class("xvla") is XVLAPolicy
    config = factory.make_policy_config("xvla", chunk_size=7, n_action_steps=7, device="cpu")
    assert type(config) is XVLAConfig and config.chunk_size == 7 and config.type == "xvla"
    config = tiny_config(tokenizer_name=tokenizer_dir)
    preprocessor, postprocessor = factory.make_pre_post_processors(config)
    steps = [type(step) for step in preprocessor.steps]
    assert ImageToFloatStep in steps and ImageNetNormalizeStep in steps
    assert factory.get_policy_class("act").__name__ == "ACTPolicy"  # other policies untouched


def test_processor_errors_are_not_masked(tmp_path):
    """LeRobot's plugin fallback would report "Processor for policy type 'xvla' is not implemented"."""
    missing = str(tmp_path / "no_tokenizer")
    with pytest.raises(ValueError, match=re.escape(f"policy.tokenizer_name='{missing}' could not be loaded")):
        factory.make_pre_post_processors(tiny_config(tokenizer_name=missing))


def test_cli_type_parses_into_the_plugin_config():
    cfg = draccus.parse(TrainPipelineConfig, args=["--policy.type=xvla", "--policy.chunk_size=7", "--policy.n_action_steps=7", "--dataset.repo_id=local/x"])
    assert type(cfg.policy) is XVLAConfig and cfg.policy.chunk_size == 7


def test_builtin_can_be_borrowed_and_given_back():
    with builtin_xvla() as builtin:
        assert PreTrainedConfig.get_choice_class("xvla") is builtin
        assert factory.get_policy_class("xvla").__module__ == "lerobot.policies.xvla.modeling_xvla"
    assert PreTrainedConfig.get_choice_class("xvla") is XVLAConfig


@pytest.mark.parametrize(
    "imports",
    ["import lerobot_xvla; import lerobot.policies", "import lerobot.policies; import lerobot_xvla", "import lerobot_policy_xvla"],
)
def test_any_import_order_leaves_lerobot_importable(imports):
    modules = run_python(f"{imports}; {RESOLVE}").split()
    assert modules == ["lerobot_xvla.configuration_xvla", "lerobot_xvla.modeling_xvla", "lerobot_xvla.configuration_xvla"]


def test_lerobot_plugin_discovery_finds_the_distribution():
    code = f"import lerobot.policies; from lerobot.utils.import_utils import register_third_party_plugins; register_third_party_plugins(); {RESOLVE}"
    assert run_python(code).split()[0] == "lerobot_xvla.configuration_xvla"


def test_discover_packages_path_loads_every_submodule():
    code = f"from lerobot.configs.parser import load_plugin; load_plugin('lerobot_xvla'); {RESOLVE}"
    assert run_python(code).split()[1] == "lerobot_xvla.modeling_xvla"


def test_switch_keeps_the_builtin():
    modules = run_python(f"import lerobot_xvla; {RESOLVE}", LEROBOT_XVLA_BUILTIN="1").split()
    assert modules == ["lerobot.policies.xvla.configuration_xvla", "lerobot.policies.xvla.modeling_xvla", "lerobot.policies.xvla.configuration_xvla"]


def test_info_command_reports_the_active_implementation():
    out = run_python("from lerobot_xvla_cli import main; main(['info'])")
    assert "--policy.type=xvla -> lerobot_xvla" in out
    assert "plugins LeRobot's discovery imported: lerobot_policy_xvla" in out and "ERROR" not in out
    assert "policy:     lerobot_xvla.modeling_xvla.XVLAPolicy" in out
    out = run_python("from lerobot_xvla_cli import main; main(['info'])", LEROBOT_XVLA_BUILTIN="1")
    assert "--policy.type=xvla -> LeRobot built-in" in out


def console_script(name: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    """Run an installed console script of this venv (lerobot-train, lerobot-xvla, ...) as a user would."""
    command = [str(Path(sys.executable).parent / name), *args]
    return subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env}, timeout=300)


def test_lerobot_cli_imports_the_plugin_without_error():
    """LeRobot swallows a plugin's import error and runs its built-in X-VLA under our name: the worst failure."""
    result = console_script("lerobot-train", "--help")
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert PLUGIN_IMPORT_ERROR not in output
    assert "xvla_two_stage" in output  # our scheduler: registered only when the plugin imported


def test_info_reports_a_plugin_that_fails_to_import(tmp_path):
    """A broken discovery shim (shadowing ours on PYTHONPATH): `lerobot-xvla info` names the error, exits 1."""
    shim = tmp_path / "lerobot_policy_xvla"
    shim.mkdir()
    (shim / "__init__.py").write_text("raise ImportError('broken install')\n")
    result = console_script("lerobot-xvla", "info", PYTHONPATH=str(tmp_path))
    assert result.returncode == 1
    assert f"ERROR: {PLUGIN_IMPORT_ERROR}: lerobot_policy_xvla: ImportError('broken install')" in result.stdout
    assert "plugins LeRobot's discovery imported: none" in result.stdout


COMMANDS_WITH_OPTIONS = (["convert"], ["export"], ["serve"], ["libero-setup"])


@pytest.mark.parametrize("command", [[], ["info"], *COMMANDS_WITH_OPTIONS], ids=lambda command: " ".join(command) or "top")
def test_cli_help_imports_neither_torch_nor_lerobot(command):
    """`lerobot-xvla ... --help` parses its arguments before importing the package (which imports torch and
    LeRobot), so help answers at once; every option shows its default."""
    code = (
        "import contextlib, io, sys, lerobot_xvla_cli\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n"
        f"    lerobot_xvla_cli.main({[*command, '--help']!r})\n"
        "print(sorted(m for m in ('torch', 'lerobot', 'lerobot_xvla', 'transformers') if m in sys.modules))\n"
        "print(out.getvalue())"
    )
    loaded, help_text = run_python(code).split("\n", 1)
    assert loaded == "[]"
    entries = re.split(r"\n  (?=--)", help_text)[1:]  # one per option, from its flag to the next one
    assert bool(entries) == (command in COMMANDS_WITH_OPTIONS)
    for entry in entries:
        assert "(default: " in " ".join(entry.split()), entry


def test_lerobot_help_prints_no_traceback():
    """`lerobot-train --help` and `lerobot-eval --help` with the plugin installed: no traceback, the action modes
    listed, and no torchcodec loading report (LeRobot 0.6 logs torchcodec's five-traceback loading report a dozen times
    where FFmpeg's libraries are missing, as on this test machine)."""
    from conftest import lerobot

    from lerobot_xvla import ACTION_MODES

    for name in ("lerobot-train", "lerobot-eval"):
        output = lerobot(name, "--policy.type=xvla", "--help")
        assert "Traceback" not in output, output[:3000]
        assert output.count("libtorchcodec") == 0 and output.count("Falling back to 'pyav'") == 0, output[:3000]
        assert "usage: " + name in output
        # the help of --policy.action_mode lists every registered mode
        text = " ".join(output.split("  --policy.action_mode str", 1)[1].split("  --policy.", 1)[0].split())
        assert all(f" {mode} " in f" {text.replace(',', ' ')} " for mode in ACTION_MODES), text


def test_the_video_backend_report_is_one_line_once(caplog, monkeypatch):
    """The filter itself, on the message LeRobot 0.6's decoder choice logs (whatever FFmpeg this machine has)."""
    import logging

    from lerobot_xvla.compat import _VideoBackendReport

    chooser = logging.getLogger("lerobot.utils.import_utils")
    (report_filter,) = [f for f in chooser.filters if isinstance(f, _VideoBackendReport)]
    monkeypatch.setattr(report_filter, "said", False)  # as in a new process, whatever earlier tests logged
    report = "Could not load libtorchcodec.\nTraceback (most recent call last):\n  ...\nOSError: libavutil.so.60"
    with caplog.at_level(logging.INFO, logger=chooser.name):
        for _ in range(3):
            chooser.warning(f"{report}\n'torchcodec' is installed but cannot be loaded (see the error above). Falling back to 'pyav' as a default decoder.")
        chooser.warning("another warning of that module")
    records = [r for r in caplog.records if r.name == chooser.name]
    assert [(r.levelname, r.getMessage()) for r in records] == [
        ("INFO", "torchcodec cannot load FFmpeg's shared libraries (4 to 8) here; LeRobot decodes videos with pyav instead"),
        ("WARNING", "another warning of that module"),
    ]
