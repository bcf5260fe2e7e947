"""Inference and smooth execution: compiled sampler, RTC guidance, cross-fading, anchor interpolation,
predicted proprio."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from lerobot.configs.types import RTCAttentionSchedule
from lerobot.policies.rtc.configuration_rtc import RTCConfig
from lerobot.policies.rtc.modeling_rtc import RTCProcessor

from lerobot_xvla import XVLAConfigError, XVLAPolicy
from lerobot_xvla.execution import ChunkExecutor, guidance_weights, interpolate

from conftest import make_batch, randomize_, tiny_config


def boundary_deviations(policy: XVLAPolicy, batch: dict, chunks: int, seed: int = 0) -> list[float]:
    """At every chunk boundary, how far the first action of the new chunk is from the action the previous
    chunk had planned for that step (each chunk from fresh noise, so consecutive chunks disagree)."""
    policy.reset()
    torch.manual_seed(seed)
    executor, deviations = policy._executor, []
    original_add = executor.add_chunk

    def add_chunk(chunk):
        planned = None if executor.leftover is None else executor.leftover[:, 0].clone()
        original_add(chunk)
        if planned is not None:
            deviations.append((executor.queue[0] - planned).abs().mean().item())

    executor.add_chunk = add_chunk
    for _ in range(chunks * policy.config.n_action_steps):
        policy.select_action(batch)
    return deviations


@pytest.fixture(scope="module")
def weights() -> dict:
    return randomize_(XVLAPolicy(tiny_config())).state_dict()


def policy_with(weights: dict, **overrides) -> XVLAPolicy:
    policy = XVLAPolicy(tiny_config(n_action_steps=6, **overrides)).eval()
    policy.load_state_dict(weights)
    return policy


def test_compiled_sampler_matches_eager(weights):
    """fullgraph compilation also proves there is no host synchronisation and no data-dependent shape."""
    eager, compiled = policy_with(weights), policy_with(weights, compile_model=True)
    batch = make_batch(eager.config)
    torch.manual_seed(0)
    expected = eager.predict_action_chunk(batch)
    torch.manual_seed(0)
    actual = compiled.predict_action_chunk(batch)
    assert (actual - expected).abs().max() < 1e-5  # measured: 4.8e-7 on this CPU


def test_cuda_graph_mode_marks_every_replay_and_keeps_the_chunk(weights, monkeypatch):
    """compile_mode=reduce-overhead (CUDA graphs on a GPU; plain compilation here): every graph call starts a
    new cudagraph step, and the returned chunk is a copy that the next chunk's replays cannot overwrite."""
    eager, compiled = policy_with(weights), policy_with(weights, compile_model=True, compile_mode="reduce-overhead")
    marks = []
    original_mark = torch.compiler.cudagraph_mark_step_begin
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(original_mark()))
    batch = make_batch(eager.config)
    torch.manual_seed(0)
    expected = eager.predict_action_chunk(batch, steps=3)
    torch.manual_seed(0)
    first = compiled.predict_action_chunk(batch, steps=3)
    kept = first.clone()
    compiled.predict_action_chunk(batch, steps=3)
    assert len(marks) == 2 * (1 + 3)  # the observation encoding and each denoising step, per chunk
    assert torch.equal(first, kept) and (first - expected).abs().max() < 1e-5


def test_rtc_weights_follow_the_overlap():
    weights = guidance_weights(overlap=8, horizon=12)
    assert weights.shape == (12,) and weights[8:].abs().sum() == 0
    assert torch.all(weights[:8][1:] <= weights[:8][:-1]) and 0 < weights[0] <= 1
    assert torch.equal(guidance_weights(overlap=8, horizon=12, inference_delay=3)[:3], torch.ones(3))


