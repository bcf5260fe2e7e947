"""The action-mode registry: losses, input masking and decoding agree with each other."""

from __future__ import annotations

import re

import pytest
import torch

from lerobot_xvla import ACTION_MODES, ActionMode, XVLAPolicy, build_action_mode, register_action_mode
from lerobot_xvla.action_modes import bce, mse

from conftest import make_batch, tiny_config


def test_registry_has_the_documented_modes():
    assert {"ee6d", "joint", "agibot_ee6d", "franka_joint7", "auto", "so101_bimanual"} <= set(ACTION_MODES)


def test_ee6d_grippers_are_logits_masked_at_the_input():
    mode = build_action_mode("ee6d", 20, 20)
    pred = torch.full((1, 2, 20), 2.0)
    decoded = mode.decode(pred)
    assert torch.allclose(decoded[..., [9, 19]], torch.sigmoid(torch.tensor(2.0)).expand(1, 2, 2))
    assert torch.equal(decoded[..., :9], pred[..., :9])
    masked = mode.mask_inputs(torch.ones(3, 20))
    assert masked[:, [9, 19]].abs().sum() == 0 and masked.sum() == 3 * 18


def test_ee6d_single_arm_data_is_padded_and_trimmed():
    mode = build_action_mode("ee6d", 10, 20)
    assert mode.dim_action == 20 and mode.decode(torch.zeros(1, 3, 20)).shape == (1, 3, 10)


def test_so101_bimanual_is_consistent():
    """MSE-trained grippers are neither squashed nor hidden from the network, and no joint counts twice."""
    mode = build_action_mode("so101_bimanual", 12, 20)
    pred, target = torch.randn(2, 5, 20), torch.randn(2, 5, 20)
    decoded = mode.decode(pred)
    assert decoded.shape == (2, 5, 12) and torch.equal(decoded, pred[..., :12])
    state = torch.randn(2, 20)
    assert torch.equal(mode.mask_inputs(state), state)
    losses = mode.loss(pred, target, None)
    assert set(losses) == {"joints_loss", "gripper_loss"}
    joints = [0, 1, 2, 3, 4, 6, 7, 8, 9, 10]
    assert torch.allclose(losses["joints_loss"], (pred[..., joints] - target[..., joints]).square().mean())
    assert torch.allclose(losses["gripper_loss"], (pred[..., [5, 11]] - target[..., [5, 11]]).square().mean())
    pred_padding_changed = pred.clone()
    pred_padding_changed[..., 12:] += 100.0
    assert mode.loss(pred_padding_changed, target, None)["joints_loss"] == losses["joints_loss"]


def test_padded_steps_do_not_count():
    mode = build_action_mode("ee6d", 20, 20)
    pred, target = torch.randn(2, 4, 20), torch.rand(2, 4, 20)
    valid = torch.tensor([[True, True, True, False], [True, True, False, False]])
    reference = mode.loss(pred, target, valid)
    target[~valid] = 1e3
    assert all(torch.allclose(reference[k], v) for k, v in mode.loss(pred, target, valid).items())
    assert torch.allclose(mse(pred, target, [0, 1, 2], valid), (pred - target)[valid][:, :3].square().mean())
    assert torch.allclose(bce(pred, target.clamp(0, 1), 9, None), torch.nn.functional.binary_cross_entropy_with_logits(pred[..., 9], target[..., 9].clamp(0, 1)))


def test_a_user_registered_mode_trains_and_predicts():
    @register_action_mode("test_xyz_yaw")
    class XyzYaw(ActionMode):
        """Position and yaw of a mobile base, with MSE."""

        dim_action = 20
        accepted_dims = (4,)

        def loss(self, pred, target, valid):
            return {"base_loss": mse(pred, target, range(4), valid)}

    try:
        policy = XVLAPolicy(tiny_config(action=4, action_mode="test_xyz_yaw"))
        loss, logs = policy.forward(make_batch(policy.config))
        assert set(logs) == {"loss", "base_loss"} and torch.isfinite(loss)
        assert policy.predict_action_chunk(make_batch(policy.config)).shape == (2, 30, 4)
        with pytest.raises(ValueError, match=re.escape("action mode 'test_xyz_yaw' is already registered by XyzYaw")):
            register_action_mode("test_xyz_yaw")(XyzYaw)
    finally:
        ACTION_MODES.pop("test_xyz_yaw")
