"""A bad X-VLA config on the command line is refused in one line that leads with the field and the reason."""

from __future__ import annotations

import json
import subprocess
import sys

import draccus
import pytest
from conftest import LEROBOT_ENV
from draccus.utils import DecodingError
from lerobot.configs.train import TrainPipelineConfig

from lerobot_xvla.config_errors import XVLAConfigDecodingError
from lerobot_xvla.demo import lerobot_command

LOG_PREFIXES = ("DEBUG:", "INFO:", "WARNING:")


def first_error_line(stderr: str) -> str:
    return next(line for line in stderr.splitlines() if line.strip() and not line.startswith(LOG_PREFIXES))


@pytest.mark.parametrize(
    "args,policy,error",
    [
        (
            ["--policy.chunk_size=0"],
            None,
            "`policy.chunk_size`: chunk_size must be an integer >= 1, got 0 (XVLAConfigError)",
        ),
        (
            ["--policy.action_mode=nope"],
            None,
            "`policy.action_mode`: action_mode must be one of the registered modes ['agibot_ee6d', 'auto', 'ee6d', "
            "'franka_joint7', 'joint', 'so101_bimanual', 'so101_ee6d'], got 'nope' (XVLAConfigError)",
        ),
        ([], {"chunk_size": "abc"}, "`policy.chunk_size`: Couldn't parse 'abc' into an int"),
        ([], {"chunk_sise": 3}, "`policy`: The fields `chunk_sise` are not valid for XVLAConfig"),
    ],
    ids=["chunk_size", "action_mode", "json-type", "json-unknown-field"],
)
def test_lerobot_train_names_the_field_and_the_reason_first(tmp_path, args, policy, error):
    if policy is None:
        args = ["--policy.type=xvla", *args, "--dataset.repo_id=x"]
    else:
        config = {"dataset": {"repo_id": "x"}, "policy": {"type": "xvla", **policy}}
        (tmp_path / "train.json").write_text(json.dumps(config))
        args = [f"--config_path={tmp_path / 'train.json'}"]
    command = [lerobot_command("lerobot-train"), *args, f"--output_dir={tmp_path / 'run'}"]
    result = subprocess.run(command, capture_output=True, text=True, env=LEROBOT_ENV, timeout=600)
    assert result.returncode != 0
    assert first_error_line(result.stderr) == f"error: {error}", result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Could not decode" not in result.stderr


def test_other_policies_keep_draccus_message():
    with pytest.raises(DecodingError) as refused:
        draccus.parse(TrainPipelineConfig, args=["--policy.type=act", "--policy.chunk_size=abc", "--dataset.repo_id=x"])
    assert not isinstance(refused.value, XVLAConfigDecodingError)
    assert str(refused.value).startswith("`policy`: Could not decode the value into any of the given types:")


def test_the_excepthook_prints_only_ours_in_one_line(capsys):
    """LeRobot 0.4 lets a DecodingError reach the interpreter; ours is printed as LeRobot 0.6 prints it."""
    error = XVLAConfigDecodingError(("policy", "chunk_size"), "chunk_size must be an integer >= 1, got 0")
    sys.excepthook(type(error), error, None)
    assert capsys.readouterr().err == f"error: {error}\n"
    other = DecodingError(("policy",), "Could not decode the value")
    try:
        raise other
    except DecodingError:
        sys.excepthook(DecodingError, other, other.__traceback__)
    assert "Traceback" in capsys.readouterr().err