def lerobots_rtc_weights(rtc_config: RTCConfig, delay: int, leftover: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """The prefix weights [chunk_size] LeRobot's own RTC applies for this config, delay and leftover: one guided
    step of `RTCProcessor.denoise_step`, read back from its debug tracker."""
    rtc = RTCProcessor(dataclasses.replace(rtc_config, debug=True))
    rtc.denoise_step(torch.zeros(1, chunk_size, leftover.shape[-1]), leftover, delay, 0.5, torch.zeros_like)
    return rtc.get_all_debug_steps()[0].weights.reshape(chunk_size)


@pytest.mark.parametrize("schedule", list(RTCAttentionSchedule))
def test_lerobot_rtc_follows_its_prefix_schedule_and_pulls_each_action_by_its_weight(weights, schedule, monkeypatch):
    """predict_action_chunk(inference_delay=, prev_chunk_left_over=) with the rtc_config lerobot-rollout
    --inference.type=rtc sets: each action is guided with the weight LeRobot's RTC gives it on the same inputs
    (1 for the first inference_delay, then the schedule over the execution horizon or the leftover if shorter,
    then 0), number by number; and the chunk is the model's own last estimate pulled towards the leftover by
    exactly that weight: (1 - w) of its distance is left, none where w = 1, all of it where w = 0."""
    policy = policy_with(weights)
    chunk_size, width = policy.config.chunk_size, policy.model.action_mode.chunk_width
    guided = [c for c in range(width) if c not in policy.model.action_mode.logit_channels]  # logits are left free
    batch = make_batch(policy.config, batch_size=1)
    seen = {}
    sample, denoise_step = policy.model.sample, policy.model.denoise_step

    def recorded_sample(*args):
        seen["weight"] = args[-1]  # [1, chunk_size, dim_action]
        return sample(*args)

    def recorded_denoise_step(*args):
        seen["estimate"] = denoise_step(*args)  # the last one is the estimate the last guidance acts on
        return seen["estimate"]

    monkeypatch.setattr(policy.model, "sample", recorded_sample)
    monkeypatch.setattr(policy.model, "denoise_step", recorded_denoise_step)
    for delay, horizon, left in [(0, 10, 24), (3, 10, 24), (2, 12, 8), (4, 30, 30)]:
        leftover = torch.linspace(-1, 1, left)[:, None] + torch.linspace(0, 0.5, width)
        # enabled, as the RTC engines set it: LeRobot 0.4's default is off
        rtc_config = RTCConfig(enabled=True, prefix_attention_schedule=schedule, execution_horizon=horizon)
        policy.config.rtc_config = rtc_config
        expected = lerobots_rtc_weights(rtc_config, delay, leftover, chunk_size)
        chunk = policy.predict_action_chunk(batch, inference_delay=delay, prev_chunk_left_over=leftover)[0]

        applied = seen["weight"][0, :, :width]
        assert torch.equal(applied[:, guided], expected[:, None].expand(-1, len(guided))), (delay, horizon, left)
        assert not applied[:, list(policy.model.action_mode.logit_channels)].any()
        target = torch.zeros(chunk_size, width)
        target[: min(horizon, left)] = leftover[:horizon]
        estimate = seen["estimate"][0, :, :width]
        torch.testing.assert_close(
            (chunk - target)[:, guided], (1 - expected)[:, None] * (estimate - target)[:, guided], rtol=0, atol=1e-6
        )


def test_rtc_guidance_and_cross_fading_keep_the_plan_at_chunk_boundaries(weights):
    batch = make_batch(tiny_config(), batch_size=1)
    plain = boundary_deviations(policy_with(weights), batch, chunks=5)
    guided = boundary_deviations(policy_with(weights, rtc_guidance=True), batch, chunks=5)
    blended = boundary_deviations(policy_with(weights, chunk_blend_steps=6), batch, chunks=5)
    assert len(plain) == 4
    assert sum(guided) < 0.2 * sum(plain), (guided, plain)  # RTC's first weight is 0.9
    assert sum(blended) < 0.2 * sum(plain), (blended, plain)  # the first blended action is 6/7 the old plan


def test_cross_fade_formula():
    config = tiny_config(n_action_steps=4, chunk_blend_steps=3)
    executor = ChunkExecutor(config)
    executor.add_chunk(torch.zeros(1, 30, 2))
    for _ in range(4):
        executor.next_action()
    executor.add_chunk(torch.ones(1, 30, 2))
    first = [executor.next_action()[0, 0].item() for _ in range(4)]
    assert first == pytest.approx([0.25, 0.5, 0.75, 1.0])


def test_anchors_are_interpolated_to_the_control_rate():
    config = tiny_config(chunk_size=4, n_action_steps=8, anchor_horizon_s=1.0, anchor_fps=8.0)
    assert config.executable_steps == 8
    executor = ChunkExecutor(config)
    anchors = torch.tensor([[[1.0], [2.0], [3.0], [4.0]]])  # at 0.25, 0.5, 0.75, 1.0 s
    executor.last_action = torch.tensor([[0.0]])  # the last command: where the robot is headed at t = 0
    executor.add_chunk(anchors)
    assert [executor.next_action().item() for _ in range(8)] == pytest.approx([0.5, 1, 1.5, 2, 2.5, 3, 3.5, 4])
    assert interpolate(torch.zeros(1, 1), anchors, 0.25, torch.tensor([2.0]))[0, 0, 0] == 4.0  # clamped


def test_predicted_proprio_feeds_back_the_last_command(weights, monkeypatch):
    policy = policy_with(weights, use_predicted_proprio=True)
    seen = []
    original = XVLAPolicy.predict_action_chunk

    def recording(self, batch, noise=None, **kwargs):
        seen.append(batch["observation.state"].clone())
        return original(self, batch, noise=noise, **kwargs)

    monkeypatch.setattr(XVLAPolicy, "predict_action_chunk", recording)
    batch = make_batch(policy.config, batch_size=1)
    actions = [policy.select_action(batch) for _ in range(7)]
    assert torch.equal(seen[0], batch["observation.state"])
    assert torch.equal(seen[1], actions[5])  # the 6th action, the last one executed before the second chunk
    with pytest.raises(XVLAConfigError, match="needs IDENTITY STATE and ACTION normalization"):
        tiny_config(action=12, action_mode="so101_bimanual", use_predicted_proprio=True)
