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

import copy
import functools
import logging
import math
import sys
from pathlib import Path

import draccus.wrappers.docstring as draccus_docstring
import numpy as np
import pytest
import torch

import lerobot_xvla  # noqa: F401  (owns --policy.type=xvla in this process)
from lerobot.configs.types import FeatureType, PolicyFeature
from lerobot.datasets.lerobot_dataset import LeRobotDataset
from lerobot.scripts import lerobot_record
from lerobot_xvla import XVLAConfig, XVLAPolicy
from lerobot_xvla.offline import TINY_ARCHITECTURE, build_word_tokenizer
from lerobot_xvla.processor_xvla import make_xvla_pre_post_processors

from sim_so101 import (
    RESOLUTION,
    SO101_MOTORS,
    SimBus,
    all_goal_writes,
    degrees,
    percent,
    simulated_serial,
    so101_calibration,
    write_calibration_file,
)

_attribute_docstring = functools.lru_cache(maxsize=None)(draccus_docstring.get_attribute_docstring)

ROBOT_ID = "so101_pair"
PORTS = {"left": "/dev/ttySIM_LEFT", "right": "/dev/ttySIM_RIGHT"}
CALIBRATION = {"left": so101_calibration(0), "right": so101_calibration(1)}
CAMERAS = {"left": "top", "right": "wrist"}  # -> observation.images.left_top, observation.images.right_wrist
HEIGHT, WIDTH = 64, 96
FPS, EPISODE_S = 10, 1.0
TASK = "fold the cloth"
# BiSOFollower's action order, which so101_bimanual also uses.
JOINTS = [(arm, motor) for arm in ("left", "right") for motor in SO101_MOTORS]
ACTION_NAMES = [f"{arm}_{motor}.pos" for arm, motor in JOINTS]


def to_units(raw: float, arm: str, motor: str) -> float:
    """Raw steps -> the robot's normalised units (use_degrees=True: degrees; the gripper: 0..100)."""
    cal = CALIBRATION[arm][motor]
    return percent(raw, cal) if motor == "gripper" else degrees(raw, cal)


def to_raw(value: float, arm: str, motor: str) -> int:
    """What FeetechMotorsBus writes for `value` (its _unnormalize for DEGREES / RANGE_0_100, drive_mode 0)."""
    cal = CALIBRATION[arm][motor]
    if motor == "gripper":
        return int(min(100.0, max(0.0, value)) / 100 * (cal.range_max - cal.range_min) + cal.range_min)
    return int(value * (RESOLUTION - 1) / 360 + (cal.range_min + cal.range_max) / 2)


