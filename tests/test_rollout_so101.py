"""`lerobot-rollout --robot.type=bi_so_follower --policy.path=<X-VLA checkpoint>` on simulated SO-101 servos.

The robot, the checkpoint and the checks are those of `test_record_so101.py` (`so101_deploy.py`): LeRobot's
real `BiSOFollower` and `FeetechMotorsBus` over simulated servos, `type: sim` cameras, and LeRobot's own entry
point (`lerobot.scripts.lerobot_rollout.main` with `sys.argv` set) run in this process.

What the tests hold, on the LeRobot that deploys with lerobot-rollout:

* sync inference: lerobot_xvla's policy drives all 12 servos, every Goal_Position stays inside calibration
  whatever the model outputs, and a NaN chunk stops the run before any of it reaches the bus;
* `--inference.type=rtc`: the previous chunk's leftover reaches the policy, each new chunk starts exactly on
  it, the guard clamps or refuses whole chunks, and the guidance shrinks the jump at chunk boundaries
  (`continuity_table` compares it with the sync path with and without `--policy.rtc_guidance`);
* `--use_torch_compile`: our two graphs are compiled, never a torch.compile around predict_action_chunk;
* a three-view checkpoint fine-tuned on the robot's two cameras runs with the training's --rename_map.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from itertools import pairwise
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lerobot_xvla import XVLAPolicy
from lerobot_xvla.compat import DEPLOY_COMMAND
from lerobot_xvla.configuration_xvla import XVLAConfigError
from lerobot_xvla.modeling_xvla import load_for_inference

lerobot_rollout = pytest.importorskip(
    "lerobot.scripts.lerobot_rollout",
    reason=f"this LeRobot has no lerobot-rollout: {DEPLOY_COMMAND} deploys policies (test_record_so101.py)",
)

from lerobot.policies.act.configuration_act import ACTConfig  # noqa: E402
from lerobot.policies.rtc import ActionQueue, RTCConfig  # noqa: E402
from lerobot.policies.utils import prepare_observation_for_inference  # noqa: E402
from lerobot.rollout import context as rollout_context  # noqa: E402
from lerobot.rollout.inference.rtc import _RTC_MAX_CONSECUTIVE_ERRORS, _normalize_prev_actions_length  # noqa: E402

from conftest import SO101_DOMAIN  # noqa: E402
from sim_so101 import SO101_MOTORS, SimBus, SimCamera, SimCameraConfig  # noqa: E402
from so101_deploy import (  # noqa: E402, F401  (checkpoint and robot are fixtures)
    CALIBRATION,
    CAMERAS,
    HEIGHT,
    JOINTS,
    PORTS,
    RENAME_TO_THREE_VIEWS,
    ROBOT_CAMERAS,
    TASK,
    THREE_VIEWS,
    WIDTH,
    assert_goals_inside_calibration,
    assert_nothing_reached_the_bus_after_the_nan,
    checkpoint,
    ee_checkpoint,
    goal_frames,
    nan_in_third_chunk,
    one_torch_thread,
    robot,
    robot_arguments,
    run_lerobot_cli,
    spy_on_policy,
    to_raw,
    training_stats,
)

FPS, DURATION_S = 10, 2.0
EXECUTION_HORIZON = 10  # --inference.rtc.execution_horizon


@pytest.fixture(autouse=True)
def single_torch_thread():
    """The policy driven directly runs at the speed it has in the CLI runs (`one_torch_thread`)."""
    with one_torch_thread():
        yield


def rollout(monkeypatch, tmp_path: Path, checkpoint: Path, *extra: str, duration_s: float = DURATION_S) -> None:
    """Run `lerobot-rollout --strategy.type=base` in-process with the arguments a user would type."""
    argv = [
        "lerobot-rollout",
        "--strategy.type=base",
        f"--policy.path={checkpoint}",
        *robot_arguments(tmp_path),
        f"--task={TASK}",
        f"--fps={FPS}",
        f"--duration={duration_s}",
        "--play_sounds=false",
        "--display_data=false",
        *extra,
    ]
    run_lerobot_cli(monkeypatch, argv, lerobot_rollout.main)  # plugin discovery, then rollout()


def robot_units(chunk: torch.Tensor) -> torch.Tensor:
    """What the postprocessor makes of model-unit actions: unnormalised with the training stats, clamped to
    their range (float64, [..., 12])."""
    stats = training_stats()["action"]
    unnormalised = chunk.double() * stats["std"].double() + stats["mean"].double()
    return torch.clamp(unnormalised, stats["min"].double(), stats["max"].double())


def assert_frames_follow(frames: list[dict], actions: torch.Tensor) -> None:
    """Frame i holds actions[i] (robot units [frames, 12]) as FeetechMotorsBus writes it, joint by joint."""
    assert len(frames) == len(actions)
    for i, (frame, action) in enumerate(zip(frames, actions, strict=True)):
        for j, (arm, motor) in enumerate(JOINTS):
            assert abs(frame[(arm, motor)] - to_raw(float(action[j]), arm, motor)) <= 1, (i, arm, motor)


def present_positions(buses: dict[str, SimBus]) -> dict[tuple[str, str], int]:
    return {(arm, motor): buses[port].servo(CALIBRATION[arm][motor].id).get("Present_Position")
            for arm, port in PORTS.items() for motor in SO101_MOTORS}


# ----------------------------------------------------------------------------------------------------------
# Sync inference (--inference.type=sync, the default)
# ----------------------------------------------------------------------------------------------------------
def test_rollout_with_xvla(checkpoint, robot, tmp_path, monkeypatch):
    """A normal run: lerobot_xvla's chunks reach all 12 servos step by step, inside calibration, and at the end
    LeRobot brings the arms back to where they started."""
    resting = present_positions(robot)
    calls = spy_on_policy(monkeypatch, robot)
    rollout(monkeypatch, tmp_path, checkpoint, "--policy.n_action_steps=5")

    assert all(c["policy"] is XVLAPolicy for c in calls), "policy.path did not resolve to lerobot_xvla"
    assert len(calls) >= 3
    writes = assert_goals_inside_calibration(robot)
    arm_of_port = {port: arm for arm, port in PORTS.items()}
    assert {(arm_of_port[w.port], w.motor_id) for w in writes} == {(a, i) for a in PORTS for i in range(1, 7)}
    # Every chunk but the last was executed whole (5 steps), in order; the last one may have been cut short.
    assert [c["writes_before"] for c in calls] == [5 * 12 * k for k in range(len(calls))]
    executed = torch.cat([c["chunk"][0, :5] for c in calls[:-1]])
    frames = goal_frames(robot)
    assert_frames_follow(frames[: len(executed)], robot_units(executed))
    assert frames[-1] == pytest.approx(resting, abs=1)  # --return_to_initial_position (default true)


@pytest.mark.parametrize("magnitude", [1e6, 8.0], ids=["1e6", "8std"])
def test_wild_model_output_stays_in_calibrated_range(checkpoint, robot, tmp_path, monkeypatch, magnitude):
    """The model returns +-1e6, or +-8 std, for every joint: the run goes on, and every goal is the edge of the
    training range (so inside calibration) on the side the model pushed towards."""
    def wild(index, real):
        chunk = torch.full_like(real(), magnitude)
        chunk[..., index % 2 :: 2] *= -1  # alternate signs across joints and calls
        return chunk

    calls = spy_on_policy(monkeypatch, robot, wild)
    rollout(monkeypatch, tmp_path, checkpoint, "--policy.n_action_steps=3", "--return_to_initial_position=false")

    assert len(calls) >= 2
    writes = assert_goals_inside_calibration(robot)
    assert len({(w.port, w.motor_id) for w in writes}) == 12
    frames = goal_frames(robot)
    expected = torch.cat([robot_units(c["chunk"][0, :3]) for c in calls])[: len(frames)]
    assert_frames_follow(frames, expected)


@pytest.mark.parametrize("channel", [None, 11], ids=["all", "right_gripper"])
def test_nan_model_output_never_reaches_the_bus(checkpoint, robot, tmp_path, monkeypatch, channel):
    """Two good chunks, then NaN (everywhere, or only in the right gripper, which BiSOFollower would write after
    the whole left arm): lerobot-rollout stops with the guard's error and no Goal_Position is written after the
    NaN came out of the model."""
    calls = spy_on_policy(monkeypatch, robot, nan_in_third_chunk(channel))
    with pytest.raises(ValueError, match="non-finite"):
        # A long run: it must end at the NaN, not because time ran out.
        rollout(monkeypatch, tmp_path, checkpoint, "--policy.n_action_steps=2", "--return_to_initial_position=false",
                duration_s=30)
    assert_nothing_reached_the_bus_after_the_nan(calls, robot, steps_per_chunk=2)


def test_mixture_checkpoint_drives_the_arms_as_its_so101_domain(mixture_checkpoint, robot, tmp_path, monkeypatch):
    """A checkpoint co-trained on the SO101 and PushT (`--policy.mixture`) under unmodified lerobot-rollout with
    `--policy.domain_id`: the SO101's domain acts, with its 12-D actions and its dataset's action range as the
    guard's bounds, and every goal reaches the 12 servos inside calibration. Without `--policy.domain_id` the
    command stops before the robot moves, naming the domains to choose from."""
    with pytest.raises(XVLAConfigError, match=rf"choose the one it acts as with --policy.domain_id \(one of \[3, 6\]"):
        rollout(monkeypatch, tmp_path, mixture_checkpoint)
    assert not assert_goals_inside_calibration(robot)

    calls = spy_on_policy(monkeypatch, robot)
    rollout(monkeypatch, tmp_path, mixture_checkpoint, f"--policy.domain_id={SO101_DOMAIN}", "--policy.n_action_steps=5",
            "--return_to_initial_position=false")
    assert len(calls) >= 2 and all(c["policy"] is XVLAPolicy for c in calls)
    policy = calls[0]["instance"]
    assert policy.config.domain_id == SO101_DOMAIN and policy.config.action_dim == 12
    assert policy.config.camera_order == ROBOT_CAMERAS  # the SO101's two views; PushT's was renamed onto the first
    writes = assert_goals_inside_calibration(robot)
    assert len({(w.port, w.motor_id) for w in writes}) == 12 and len(goal_frames(robot)) >= 10


def test_two_camera_robot_runs_a_three_view_checkpoint(two_camera_checkpoint, robot, tmp_path, monkeypatch):
    """lerobot#4245: the three-view checkpoint fine-tuned on the two cameras (`--policy.empty_cameras=1`) runs on
    the two-camera robot with the training's --rename_map: no "Visual feature mismatch", three view slots (the
    third masked), and 12 joint targets inside calibration."""
    calls = spy_on_policy(monkeypatch, robot)
    rollout(monkeypatch, tmp_path, two_camera_checkpoint, f"--rename_map={json.dumps(RENAME_TO_THREE_VIEWS)}",
            "--policy.n_action_steps=5", "--return_to_initial_position=false")

    assert calls and all(c["policy"] is XVLAPolicy for c in calls)
    policy = calls[0]["instance"]
    assert policy.config.num_image_views == 3 and policy.config.camera_order == THREE_VIEWS[:2]
    assert all(c["chunk"].shape == (1, 30, 12) for c in calls)
    writes = assert_goals_inside_calibration(robot)
    assert len({(w.port, w.motor_id) for w in writes}) == 12


@pytest.mark.parametrize("inference", ["sync", "rtc"])
def test_end_effector_checkpoint_drives_the_arms_through_ik(ee_checkpoint, robot, tmp_path, monkeypatch, inference):
    """An so101_ee6d checkpoint under unmodified lerobot-rollout (sync: one pose per tick; RTC: whole chunks):
    the model predicts 20-D poses, the postprocessor's IK turns them into joint targets, and every goal that
    reaches the 12 servos is finite and inside calibration."""
    calls = spy_on_policy(monkeypatch, robot)
    extra = ["--inference.type=rtc", f"--inference.rtc.execution_horizon={EXECUTION_HORIZON}"] if inference == "rtc" else ["--policy.n_action_steps=5"]
    rollout(monkeypatch, tmp_path, ee_checkpoint, *extra, "--return_to_initial_position=false", duration_s=3.0 if inference == "rtc" else DURATION_S)

    assert len(calls) >= 2 and all(c["policy"] is XVLAPolicy for c in calls)
    assert all(c["chunk"].shape == (1, 30, 20) for c in calls)  # end-effector poses, both arms
    writes = assert_goals_inside_calibration(robot)
    assert len({(w.port, w.motor_id) for w in writes}) == 12 and len(goal_frames(robot)) >= 5


# ----------------------------------------------------------------------------------------------------------
# RTC inference (--inference.type=rtc)
# ----------------------------------------------------------------------------------------------------------
def test_rtc_rollout_starts_every_chunk_on_the_leftover(checkpoint, robot, tmp_path, monkeypatch):
    """LeRobot's RTC engine accepts the policy (supports_rtc and the call shape), hands it the previous chunk's
    leftover after the first chunk, and the first inference_delay actions of each new chunk are that leftover:
    the steps the robot executes while the chunk is computed do not change under it."""
    calls = spy_on_policy(monkeypatch, robot)
    rollout(monkeypatch, tmp_path, checkpoint, "--inference.type=rtc",
            f"--inference.rtc.execution_horizon={EXECUTION_HORIZON}", "--return_to_initial_position=false",
            duration_s=3.0)

    assert len(calls) >= 3 and all(c["policy"] is XVLAPolicy for c in calls)
    assert calls[0]["kwargs"]["prev_chunk_left_over"] is None
    delays = [c["kwargs"]["inference_delay"] for c in calls[1:]]
    assert max(delays) >= 1, delays  # the engine measured a latency, so some steps run during inference
    for call in calls[1:]:
        leftover, delay = call["kwargs"]["prev_chunk_left_over"], call["kwargs"]["inference_delay"]
        assert leftover.shape == (EXECUTION_HORIZON, 12)
        kept = min(delay, EXECUTION_HORIZON)
        torch.testing.assert_close(call["chunk"][0, :kept], leftover[:kept], rtol=0, atol=1e-6)
    writes = assert_goals_inside_calibration(robot)
    assert len({(w.port, w.motor_id) for w in writes}) == 12 and len(goal_frames(robot)) >= 5


def test_rtc_chunks_go_through_the_guard_whole(checkpoint, robot, tmp_path, monkeypatch):
    """The RTC engine postprocesses whole chunks [1, T, 12]. A chunk of +-8 std is clamped to the edges of the
    training range at every step; chunks with a NaN in one channel (the right gripper, which BiSOFollower would
    write after the whole left arm) are refused whole: the engine retries, gives up and stops the run, and
    only the clamped chunk ever reached the servos."""
    def wild_then_nan(index, real):
        chunk = real().clone()
        if index == 0:
            chunk[:] = 8.0
            chunk[..., ::2] *= -1
        else:
            chunk[..., 11] = float("nan")
        return chunk

    calls = spy_on_policy(monkeypatch, robot, wild_then_nan)
    start = time.monotonic()
    rollout(monkeypatch, tmp_path, checkpoint, "--inference.type=rtc", "--return_to_initial_position=false",
            duration_s=30)

    assert time.monotonic() - start < 30, "the run should end when the engine gives up, not when time runs out"
    assert len(calls) == 1 + _RTC_MAX_CONSECUTIVE_ERRORS
    assert_goals_inside_calibration(robot)
    frames = goal_frames(robot)
    assert frames, "the clamped chunk should have been executed"
    assert_frames_follow(frames, robot_units(calls[0]["chunk"][0, :1]).expand(len(frames), 12))


def test_disabled_rtc_leaves_the_chunk_unguided(checkpoint):
    """`--inference.rtc.enabled=false` makes LeRobot append each chunk after the leftover instead of over it, so
    the leftover is no target for the new chunk's first steps: the policy ignores it, as LeRobot's own do."""
    policy, preprocessor, _ = load_for_inference(checkpoint)
    batch = SimulatedArms(preprocessor).observe()
    leftover = torch.full((EXECUTION_HORIZON, 12), 0.5)

    def chunk(**kwargs) -> torch.Tensor:
        torch.manual_seed(0)
        return policy.predict_action_chunk(batch, **kwargs)[0]

    free = chunk()
    policy.config.rtc_config = RTCConfig(execution_horizon=EXECUTION_HORIZON)
    guided = chunk(inference_delay=3, prev_chunk_left_over=leftover)
    policy.config.rtc_config = RTCConfig(execution_horizon=EXECUTION_HORIZON, enabled=False)
    disabled = chunk(inference_delay=3, prev_chunk_left_over=leftover)
    torch.testing.assert_close(guided[:3], leftover[:3], rtol=0, atol=1e-6)
    assert not torch.allclose(free[:3], leftover[:3], atol=0.1)
    torch.testing.assert_close(disabled, free, rtol=0, atol=0)


class SimulatedArms:
    """Observations for driving the policy without a control loop's timing: the two `type: sim` cameras of the
    rollouts and joints that reach every executed action (after the postprocessor), starting mid-range."""

    def __init__(self, preprocessor, postprocessor=None) -> None:
        self.preprocessor, self.postprocessor = preprocessor, postprocessor
        self.cameras = {}
        for seed, (arm, name) in enumerate(CAMERAS.items()):
            camera = SimCamera(SimCameraConfig(width=WIDTH, height=HEIGHT, fps=30, seed=seed))
            camera.connect(warmup=False)
            self.cameras[f"observation.images.{arm}_{name}"] = camera
        self.state = training_stats()["observation.state"]["mean"].clone()

    def observe(self) -> dict[str, torch.Tensor]:
        """The preprocessed batch of the current observation, built as LeRobot's inference engines build it."""
        raw = {key: camera.read() for key, camera in self.cameras.items()}
        raw["observation.state"] = self.state.numpy().astype(np.float32)
        return self.preprocessor(prepare_observation_for_inference(raw, torch.device("cpu"), TASK, "bi_so_follower"))

    def execute(self, action: torch.Tensor) -> None:
        """The arms reach `action` (model units [12])."""
        self.state = self.postprocessor(action.unsqueeze(0))[0]


