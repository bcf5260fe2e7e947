"""Bad input through the policy API as lerobot-eval and lerobot-rollout call it (preprocessor, then
`select_action`, then postprocessor): every class gets a ValueError that names the camera or field and says
what was expected, raised before anything reaches the model (or a robot)."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from lerobot.policies.factory import make_pre_post_processors

from lerobot_xvla import XVLAPolicy
from lerobot_xvla.processor_xvla import make_xvla_pre_post_processors

from conftest import tiny_config

CAM0, CAM1, STATE = "observation.images.cam0", "observation.images.cam1", "observation.state"
STATS = {
    key: {"mean": torch.zeros(20), "std": torch.ones(20), "min": -torch.ones(20) * 5, "max": torch.ones(20) * 5}
    for key in (STATE, "action")
}


def observation(batch: int | None = None) -> dict:
    """What an env observation looks like after LeRobot's env processors: float images in [0, 1]."""
    generator = torch.Generator().manual_seed(0)
    lead = () if batch is None else (batch,)
    obs = {key: torch.rand(*lead, 3, 64, 64, generator=generator) for key in (CAM0, CAM1)}
    obs[STATE] = torch.randn(*lead, 20, generator=generator)
    obs["task"] = "pick up the red cube" if batch is None else ["pick up the red cube"] * batch
    return obs


def with_value(obs: dict, key: str, index: tuple, value: float) -> dict:
    obs[key] = obs[key].clone()
    obs[key][index] = value
    return obs


# (class, how to break a good observation, the error's text)
CASES = [
    ("nan pixel", lambda o: with_value(o, CAM0, (1, 5, 7), float("nan")), f"camera '{CAM0}' holds NaN or inf pixels"),
    ("inf pixel", lambda o: with_value(o, CAM1, (0, 0, 0), float("inf")), f"camera '{CAM1}' holds NaN or inf pixels"),
    ("float pixels in 0-255", lambda o: {**o, CAM0: o[CAM0] * 255}, f"camera '{CAM0}' has values in [0"),
    ("negative pixels", lambda o: {**o, CAM0: o[CAM0] - 0.5}, f"camera '{CAM0}' has values in [-0.4999, 0.4999]; xvla_image_to_float expects float images in [0, 1]"),
    ("one channel", lambda o: {**o, CAM0: o[CAM0][:1]}, f"camera '{CAM0}' has shape (1, 1, 64, 64); xvla_image_to_float expects RGB images [B, 3, H, W]"),
    ("four channels", lambda o: {**o, CAM1: torch.cat([o[CAM1], o[CAM1][:1]])}, f"camera '{CAM1}' has shape (1, 4, 64, 64)"),
    ("channel last", lambda o: {**o, CAM0: o[CAM0].permute(1, 2, 0)}, f"camera '{CAM0}' has shape (1, 64, 64, 3) (channel-last? permute to channel-first)"),
    ("zero-size image", lambda o: {**o, CAM0: torch.zeros(3, 0, 0)}, f"camera '{CAM0}' has shape (1, 3, 0, 0)"),
    ("integer image", lambda o: {**o, CAM0: (o[CAM0] * 255).long()}, f"camera '{CAM0}' has dtype torch.int64; xvla_image_to_float expects uint8"),
    ("boolean image", lambda o: {**o, CAM0: o[CAM0] > 0.5}, f"camera '{CAM0}' has dtype torch.bool"),
    ("missing camera", lambda o: {k: v for k, v in o.items() if k != CAM1}, f"camera '{CAM1}' is missing from the batch"),
    ("nan state", lambda o: with_value(o, STATE, (3,), float("nan")), f"'{STATE}' holds NaN or inf at indices [3]"),
    ("inf state", lambda o: with_value(o, STATE, (19,), -float("inf")), f"'{STATE}' holds NaN or inf at indices [19]"),
    ("narrow state", lambda o: {**o, STATE: o[STATE][:6]}, f"'{STATE}' has shape (1, 6); this policy expects [B, 20] state values"),
    ("wide state", lambda o: {**o, STATE: torch.zeros(32)}, f"'{STATE}' has shape (1, 32); this policy expects [B, 20]"),
    ("missing state", lambda o: {k: v for k, v in o.items() if k != STATE}, f"the observation has no '{STATE}'; this policy expects 20"),
    ("integer state", lambda o: {**o, STATE: torch.zeros(20, dtype=torch.long)}, f"'{STATE}' has dtype torch.int64; expected floating point"),
]
BATCHED_CASES = [
    ("state batch differs", lambda o: {**o, STATE: o[STATE][:1]}, "the batch sizes of the inputs differ: {'language tokens': 2, 'cameras': 2, 'observation.state': 1}"),
    ("camera batches differ", lambda o: {**o, CAM1: o[CAM1][:1]}, f"the cameras have different batch sizes {{'{CAM0}': 2, '{CAM1}': 1}}"),
    ("task batch differs", lambda o: {**o, "task": o["task"][:1]}, "the batch sizes of the inputs differ: {'language tokens': 1, 'cameras': 2"),
]