def training_stats() -> dict[str, dict[str, torch.Tensor]]:
    """Stats of a plausible training set: every joint moved over the middle 60% of its calibrated range."""
    low, high = [], []
    for arm, motor in JOINTS:
        cal = CALIBRATION[arm][motor]
        span = cal.range_max - cal.range_min
        low.append(to_units(cal.range_min + 0.2 * span, arm, motor))
        high.append(to_units(cal.range_max - 0.2 * span, arm, motor))
    low, high = torch.tensor(low), torch.tensor(high)
    stats = {"mean": (low + high) / 2, "std": (high - low) / 4, "min": low, "max": high}
    return {"observation.state": {k: v.clone() for k, v in stats.items()}, "action": stats}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny so101_bimanual X-VLA saved the way training saves it (policy + processors with stats)."""
    root = tmp_path_factory.mktemp("xvla_so101")
    tokenizer = build_word_tokenizer(root / "tokenizer")
    inputs = {f"observation.images.{arm}_{name}": PolicyFeature(FeatureType.VISUAL, (3, HEIGHT, WIDTH))
              for arm, name in CAMERAS.items()}
    inputs["observation.state"] = PolicyFeature(FeatureType.STATE, (12,))
    config = XVLAConfig(
        **copy.deepcopy(TINY_ARCHITECTURE), action_mode="so101_bimanual", tokenizer_name=str(tokenizer),
        device="cpu", push_to_hub=False, input_features=inputs,
        output_features={"action": PolicyFeature(FeatureType.ACTION, (12,))},
    )
    directory = root / "checkpoint"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        XVLAPolicy(config).save_pretrained(directory)
    preprocessor, postprocessor = make_xvla_pre_post_processors(config, dataset_stats=training_stats())
    preprocessor.save_pretrained(directory)
    postprocessor.save_pretrained(directory)
    return directory


@pytest.fixture
def robot(tmp_path, monkeypatch) -> dict[str, SimBus]:
    """Two calibrated SO-101 arms on their simulated ports; calibration files where --robot.calibration_dir points."""
    for arm in ("left", "right"):
        write_calibration_file(tmp_path / "calibration", f"{ROBOT_ID}_{arm}", CALIBRATION[arm])
    buses = {PORTS[arm]: SimBus.so101_arm(CALIBRATION[arm]) for arm in ("left", "right")}
    return simulated_serial(monkeypatch, buses)


def record(monkeypatch, tmp_path: Path, checkpoint: Path, *extra: str, episode_s: float = EPISODE_S) -> Path:
    """Run `lerobot-record` in-process with the arguments a user would type; returns the dataset root."""
    root = tmp_path / "dataset"
    camera = f"type: sim, width: {WIDTH}, height: {HEIGHT}, fps: 30"
    argv = [
        "lerobot-record",
        "--robot.type=bi_so_follower",
        f"--robot.id={ROBOT_ID}",
        f"--robot.calibration_dir={tmp_path / 'calibration'}",
        f"--robot.left_arm_config.port={PORTS['left']}",
        f"--robot.right_arm_config.port={PORTS['right']}",
        f"--robot.left_arm_config.cameras={{{CAMERAS['left']}: {{{camera}, seed: 0}}}}",
        f"--robot.right_arm_config.cameras={{{CAMERAS['right']}: {{{camera}, seed: 1}}}}",
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
    monkeypatch.setattr(sys, "argv", argv)
    # draccus re-reads the source of every config class (all robots, cameras, policies...) for help texts on
    # each parse, about 6 s here; remembering them changes no parsed value.
    monkeypatch.setattr(draccus_docstring, "get_attribute_docstring", _attribute_docstring)
    # No keyboard listener: make pynput unimportable, which LeRobot's is_headless() reads as "headless"
    # (it would need an X display otherwise, and a live listener could react to real key presses).
    monkeypatch.setitem(sys.modules, "pynput", None)
    # One intra-op thread: on a 2-core machine torch's OpenMP workers fight the image-writer threads and a
    # 20 ms inference can stall for seconds, leaving the episode with a frame or two.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # record() calls LeRobot's init_logging(), which replaces the root logger's handlers (pytest's included).
    root_logger = logging.getLogger()
    handlers, level = list(root_logger.handlers), root_logger.level
    try:
        lerobot_record.main()  # the `lerobot-record` console script: plugin discovery, then record()
    finally:
        torch.set_num_threads(threads)
        root_logger.handlers[:] = handlers
        root_logger.setLevel(level)
    return root


def spy_on_policy(monkeypatch, buses: dict[str, SimBus], produce=None) -> list[dict]:
    """Wrap XVLAPolicy.predict_action_chunk (at class level, so whatever instance `--policy.path` builds is
    seen only if it is lerobot_xvla's). Each call is logged with the number of Goal_Position writes so far
    and the chunk returned; `produce(call_index, real)` may replace the model's chunk (`real()` runs it)."""
    original = XVLAPolicy.predict_action_chunk
    calls: list[dict] = []

    def predict_action_chunk(self, batch, noise=None, **kwargs):
        call = {"policy": type(self), "writes_before": len(all_goal_writes(buses))}
        calls.append(call)
        real = functools.partial(original, self, batch, noise=noise, **kwargs)
        chunk = real() if produce is None else produce(len(calls) - 1, real)
        call["chunk"] = chunk.detach().clone()
        return chunk

    monkeypatch.setattr(XVLAPolicy, "predict_action_chunk", predict_action_chunk)
    return calls


def assert_goals_inside_calibration(buses: dict[str, SimBus]) -> list:
    """Every Goal_Position the servos received is an int inside that motor's calibrated range; returns them."""
    writes = all_goal_writes(buses)
    arm_of_port = {port: arm for arm, port in PORTS.items()}
    for write in writes:
        arm = arm_of_port[write.port]
        motor = next(name for name, cal in CALIBRATION[arm].items() if cal.id == write.motor_id)
        cal = CALIBRATION[arm][motor]
        assert isinstance(write.position, int) and isinstance(write.raw, int)
        assert cal.range_min <= write.position <= cal.range_max, (
            f"{arm} {motor} (id {write.motor_id}) told to go to {write.position}, outside its calibrated range "
            f"[{cal.range_min}, {cal.range_max}]"
        )
    return writes


def load_episode(root: Path) -> dict[str, np.ndarray]:
    """The recorded episode, read back from disk: action and observation.state as [frames, 12]."""
    dataset = LeRobotDataset("local/eval_so101", root=root)
    assert dataset.meta.total_episodes == 1
    assert dataset.features["action"]["names"] == ACTION_NAMES
    assert sorted(dataset.meta.camera_keys) == sorted(f"observation.images.{a}_{n}" for a, n in CAMERAS.items())
    columns = dataset.hf_dataset.select_columns(["action", "observation.state"])
    return {key: np.stack([np.asarray(v, dtype=np.float32) for v in columns[key]]) for key in columns.column_names}


def goal_frames(buses: dict[str, SimBus]) -> list[dict[tuple[str, str], int]]:
    """Group the writes into frames: each send_action is one sync write of 6 goals per arm."""
    arm_of_port = {port: arm for arm, port in PORTS.items()}
    per_arm = {arm: [w for w in all_goal_writes(buses) if arm_of_port[w.port] == arm] for arm in PORTS}
    for arm, writes in per_arm.items():
        assert len(writes) % 6 == 0 and all(w.instruction == "sync_write" for w in writes), arm
    frames = []
    for i in range(len(per_arm["left"]) // 6):
        frame = {}
        for arm in PORTS:
            for w in per_arm[arm][6 * i : 6 * i + 6]:
                frame[(arm, SO101_MOTORS[w.motor_id - 1])] = w.position
        frames.append(frame)
    return frames


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


@pytest.mark.parametrize("channel", [None, 11], ids=["all", "right_gripper"])
def test_nan_model_output_never_reaches_the_bus(checkpoint, robot, tmp_path, monkeypatch, channel):
    """Two good chunks, then NaN (everywhere, or only in the right gripper): the run stops with an error and
    no Goal_Position is written after the NaN came out of the model.

    Without the guard, LeRobot's own `int(value)` in FeetechMotorsBus.sync_write still refuses NaN, but
    BiSOFollower writes the left arm before it converts the right arm's values: a NaN in a right-arm channel
    would let the left arm execute the broken step.
    """
    def nan_on_third(index, real):
        chunk = real()
        if index == 2:
            chunk = chunk.clone()
            chunk[..., slice(None) if channel is None else channel] = float("nan")
        return chunk

    calls = spy_on_policy(monkeypatch, robot, nan_on_third)
    with pytest.raises(ValueError, match="non-finite|NaN"):
        # A long episode: the run must end at the NaN, not because time ran out.
        record(monkeypatch, tmp_path, checkpoint, "--policy.n_action_steps=2", episode_s=30)

    assert len(calls) == 3, "the NaN chunk was never produced"
    writes = assert_goals_inside_calibration(robot)
    before = calls[2]["writes_before"]
    assert before == 2 * 2 * 12, "the two good chunks should have been executed (2 steps x 12 joints each)"
    assert len(writes) == before, f"{len(writes) - before} Goal_Position writes after the NaN chunk"
    assert all(w.seq <= before for w in writes)