def boundary_jumps(executed: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
    """Per chunk boundary, |first executed action of the new chunk - last executed action of the previous| of
    the joint that jumps most, in model (normalised) units. executed: (chunk index, action [12]) in order."""
    return torch.stack([(action - last).abs().max() for (chunk, last), (next_chunk, action) in pairwise(executed)
                        if next_chunk != chunk])


def execute_with_select_action(checkpoint: Path, chunks: int, steps_per_chunk: int, **overrides) -> torch.Tensor:
    """Boundary jumps of `chunks` chunks executed by select_action (what lerobot-rollout's sync engine calls),
    `steps_per_chunk` actions each; overrides: policy config fields, as `--policy.*` sets them."""
    policy, preprocessor, postprocessor = load_for_inference(checkpoint, n_action_steps=steps_per_chunk, **overrides)
    arms = SimulatedArms(preprocessor, postprocessor)
    executed = []
    for tick in range(chunks * steps_per_chunk):
        action = policy.select_action(arms.observe())[0]
        arms.execute(action)
        executed.append((tick // steps_per_chunk, action))
    return boundary_jumps(executed)


def execute_with_rtc_engine(checkpoint: Path, chunks: int, steps_per_chunk: int, delay: int) -> torch.Tensor:
    """Boundary jumps of `chunks` chunks executed the way lerobot-rollout's RTC engine does (its ActionQueue, its
    leftover of execution_horizon steps), with an inference that always takes `delay` control steps: the robot
    executes `delay` more actions of the previous chunk while a chunk is computed, then the new chunk replaces
    the queue from step `delay`, and a new inference starts every `steps_per_chunk` steps."""
    policy, preprocessor, postprocessor = load_for_inference(checkpoint)
    policy.config.rtc_config = RTCConfig(execution_horizon=EXECUTION_HORIZON)  # as lerobot-rollout sets it
    arms = SimulatedArms(preprocessor, postprocessor)
    queue, executed = ActionQueue(policy.config.rtc_config), []

    def execute(chunk_index: int) -> None:
        action = queue.get()
        arms.execute(action)
        executed.append((chunk_index, action))

    for index in range(chunks):
        index_before, leftover = queue.get_action_index(), queue.get_left_over()
        if leftover is not None:
            leftover = _normalize_prev_actions_length(leftover, target_steps=EXECUTION_HORIZON)
        steps_during_inference = 0 if leftover is None else delay
        chunk = policy.predict_action_chunk(arms.observe(), inference_delay=steps_during_inference,
                                            prev_chunk_left_over=leftover)[0]
        for _ in range(steps_during_inference):
            execute(index - 1)
        queue.merge(chunk, chunk, steps_during_inference, index_before)
        for _ in range(steps_per_chunk - steps_during_inference):
            execute(index)
    return boundary_jumps(executed)


def continuity_table(jumps: dict[str, torch.Tensor]) -> str:
    """Mean and max boundary jump per way of executing chunks, one line each."""
    width = max(map(len, jumps))
    lines = [f"{'boundary jump (normalised units)':<{width}}  {'mean':>6}  {'max':>6}  boundaries"]
    for name, values in jumps.items():
        lines.append(f"{name:<{width}}  {values.mean():6.3f}  {values.max():6.3f}  {len(values)}")
    return "\n".join(lines)


def test_guidance_shrinks_the_jumps_at_chunk_boundaries(checkpoint):
    """The same closed loop (same cameras, arms that follow the actions, 5 actions per chunk) executed three
    ways. Without guidance every chunk is a fresh sample from a new observation and the arm jumps at each
    boundary; LeRobot's RTC (through `lerobot_rtc_guidance`) and our `rtc_guidance` both start the new chunk on
    the previous one's plan. The margin is a factor, over every boundary, not a seed-tuned threshold."""
    chunks, steps_per_chunk, delay = 12, 5, 2
    torch.manual_seed(0)
    jumps = {
        "lerobot-rollout sync": execute_with_select_action(checkpoint, chunks, steps_per_chunk),
        "lerobot-rollout sync, --policy.rtc_guidance=true": execute_with_select_action(
            checkpoint, chunks, steps_per_chunk, rtc_guidance=True),
        f"lerobot-rollout --inference.type=rtc (delay {delay})": execute_with_rtc_engine(
            checkpoint, chunks, steps_per_chunk, delay),
    }
    print("\n" + continuity_table(jumps))
    unguided, plugin_rtc, lerobot_rtc = jumps.values()
    assert all(len(values) == chunks - 1 for values in jumps.values())
    assert lerobot_rtc.mean() < unguided.mean() / 2 and plugin_rtc.mean() < unguided.mean() / 2
    assert lerobot_rtc.max() < unguided.max() and plugin_rtc.max() < unguided.max()


# ----------------------------------------------------------------------------------------------------------
# --use_torch_compile
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture
def compile_calls(monkeypatch) -> list[tuple[str, dict]]:
    """torch.compile recorded (name of the callable, options) and left out: what would be compiled, at no cost."""
    calls = []

    def record(function, **options):
        calls.append((function.__name__, options))
        return function

    monkeypatch.setattr(torch, "compile", record)
    return calls


def test_use_torch_compile_compiles_our_graphs_only(checkpoint, robot, tmp_path, monkeypatch, compile_calls):
    """--use_torch_compile turns on compile_model: the observation encoding and one denoising step, in the mode
    given by --torch_compile_mode; LeRobot's torch.compile around predict_action_chunk is left out."""
    calls = spy_on_policy(monkeypatch, robot)
    rollout(monkeypatch, tmp_path, checkpoint, "--use_torch_compile=true",
            "--torch_compile_mode=max-autotune-no-cudagraphs", "--return_to_initial_position=false", duration_s=1.0)

    policy = calls[0]["instance"]
    assert policy.config.compile_model and policy.config.compile_mode == "max-autotune-no-cudagraphs"
    options = {"mode": "max-autotune-no-cudagraphs", "dynamic": False, "fullgraph": True}
    assert compile_calls == [("encode_observation", options), ("denoise", options)]
    assert "predict_action_chunk" not in vars(policy)
    writes = assert_goals_inside_calibration(robot)
    assert len({(w.port, w.motor_id) for w in writes}) == 12


def test_other_policies_keep_lerobots_compile_wrap(compile_calls):
    """A policy that is not lerobot_xvla's still gets LeRobot's torch.compile around predict_action_chunk."""
    other = SimpleNamespace(config=ACTConfig(), predict_action_chunk=lambda batch: batch)
    assert rollout_context._wrap_predict_action_chunk_with_torch_compile(other, backend="inductor", mode="default")
    assert compile_calls == [("<lambda>", {"backend": "inductor", "mode": "default"})]


def test_hooks_hold_when_lerobot_rollout_is_imported_first():
    """The console script imports lerobot.rollout before its plugin discovery imports lerobot_xvla."""
    code = (
        "import lerobot.scripts.lerobot_rollout as script, lerobot.rollout.context as context; "
        "script.register_third_party_plugins(); "
        "print(all(hasattr(f, '_lerobot_xvla_original') for f in (script.build_rollout_context, "
        "context.build_rollout_context, context._wrap_predict_action_chunk_with_torch_compile)))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"


@pytest.mark.slow
def test_compiled_rollout_on_cpu(checkpoint, robot, tmp_path, monkeypatch):
    """A real --use_torch_compile run (inductor on the CPU: about 140 s cold on 2 cores, 15 s with a warm
    inductor cache): the chunks come from the compiled graphs, predict_action_chunk stays the policy's method,
    and the goals are inside calibration."""
    calls = spy_on_policy(monkeypatch, robot)
    rollout(monkeypatch, tmp_path, checkpoint, "--use_torch_compile=true", "--return_to_initial_position=false",
            duration_s=1.0)

    policy = calls[0]["instance"]
    assert policy.config.compile_model and "predict_action_chunk" not in vars(policy)
    assert torch.isfinite(calls[0]["chunk"]).all()
    writes = assert_goals_inside_calibration(robot)
    assert len({(w.port, w.motor_id) for w in writes}) == 12


@pytest.mark.parametrize("delay", [0, 1, 3, EXECUTION_HORIZON])
def test_rtc_freezes_exactly_the_actions_executed_while_the_chunk_is_computed(checkpoint, delay):
    """LeRobot's RTC engine passes the leftover and how many of its actions run while the new chunk is computed
    (`inference_delay`): those come out as queued, the rest of the guided prefix is only pulled towards them."""
    policy, preprocessor, _ = load_for_inference(checkpoint)
    batch = SimulatedArms(preprocessor).observe()
    leftover = torch.linspace(0.2, 0.8, EXECUTION_HORIZON)[:, None].expand(EXECUTION_HORIZON, 12).contiguous()
    policy.config.rtc_config = RTCConfig(execution_horizon=EXECUTION_HORIZON)
    torch.manual_seed(0)
    guided = policy.predict_action_chunk(batch, inference_delay=delay, prev_chunk_left_over=leftover)[0]
    torch.testing.assert_close(guided[:delay], leftover[:delay], rtol=0, atol=1e-6)
    if delay < EXECUTION_HORIZON:
        assert (guided[delay:EXECUTION_HORIZON] - leftover[delay:]).abs().max() > 1e-4
