"""What the SO-101 deployment tests share: two arms on simulated servos, a tiny so101_bimanual X-VLA checkpoint,
LeRobot's CLIs run in-process, and the checks on what reached the servos.

LeRobot 0.4.x deploys a policy with `lerobot-record --policy.path` (`test_record_so101.py`), LeRobot 0.6.x with
`lerobot-rollout` (`test_rollout_so101.py`); both build the same `bi_so_follower` from the same flags
(`robot_arguments`), so a goal checked in one test means the same thing in the other.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import draccus.wrappers.docstring as draccus_docstring
import pytest
import torch
from lerobot.configs.types import FeatureType, PolicyFeature

from lerobot_xvla import XVLAConfig, XVLAPolicy
from lerobot_xvla.modeling_xvla import load_config
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
TASK = "fold the cloth"
# BiSOFollower's action order, which so101_bimanual also uses.
JOINTS = [(arm, motor) for arm in ("left", "right") for motor in SO101_MOTORS]
ACTION_NAMES = [f"{arm}_{motor}.pos" for arm, motor in JOINTS]
# What LeRobot's ProcessSignalHandler (lerobot-rollout) takes over; given back after each run.
SHUTDOWN_SIGNALS = [getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT")
                    if hasattr(signal, name)]


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
    return save_checkpoint(config, root / "checkpoint", dataset_stats=training_stats())


@pytest.fixture(scope="module")
def ee_checkpoint(checkpoint) -> Path:
    """The same arms in X-VLA's end-effector space (`so101_ee6d`): the model predicts poses, the postprocessor
    turns them into the 12 joint targets by inverse kinematics."""
    config = load_config(checkpoint)
    config.action_mode, config.normalization_mapping = "so101_ee6d", None
    config.__post_init__()  # the mode's IDENTITY normalisation
    return save_checkpoint(config, checkpoint.parent / "ee_checkpoint", dataset_stats=training_stats())


def save_checkpoint(config: XVLAConfig, directory: Path, dataset_stats: dict | None = None) -> Path:
    """An untrained policy of `config` (weights drawn with seed 0) and its processors, as a checkpoint directory."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        XVLAPolicy(config).save_pretrained(directory)
    for pipeline in make_xvla_pre_post_processors(config, dataset_stats=dataset_stats):
        pipeline.save_pretrained(directory)
    return directory


# A three-view checkpoint (the original's view names) fine-tuned on the two cameras above (lerobot#4245).
THREE_VIEWS = [f"observation.images.image{i}" for i in range(3)]
ROBOT_CAMERAS = [f"observation.images.{arm}_{name}" for arm, name in CAMERAS.items()]
RENAME_TO_THREE_VIEWS = dict(zip(ROBOT_CAMERAS, THREE_VIEWS[:2], strict=True))


def save_three_view_checkpoint(directory: Path, tokenizer: str) -> Path:
    """A pretrained-like X-VLA: three 224x224 views, 20-D proprio and end-effector actions (as xvla-base)."""
    config = XVLAConfig(
        **copy.deepcopy(TINY_ARCHITECTURE), tokenizer_name=tokenizer, device="cpu", push_to_hub=False,
        input_features={**{key: PolicyFeature(FeatureType.VISUAL, (3, 224, 224)) for key in THREE_VIEWS},
                        "observation.state": PolicyFeature(FeatureType.STATE, (20,))},
        output_features={"action": PolicyFeature(FeatureType.ACTION, (20,))},
    )
    return save_checkpoint(config, directory)