@pytest.fixture(scope="module")
def policy_and_processors(tokenizer_dir):
    config = tiny_config(tokenizer_name=tokenizer_dir, num_denoising_steps=2)
    pre, post = make_xvla_pre_post_processors(config, dataset_stats=STATS)
    return XVLAPolicy(config).eval(), pre, post


def act(policy_and_processors, obs: dict) -> torch.Tensor:
    policy, pre, post = policy_and_processors
    policy.reset()
    return post(policy.select_action(pre(obs)))


@pytest.mark.parametrize("batch", [None, 2])
def test_a_good_observation_acts(policy_and_processors, batch):
    action = act(policy_and_processors, observation(batch))
    assert action.shape == (batch or 1, 20) and torch.isfinite(action).all()


@pytest.mark.parametrize(("name", "corrupt", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_observation_is_refused_by_name(policy_and_processors, name, corrupt, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        act(policy_and_processors, corrupt(copy.copy(observation())))


@pytest.mark.parametrize(("name", "corrupt", "message"), BATCHED_CASES, ids=[c[0] for c in BATCHED_CASES])
def test_inconsistent_batch_sizes_are_refused(policy_and_processors, name, corrupt, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        act(policy_and_processors, corrupt(copy.copy(observation(2))))


def nan_frame_stats() -> dict:
    """Statistics of a dataset whose action column 4 has one NaN frame."""
    stats = copy.deepcopy(STATS)
    for name in ("mean", "std", "max"):
        stats["action"][name][4] = float("nan")
    return stats


def test_non_finite_dataset_statistics_are_refused(tokenizer_dir):
    expected = "the dataset statistics hold non-finite values: action mean[4]=nan, action std[4]=nan, action max[4]=nan"
    with pytest.raises(ValueError, match=re.escape(expected)):
        make_xvla_pre_post_processors(tiny_config(tokenizer_name=tokenizer_dir), dataset_stats=nan_frame_stats())


def test_image_statistics_may_be_anything(tokenizer_dir):
    """Images are not normalised by the dataset statistics (VISUAL is IDENTITY), so theirs are not checked."""
    stats = {**STATS, CAM0: {"mean": torch.full((3, 1, 1), float("nan"))}}
    make_xvla_pre_post_processors(tiny_config(tokenizer_name=tokenizer_dir), dataset_stats=stats)


@pytest.mark.parametrize("pipeline", ["preprocessor", "postprocessor"])
def test_non_finite_checkpoint_statistics_are_refused_on_load(tmp_path, tokenizer_dir, pipeline):
    """Processor files whose statistics hold NaN (written by another tool, or by LeRobot's built-in X-VLA)."""
    config = tiny_config(tokenizer_name=tokenizer_dir)
    index = 0 if pipeline == "preprocessor" else 1
    clean, broken = (make_xvla_pre_post_processors(config, dataset_stats=copy.deepcopy(STATS)) for _ in range(2))
    normaliser = next(s for s in broken[index].steps if hasattr(s, "_tensor_stats"))
    normaliser._tensor_stats[STATE if pipeline == "preprocessor" else "action"]["min"][2] = float("inf")
    broken[index].save_pretrained(tmp_path)
    clean[1 - index].save_pretrained(tmp_path)
    key = STATE if pipeline == "preprocessor" else "action"
    with pytest.raises(ValueError, match=re.escape(f"the checkpoint's {pipeline} statistics hold non-finite values: {key} min[2]=inf")):
        make_pre_post_processors(config, pretrained_path=str(tmp_path))


def test_the_guard_refuses_an_action_of_the_wrong_width(policy_and_processors):
    _, _, post = policy_and_processors
    with pytest.raises(ValueError, match=re.escape("xvla_action_guard expects actions of 20 values, got shape (1, 14)")):
        post(torch.zeros(1, 14))


def test_processors_saved_without_the_state_check_get_it(tmp_path, tokenizer_dir):
    """Processor files of LeRobot's built-in X-VLA (or older ones of ours) gain the state check on load."""
    config = tiny_config(tokenizer_name=tokenizer_dir)
    pre, post = make_xvla_pre_post_processors(config, dataset_stats=STATS)
    pre.steps = [s for s in pre.steps if type(s).__name__ != "StateCheckStep"]
    pre.save_pretrained(tmp_path)
    post.save_pretrained(tmp_path)
    loaded, _ = make_pre_post_processors(config, pretrained_path=str(tmp_path))
    names = [getattr(s, "_registry_name", type(s).__name__) for s in loaded.steps]
    assert names.index("xvla_check_state") < names.index("device_processor")
    with pytest.raises(ValueError, match=re.escape(f"'{STATE}' holds NaN or inf at indices [0]")):
        loaded(with_value(observation(), STATE, (0,), float("nan")))
