"""`lerobot-record --robot.type=bi_so_follower --policy.path=<X-VLA checkpoint>` on simulated SO-101 servos.

LeRobot's real `BiSOFollower`, `SOFollower` and `FeetechMotorsBus` (and the Feetech SDK under them) run
unchanged; only the serial link to the 12 STS3215 servos is simulated (`sim_so101.SimSerial`), and the
cameras are a registered `type: sim` camera. The run goes through LeRobot's own CLI entry point
(`lerobot.scripts.lerobot_record.main` with `sys.argv` set), in this process.

What the tests hold: whatever the model outputs (its own actions, +-1e6, NaN), every Goal_Position that
reaches a servo is an integer inside that motor's calibrated [range_min, range_max], and a non-finite
action stops the run before anything reaches the bus.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import lerobot_xvla  # noqa: F401  (owns --policy.type=xvla in this process)
from lerobot.datasets.lerobot_dataset import LeRobotDataset
from lerobot.scripts import lerobot_record
from lerobot_xvla import XVLAPolicy
from lerobot_xvla.compat import DEPLOY_COMMAND
from lerobot_xvla.configuration_xvla import XVLAConfigError

from conftest import SO101_DOMAIN
from sim_so101 import SimBus, simulated_serial
from so101_deploy import (  # noqa: F401  (checkpoint and robot are fixtures)
    ACTION_NAMES,
    CALIBRATION,
    CAMERAS,
    JOINTS,
    PORTS,
    RENAME_TO_THREE_VIEWS,
    TASK,
    THREE_VIEWS,
    assert_goals_inside_calibration,
    assert_nothing_reached_the_bus_after_the_nan,
    checkpoint,
    ee_checkpoint,
    goal_frames,
    nan_in_third_chunk,
    robot,
    robot_arguments,
    run_lerobot_cli,
    spy_on_policy,
    to_raw,
    to_units,
    training_stats,
)

FPS, EPISODE_S = 10, 1.0
records_with_a_policy = pytest.mark.skipif(
    DEPLOY_COMMAND != "lerobot-record", reason=f"this LeRobot's lerobot-record is teleoperation only: {DEPLOY_COMMAND} deploys policies "
    "(test_rollout_so101.py)"
)


def record(monkeypatch, tmp_path: Path, checkpoint: Path, *extra: str, episode_s: float = EPISODE_S) -> Path:
    """Run `lerobot-record` in-process with the arguments a user would type; returns the dataset root."""
    root = tmp_path / "dataset"
    argv = [
        "lerobot-record",
        *robot_arguments(tmp_path),
        # LeRobot insists that datasets recorded by a policy are named eval_*
        "--dataset.repo_id=local/eval_so101",
        f"--dataset.root={root}",
        f"--dataset.single_task={TASK}",
        "--dataset.num_episodes=1",
        f"--dataset.episode_time_s={episode_s}",
        "--dataset.reset_time_s=0",
        f"--dataset.fps={FPS}",
        "--dataset.push_to_hub=false",
        # With video=false LeRobot 0.4.4 leaves the cameras out of the dataset, and so out of the policy's input.
        "--dataset.video=true",
        "--dataset.num_image_writer_threads_per_camera=1",
        "--play_sounds=false",
        "--display_data=false",
        f"--policy.path={checkpoint}",
        *extra,
    ]
    run_lerobot_cli(monkeypatch, argv, lerobot_record.main)  # plugin discovery, then record()
    return root


def load_episode(root: Path) -> dict[str, np.ndarray]:
    """The recorded episode, read back from disk: action and observation.state as [frames, 12]."""
    dataset = LeRobotDataset("local/eval_so101", root=root)
    assert dataset.meta.total_episodes == 1
    assert dataset.features["action"]["names"] == ACTION_NAMES
    assert sorted(dataset.meta.camera_keys) == sorted(f"observation.images.{a}_{n}" for a, n in CAMERAS.items())
    columns = dataset.hf_dataset.select_columns(["action", "observation.state"])
    return {key: np.stack([np.asarray(v, dtype=np.float32) for v in columns[key]]) for key in columns.column_names}


# ----------------------------------------------------------------------------------------------------------
def test_sim_bus_speaks_feetech(monkeypatch):
    """The simulation under LeRobot's real FeetechMotorsBus: handshake, broadcast ping, calibration check,
    sync read/write; and a check on the checker: LeRobot's DEGREES mode writes a goal beyond the
    calibrated range as it is, and the simulated servos log it."""
    from lerobot.motors import Motor, MotorNormMode
    from lerobot.motors.feetech import FeetechMotorsBus

    cal = CALIBRATION["left"]
    port = PORTS["left"]
    buses = simulated_serial(monkeypatch, {port: SimBus.so101_arm(cal)})
    motors = {name: Motor(c.id, "sts3215", MotorNormMode.RANGE_0_100 if name == "gripper" else MotorNormMode.DEGREES)
              for name, c in cal.items()}
    bus = FeetechMotorsBus(port, motors, calibration=cal)
    bus.connect()  # pings every id, reads model numbers and firmware versions
    assert bus.is_calibrated
    assert bus.broadcast_ping() == {i: 777 for i in range(1, 7)}
    start = bus.sync_read("Present_Position", normalize=False)
    assert start == {n: c.range_min + (c.range_max - c.range_min) * 2 // 5 for n, c in cal.items()}
    bus.enable_torque()
    bus.sync_write("Goal_Position", {"shoulder_pan": 10.0, "gripper": 75.0})
    moved = bus.sync_read("Present_Position")
    assert math.isclose(moved["shoulder_pan"], 10.0, abs_tol=0.1) and math.isclose(moved["gripper"], 75.0, abs_tol=0.1)
    bus.write("Goal_Position", "elbow_flex", 170.0)  # far beyond the elbow's calibrated range
    with pytest.raises(AssertionError, match="outside its calibrated range"):
        assert_goals_inside_calibration(buses)
    bus.disconnect()
    with pytest.raises(ConnectionError):
        FeetechMotorsBus("/dev/ttyNOTHERE", motors, calibration=cal).connect()


@records_with_a_policy
def test_record_episode_with_xvla(checkpoint, robot, tmp_path, monkeypatch):
    """A normal run: one episode recorded, the X-VLA actions reach all 12 servos unchanged and inside range."""
    calls = spy_on_policy(monkeypatch, robot)
    root = record(monkeypatch, tmp_path, checkpoint)

    assert calls and all(c["policy"] is XVLAPolicy for c in calls), "policy.path did not resolve to lerobot_xvla"
    episode = load_episode(root)
    actions, states = episode["action"], episode["observation.state"]
    assert actions.ndim == 2 and actions.shape[1] == 12 and len(actions) >= 3, actions.shape
    writes = assert_goals_inside_calibration(robot)
    arm_of_port = {port: arm for arm, port in PORTS.items()}
    assert {(arm_of_port[w.port], w.motor_id) for w in writes} == {(a, i) for a in PORTS for i in range(1, 7)}

    # Frame i executes step i of the model's chunk: unnormalised with the training stats, clamped to their range.
    stats = training_stats()["action"]
    chunk = calls[0]["chunk"][0].double()
    assert len(actions) <= chunk.shape[0] and len(calls) == 1  # n_action_steps = chunk_size = 30
    low, high = stats["min"].double(), stats["max"].double()
    expected = torch.clamp(chunk * stats["std"].double() + stats["mean"].double(), low, high)
    np.testing.assert_allclose(actions, expected[: len(actions)].numpy(), rtol=0, atol=1e-3)

    # What the dataset says was sent is what reached the servos, frame by frame and joint by joint, and the
    # next observation is where the servos went.
    frames = goal_frames(robot)
    assert len(frames) == len(actions)
    for i, (frame, action) in enumerate(zip(frames, actions, strict=True)):
        for j, (arm, motor) in enumerate(JOINTS):
            assert abs(frame[(arm, motor)] - to_raw(float(action[j]), arm, motor)) <= 1, (i, arm, motor)
            if i + 1 < len(states):
                assert math.isclose(states[i + 1][j], to_units(frame[(arm, motor)], arm, motor), abs_tol=1e-3)
    for j, (arm, motor) in enumerate(JOINTS):  # the first observation is the resting pose
        cal = CALIBRATION[arm][motor]
        start = cal.range_min + (cal.range_max - cal.range_min) * 2 // 5
        assert math.isclose(states[0][j], to_units(start, arm, motor), abs_tol=1e-3)


@records_with_a_policy
def test_record_with_an_end_effector_checkpoint(ee_checkpoint, robot, tmp_path, monkeypatch):
    """An so101_ee6d checkpoint under unmodified lerobot-record: the model's poses become joint targets by IK; the
    dataset records those joints, and every goal on the bus is finite and inside calibration."""
    calls = spy_on_policy(monkeypatch, robot)
    root = record(monkeypatch, tmp_path, ee_checkpoint)

    assert calls and all(c["chunk"].shape == (1, 30, 20) for c in calls)
    actions = load_episode(root)["action"]
    assert actions.shape[1] == 12 and len(actions) >= 3 and np.isfinite(actions).all()
    stats = training_stats()["action"]
    assert (actions >= stats["min"].numpy() - 1e-4).all() and (actions <= stats["max"].numpy() + 1e-4).all()
    writes = assert_goals_inside_calibration(robot)
    assert len({(w.port, w.motor_id) for w in writes}) == 12
    frames = goal_frames(robot)
    for frame, action in zip(frames, actions, strict=False):
        for j, (arm, motor) in enumerate(JOINTS):
            assert abs(frame[(arm, motor)] - to_raw(float(action[j]), arm, motor)) <= 1


@records_with_a_policy
@pytest.mark.parametrize("magnitude", [1e6, 8.0], ids=["1e6", "8std"])
def test_wild_model_output_stays_in_calibrated_range(checkpoint, robot, tmp_path, monkeypatch, magnitude):
    """The model returns +-1e6, or +-8 std, for every joint: the run goes on and every goal stays in range.

    Without the postprocessor's guard the two fail differently: 1e6 degrees overflows the 15-bit register
    and FeetechMotorsBus raises mid-episode; 8 std (about 1.2 calibrated spans from the middle) fits the
    register, and LeRobot's DEGREES mode writes it as it is, far outside the calibrated range.
    """
    def wild(index, real):
        chunk = torch.full_like(real(), magnitude)
        chunk[..., index % 2 :: 2] *= -1  # alternate signs across joints and calls
        return chunk

    calls = spy_on_policy(monkeypatch, robot, wild)
    root = record(monkeypatch, tmp_path, checkpoint, "--policy.n_action_steps=3")

    assert len(calls) >= 2
    actions = load_episode(root)["action"]
    assert actions.shape[0] > 0
    writes = assert_goals_inside_calibration(robot)
    assert len({(w.port, w.motor_id) for w in writes}) == 12
    # Every action was clamped to the edge of the training range.
    stats = training_stats()["action"]
    low, high = stats["min"].numpy(), stats["max"].numpy()
    at_edge = np.isclose(actions, low, atol=1e-4) | np.isclose(actions, high, atol=1e-4)
    assert at_edge.all()


@records_with_a_policy
@pytest.mark.parametrize("channel", [None, 11], ids=["all", "right_gripper"])
def test_nan_model_output_never_reaches_the_bus(checkpoint, robot, tmp_path, monkeypatch, channel):
    """Two good chunks, then NaN (everywhere, or only in the right gripper): the run stops with an error and
    no Goal_Position is written after the NaN came out of the model.

    Without the guard, LeRobot's own `int(value)` in FeetechMotorsBus.sync_write still refuses NaN, but
    BiSOFollower writes the left arm before it converts the right arm's values: a NaN in a right-arm channel
    would let the left arm execute the broken step.
    """
    calls = spy_on_policy(monkeypatch, robot, nan_in_third_chunk(channel))
    with pytest.raises(ValueError, match="non-finite|NaN"):
        # A long episode: the run must end at the NaN, not because time ran out.
        record(monkeypatch, tmp_path, checkpoint, "--policy.n_action_steps=2", episode_s=30)
    assert_nothing_reached_the_bus_after_the_nan(calls, robot, steps_per_chunk=2)


@records_with_a_policy
def test_two_camera_robot_records_with_a_three_view_checkpoint(two_camera_checkpoint, robot, tmp_path, monkeypatch):
    """lerobot#4245 on LeRobot 0.4: the three-view checkpoint fine-tuned on the two cameras
    (`--policy.empty_cameras=1`) records on the two-camera robot with --dataset.rename_map: three view slots
    (the third masked) and 12 joint targets inside calibration."""
    calls = spy_on_policy(monkeypatch, robot)
    root = record(monkeypatch, tmp_path, two_camera_checkpoint, f"--dataset.rename_map={json.dumps(RENAME_TO_THREE_VIEWS)}")

    assert calls and all(c["policy"] is XVLAPolicy for c in calls)
    policy = calls[0]["instance"]
    assert policy.config.num_image_views == 3 and policy.config.camera_order == THREE_VIEWS[:2]
    assert load_episode(root)["action"].shape[1] == 12
    writes = assert_goals_inside_calibration(robot)
    assert len({(w.port, w.motor_id) for w in writes}) == 12


@records_with_a_policy
def test_record_with_a_mixture_checkpoint_as_its_so101_domain(mixture_checkpoint, robot, tmp_path, monkeypatch):
    """A checkpoint co-trained on the SO101 and PushT (`--policy.mixture`) records with `--policy.domain_id`: the
    SO101's domain acts with its 12-D actions, clamped to the range of the SO101 dataset it was trained on; without
    `--policy.domain_id` the command stops before the robot moves, naming the domains."""
    with pytest.raises(XVLAConfigError, match=r"choose the one it acts as with --policy.domain_id \(one of \[3, 6\]"):
        record(monkeypatch, tmp_path, mixture_checkpoint)
    assert not assert_goals_inside_calibration(robot)
    shutil.rmtree(tmp_path / "dataset")  # lerobot-record creates the dataset before it loads the policy

    calls = spy_on_policy(monkeypatch, robot)
    root = record(monkeypatch, tmp_path, mixture_checkpoint, f"--policy.domain_id={SO101_DOMAIN}")
    assert calls and all(c["policy"] is XVLAPolicy for c in calls)
    assert calls[0]["instance"].config.domain_id == SO101_DOMAIN
    actions = load_episode(root)["action"]
    assert actions.shape[1] == 12 and len(actions) >= 3
    stats = training_stats()["action"]  # the SO101 dataset's actions were drawn inside this range
    assert np.all(actions >= stats["min"].numpy() - 1e-4) and np.all(actions <= stats["max"].numpy() + 1e-4)
    writes = assert_goals_inside_calibration(robot)
    assert len({(w.port, w.motor_id) for w in writes}) == 12