def write_two_camera_dataset(root: Path, episodes: int = 2, frames: int = 8):
    """What lerobot-record writes for the two arms: two cameras, 12 joint positions inside the training range."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    image = {"dtype": "image", "shape": (HEIGHT, WIDTH, 3), "names": ["height", "width", "channel"]}
    features = {key: dict(image) for key in ROBOT_CAMERAS}
    joints = {"dtype": "float32", "shape": (12,), "names": ACTION_NAMES}
    features.update({"observation.state": dict(joints), "action": dict(joints)})
    dataset = LeRobotDataset.create("local/so101_two_cameras", fps=10, features=features, root=root,
                                    robot_type="bi_so_follower", use_videos=False)
    stats = training_stats()["action"]
    generator = torch.Generator().manual_seed(0)
    for _ in range(episodes):
        for _ in range(frames):
            frame = {key: torch.randint(0, 256, (HEIGHT, WIDTH, 3), dtype=torch.uint8, generator=generator).numpy()
                     for key in ROBOT_CAMERAS}
            for key in ("observation.state", "action"):
                share = torch.rand(12, generator=generator)
                frame[key] = (stats["min"] + share * (stats["max"] - stats["min"])).numpy()
            dataset.add_frame({**frame, "task": TASK})
        dataset.save_episode()
    dataset.finalize()
    return dataset


@pytest.fixture
def robot(tmp_path, monkeypatch) -> dict[str, SimBus]:
    """Two calibrated SO-101 arms on their simulated ports; calibration files where --robot.calibration_dir points."""
    for arm in ("left", "right"):
        write_calibration_file(tmp_path / "calibration", f"{ROBOT_ID}_{arm}", CALIBRATION[arm])
    buses = {PORTS[arm]: SimBus.so101_arm(CALIBRATION[arm]) for arm in ("left", "right")}
    return simulated_serial(monkeypatch, buses)


def robot_arguments(tmp_path: Path) -> list[str]:
    """The `--robot.*` flags a user types for the two arms of the `robot` fixture and their `type: sim` cameras."""
    camera = f"type: sim, width: {WIDTH}, height: {HEIGHT}, fps: 30"
    return [
        "--robot.type=bi_so_follower",
        f"--robot.id={ROBOT_ID}",
        f"--robot.calibration_dir={tmp_path / 'calibration'}",
        f"--robot.left_arm_config.port={PORTS['left']}",
        f"--robot.right_arm_config.port={PORTS['right']}",
        f"--robot.left_arm_config.cameras={{{CAMERAS['left']}: {{{camera}, seed: 0}}}}",
        f"--robot.right_arm_config.cameras={{{CAMERAS['right']}: {{{camera}, seed: 1}}}}",
    ]


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread: on a 2-core machine torch's OpenMP workers fight LeRobot's other threads (image
    writers, RTC inference) or other processes, and a 20 ms inference can stall for seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_lerobot_cli(monkeypatch, argv: list[str], main: Callable[[], None]) -> None:
    """Run a LeRobot console script's `main` in this process with `sys.argv = argv`, as a user's shell would."""
    monkeypatch.setattr(sys, "argv", argv)
    # draccus re-reads the source of every config class (all robots, cameras, policies...) for help texts on
    # each parse, about 6 s here; remembering them changes no parsed value.
    monkeypatch.setattr(draccus_docstring, "get_attribute_docstring", _attribute_docstring)
    # No keyboard listener: make pynput unimportable, which LeRobot's is_headless() reads as "headless"
    # (it would need an X display otherwise, and a live listener could react to real key presses).
    monkeypatch.setitem(sys.modules, "pynput", None)
    # LeRobot's init_logging() replaces the root logger's handlers (pytest's included).
    root_logger = logging.getLogger()
    handlers, level = list(root_logger.handlers), root_logger.level
    signal_handlers = {number: signal.getsignal(number) for number in SHUTDOWN_SIGNALS}
    try:
        with one_torch_thread():
            main()
    finally:
        root_logger.handlers[:] = handlers
        root_logger.setLevel(level)
        for number, handler in signal_handlers.items():
            signal.signal(number, handler)


def spy_on_policy(monkeypatch, buses: dict[str, SimBus], produce=None) -> list[dict]:
    """Wrap XVLAPolicy.predict_action_chunk (at class level, so whatever instance `--policy.path` builds is
    seen only if it is lerobot_xvla's; the wrapper keeps the real signature, which LeRobot inspects). Each
    call is logged with the policy, its keyword arguments, the number of Goal_Position writes so far and the
    chunk returned; `produce(call_index, real)` may replace the model's chunk (`real()` runs it)."""
    original = XVLAPolicy.predict_action_chunk
    calls: list[dict] = []

    @functools.wraps(original)
    def predict_action_chunk(self, batch, noise=None, **kwargs):
        call = {"policy": type(self), "instance": self, "kwargs": kwargs,
                "writes_before": len(all_goal_writes(buses))}
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


def nan_in_third_chunk(channel: int | None):
    """A `produce` for spy_on_policy: the model's own chunks, then NaN in `channel` (every channel when None) in
    the third one."""
    def produce(index, real):
        chunk = real()
        if index == 2:
            chunk = chunk.clone()
            chunk[..., slice(None) if channel is None else channel] = float("nan")
        return chunk

    return produce


def assert_nothing_reached_the_bus_after_the_nan(calls: list[dict], buses: dict[str, SimBus], steps_per_chunk: int) -> None:
    """The two good chunks were executed whole, and no Goal_Position was written once the NaN chunk came out."""
    assert len(calls) == 3, "the NaN chunk was never produced"
    writes = assert_goals_inside_calibration(buses)
    before = calls[2]["writes_before"]
    assert before == 2 * steps_per_chunk * 12, f"the two good chunks should have been executed ({steps_per_chunk} steps x 12 joints each)"
    assert len(writes) == before, f"{len(writes) - before} Goal_Position writes after the NaN chunk"
    assert all(w.seq <= before for w in writes)
