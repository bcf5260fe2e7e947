"""XVLAPolicy behaviour: LeRobot's policy contract, camera handling, bad input, a loss that falls."""

from __future__ import annotations

import re

import pytest
import torch

from lerobot_xvla import XVLAPolicy

from conftest import make_batch, tiny_config, train_losses


@pytest.fixture(scope="module")
def policy() -> XVLAPolicy:
    return XVLAPolicy(tiny_config(2, n_action_steps=4)).eval()


def test_select_action_executes_n_action_steps_per_chunk(policy):
    batch = make_batch(policy.config)
    policy.reset()
    torch.manual_seed(0)
    chunk = policy.predict_action_chunk(batch)
    policy.reset()
    torch.manual_seed(0)
    first = [policy.select_action(batch) for _ in range(4)]
    assert torch.equal(torch.stack(first, dim=1), chunk[:, :4])
    assert len(policy._executor.queue) == 0
    fifth = policy.select_action(batch)  # a new chunk is predicted here
    assert fifth.shape == (2, 20) and len(policy._executor.queue) == 3
    assert torch.isfinite(chunk).all()


def test_cameras_of_any_resolution_are_resized(policy):
    batch = make_batch(policy.config)
    batch["observation.images.cam0"] = torch.randn(2, 3, 96, 128)
    batch["observation.images.cam1"] = torch.randn(2, 5, 3, 48, 48)  # [B, T, C, H, W]: the last frame is used
    images, mask = policy._images(batch)
    assert images.shape == (2, 2, 3, 64, 64) and mask.all()


def test_declared_empty_cameras_are_masked_zero_views():
    policy = XVLAPolicy(tiny_config(1, empty_cameras=1)).eval()
    images, mask = policy._images(make_batch(policy.config))
    assert mask.tolist() == [[True, False], [True, False]]
    assert images[:, 1].abs().sum() == 0


def test_padded_and_missing_steps_are_excluded_from_the_loss(policy, monkeypatch):
    """Steps flagged by action_is_pad, and steps past a short target chunk, get valid=False (see the
    action-mode tests for the loss ignoring them)."""
    batch = make_batch(policy.config)
    batch["action"] = batch["action"][:, :25]
    batch["action_is_pad"] = torch.zeros(2, 25, dtype=torch.bool)
    batch["action_is_pad"][0, 20:] = True
    actions, valid, first_point = policy._targets(batch)
    assert first_point is None  # no time anchors: the proprio stays observation.state
    assert actions.shape == (2, 30, 20)
    assert valid[0].tolist() == [True] * 20 + [False] * 10
    assert valid[1].tolist() == [True] * 25 + [False] * 5
    seen = []
    original_loss = policy.model.action_mode.loss

    def recording_loss(pred, target, mask):
        seen.append(mask)
        return original_loss(pred, target, mask)

    monkeypatch.setattr(policy.model.action_mode, "loss", recording_loss)
    policy.forward(batch)
    assert torch.equal(seen[0], valid)


def test_loss_falls_when_training():
    torch.manual_seed(0)
    policy = XVLAPolicy(tiny_config(2))
    losses = train_losses(policy, make_batch(policy.config, batch_size=4))
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses


def test_optimizer_groups_follow_the_original_recipe(policy):
    groups = {g["name"]: g for g in policy.get_optim_params()}
    assert set(groups) == {"vlm", "soft_prompts", "action_heads", "transformer_core"}
    lr = policy.config.optimizer_lr
    assert groups["vlm"]["lr"] == groups["soft_prompts"]["lr"] == pytest.approx(0.1 * lr)
    assert groups["action_heads"]["lr"] == groups["transformer_core"]["lr"] == lr
    core = {id(p) for p in groups["transformer_core"]["params"]}
    assert id(policy.model.transformer.vlm_proj.weight) in core  # not at the VLM's 0.1x (LeRobot's built-in)
    count = sum(p.numel() for g in groups.values() for p in g["params"])
    assert count == sum(p.numel() for p in policy.parameters())


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda b: b.pop("observation.images.cam1"), "camera 'observation.images.cam1' is missing from the batch"),
        (lambda b: b.update({"observation.images.cam0": torch.rand(2, 64, 64)}), "camera 'observation.images.cam0' has shape (2, 64, 64); expected [B, 3, H, W]"),
        (lambda b: b.update({"observation.images.cam0": torch.rand(2, 1, 64, 64)}), "camera 'observation.images.cam0' has shape (2, 1, 64, 64)"),
        (lambda b: b.update({"observation.state": torch.rand(2, 21)}), "'observation.state' has 21 values; max_state_dim=20"),
        (lambda b: b.pop("observation.state"), "the batch has no 'observation.state' (use_proprio=True)"),
        (lambda b: b.update({"domain_id": torch.tensor([1, 8])}), "'domain_id' has domain ids [1, 8] outside [0, num_domains=8)"),
        (lambda b: b.update({"domain_id": torch.tensor([1, 2, 3])}), "'domain_id' holds 3 domain ids for a batch of 2"),
        (lambda b: b.pop("observation.language.tokens"), "the batch has no 'observation.language.tokens'"),
    ],
)
def test_bad_input_names_the_field(policy, edit, message):
    batch = make_batch(policy.config)
    edit(batch)
    with pytest.raises(ValueError, match=re.escape(message)):
        policy.predict_action_chunk(batch)


def test_build_model_inputs_as_lerobots_own_xvla_test_calls_it(policy):
    """LeRobot's X-VLA test calls `policy._build_model_inputs(preprocessed_batch)` and checks these shapes."""
    batch = make_batch(policy.config, batch_size=1)
    batch["observation.state"] = batch["observation.state"][:, :6]  # a narrower state is padded to max_state_dim
    inputs = policy._build_model_inputs(batch)
    shapes = {name: tuple(value.shape) for name, value in inputs.items()}
    tokens = policy.config.tokenizer_max_length
    assert shapes == {"input_ids": (1, tokens), "image_input": (1, 2, 3, 64, 64), "image_mask": (1, 2), "domain_id": (1,), "proprio": (1, 20)}
    assert torch.equal(inputs["proprio"][:, :6], batch["observation.state"]) and not inputs["proprio"][:, 6:].any()
