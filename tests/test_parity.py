"""Numerical parity with LeRobot 0.4.4's built-in X-VLA on the same weights and noise (fp32, CPU).

The built-in is a line-for-line port of the original code (with a vendored Florence-2); ours uses
transformers' Florence2Model. Weights go built-in -> ours through the checkpoint converter, so these tests
also pin the key mapping. `python tests/test_parity.py` prints the table of maximum differences.
"""

from __future__ import annotations

import pytest
import torch
from lerobot.policies.xvla.configuration_xvla import XVLAConfig as BuiltinConfig
from lerobot.policies.xvla.modeling_xvla import XVLAPolicy as BuiltinPolicy

from lerobot_xvla import XVLAPolicy, builtin_xvla
from lerobot_xvla.checkpoints import load_state_dict_strict

from conftest import make_batch, randomize_, tiny_config, tiny_kwargs

TOLERANCE = 1e-5
SHARED_MODES = {"ee6d": 20, "joint": 14, "agibot_ee6d": 20, "franka_joint7": 7, "auto": 9}


def make_pair(views: int = 2, action_mode: str = "ee6d", **overrides) -> tuple[BuiltinPolicy, XVLAPolicy]:
    """The built-in policy with random weights, and ours loaded from its state dict."""
    action = SHARED_MODES[action_mode]
    with builtin_xvla():
        builtin = BuiltinPolicy(BuiltinConfig(**tiny_kwargs(views, action=action, action_mode=action_mode, **overrides)))
    randomize_(builtin)
    with torch.no_grad():  # small predictions keep the x500-weighted losses O(1), where fp32 resolves 1e-5
        builtin.model.transformer.action_decoder.fc.weight.mul_(0.1)
    ours = XVLAPolicy(tiny_config(views, action=action, action_mode=action_mode, **overrides))
    load_state_dict_strict(ours, builtin.state_dict())
    return builtin.eval(), ours.eval()


def policy_differences(builtin, ours, batch, seed: int = 0) -> dict[str, float]:
    """Max abs differences of the predicted chunk and of every training loss term, same RNG on both sides."""
    torch.manual_seed(seed)
    expected = builtin.predict_action_chunk(batch)
    torch.manual_seed(seed)
    actual = ours.predict_action_chunk(batch)
    assert actual.shape == expected.shape
    torch.manual_seed(seed + 1)
    _, expected_losses = builtin.forward(batch)
    torch.manual_seed(seed + 1)
    _, actual_losses = ours.forward(batch)
    assert actual_losses.keys() == expected_losses.keys()
    diffs = {"actions": (actual - expected).abs().max().item()}
    diffs.update({name: abs(actual_losses[name] - value) for name, value in expected_losses.items()})
    return diffs


def model_differences(builtin, ours, image_mask: torch.Tensor, domain_id: torch.Tensor, seed: int = 0) -> float:
    """generate_actions called directly with an arbitrary per-sample view mask (the original's interface)."""
    generator = torch.Generator().manual_seed(seed)
    batch, views = image_mask.shape
    inputs = {
        "input_ids": torch.randint(4, 1000, (batch, 16), generator=generator),
        "image_input": torch.randn(batch, views, 3, 64, 64, generator=generator),
        "image_mask": image_mask,
        "domain_id": domain_id,
        "proprio": torch.randn(batch, 20, generator=generator) * 0.1,
    }
    torch.manual_seed(seed)
    expected = builtin.model.generate_actions(**inputs, steps=10)  # draws its noise from the global RNG
    torch.manual_seed(seed)
    noise = torch.randn(batch, 30, ours.model.dim_action)  # the same draw, passed explicitly
    actual = ours.model.generate_actions(**inputs, steps=10, noise=noise)
    return (actual - expected).abs().max().item()


# (cameras with images, view slots): the extra slots are masked zero views.
VIEW_CASES = [(1, 1), (1, 2), (2, 3), (3, 3)]
DOMAIN_CASES = [[0, 0], [3, 5], [7, 1]]


@pytest.mark.parametrize("present,slots", VIEW_CASES)
def test_views_and_masked_views(present, slots):
    builtin, ours = make_pair(present, num_image_views=slots)
    batch = make_batch(ours.config)
    batch["domain_id"] = torch.tensor([2, 6])
    for name, diff in policy_differences(builtin, ours, batch).items():
        assert diff <= TOLERANCE, (name, diff)


@pytest.mark.parametrize("action_mode", sorted(SHARED_MODES))
@pytest.mark.parametrize("use_hetero_proj", [False, True])
def test_action_modes_and_hetero_projection(action_mode, use_hetero_proj):
    builtin, ours = make_pair(2, action_mode, num_image_views=3, use_hetero_proj=use_hetero_proj)
    batch = make_batch(ours.config, seed=1)
    batch["domain_id"] = torch.tensor([1, 4])
    for name, diff in policy_differences(builtin, ours, batch).items():
        assert diff <= TOLERANCE, (action_mode, name, diff)


@pytest.mark.parametrize("domain_ids", DOMAIN_CASES)
def test_domain_ids_and_per_sample_view_masks(domain_ids):
    builtin, ours = make_pair(3, use_hetero_proj=True)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    assert model_differences(builtin, ours, mask, torch.tensor(domain_ids)) <= TOLERANCE


def parity_table() -> list[tuple[str, float]]:
    rows = []
    for present, slots in VIEW_CASES:
        builtin, ours = make_pair(present, num_image_views=slots)
        batch = make_batch(ours.config)
        batch["domain_id"] = torch.tensor([2, 6])
        rows.append((f"ee6d, {present} camera(s) in {slots} view slot(s)", max(policy_differences(builtin, ours, batch).values())))
    for mode in sorted(SHARED_MODES):
        for hetero in (False, True):
            builtin, ours = make_pair(2, mode, num_image_views=3, use_hetero_proj=hetero)
            batch = make_batch(ours.config, seed=1)
            batch["domain_id"] = torch.tensor([1, 4])
            rows.append((f"{mode}, use_hetero_proj={hetero}", max(policy_differences(builtin, ours, batch).values())))
    for ids in DOMAIN_CASES:
        builtin, ours = make_pair(3, use_hetero_proj=True)
        mask = torch.tensor([[True, False, True], [True, True, False]])
        rows.append((f"generate_actions, domain ids {ids}, per-sample masks", model_differences(builtin, ours, mask, torch.tensor(ids))))
    return rows


if __name__ == "__main__":
    print("| case (actions and every loss term) | max abs difference |\n|---|---|")
    for case, diff in parity_table():
        print(f"| {case} | {diff:.2e} |")
