"""The main job's scripted expert and its output directory rules (the LeRobot-command parts are tested in
test_lerobot_loops.py on a real lerobot-train run)."""

from __future__ import annotations

import numpy as np
import pytest

from lerobot_xvla.demo_pusht import (
    TARGET_CENTRE,
    block_centre,
    expert_coverage,
    make_pusht_env,
    remove_previous_output,
    scripted_push,
)

SEEDS = list(range(100_000, 100_008))


def test_scripted_expert_pushes_the_block_onto_the_target():
    """It beats standing still on every episode it moves the block in, and covers a third of the target on average."""
    expert = expert_coverage(SEEDS, frames=80)
    env = make_pusht_env()
    still = []
    for seed in SEEDS:
        observation, _ = env.reset(seed=seed)
        still.append(max(env.step(observation["agent_pos"])[1] for _ in range(3)))
    assert expert.mean() > 0.3 and expert.mean() > np.mean(still) + 0.2
    assert (expert >= np.asarray(still) - 0.05).all()


def test_scripted_expert_pushes_from_behind_towards_the_target():
    block = np.array([150.0, 150.0, 0.0])
    centre = block_centre(block)
    behind = centre - 60.0 * (TARGET_CENTRE - centre) / np.linalg.norm(TARGET_CENTRE - centre)
    step = scripted_push(behind, block) - behind
    towards = (TARGET_CENTRE - centre) / np.linalg.norm(TARGET_CENTRE - centre)
    assert step @ towards == pytest.approx(25.0, abs=1.0)  # pushes straight at the target
    in_front = centre + 60.0 * towards
    step = scripted_push(in_front, block) - in_front
    assert step @ towards < 10.0  # never pushes the block away: walks round it first


def test_output_dir_of_another_program_is_never_deleted(tmp_path):
    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "data.txt").write_text("keep")
    with pytest.raises(SystemExit, match="refusing to overwrite .*mine: it exists and was not written by the main job"):
        remove_previous_output(precious, ".xvla_main_job")
    assert (precious / "data.txt").read_text() == "keep"
    (precious / ".xvla_main_job").touch()
    remove_previous_output(precious, ".xvla_main_job")
    assert not precious.exists()
