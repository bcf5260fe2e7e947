"""The Python API refuses, by name, what it cannot act on: denoising steps, config overrides, LeRobot's RTC
arguments, state magnitudes, domain ids on every input path (each boundary), blank instructions; on the torch
and on the ONNX Runtime backend."""

from __future__ import annotations

import pytest
import torch
from lerobot.policies.factory import make_pre_post_processors
from lerobot.processor import TransitionKey

from lerobot_xvla import XVLAConfigError, XVLAPolicy
from lerobot_xvla.modeling_xvla import load_for_inference
from lerobot_xvla.processor_xvla import AddDomainIdStep, DefaultTaskStep, make_xvla_pre_post_processors

from conftest import tiny_config

STATE, CAM = "observation.state", "observation.images.cam0"
DOMAINS = 8  # the tiny architecture's num_domains


def observation(batch: int = 1, task: str = "pick up the cube") -> dict:
    generator = torch.Generator().manual_seed(0)
    return {CAM: torch.rand(batch, 3, 64, 64, generator=generator), STATE: torch.randn(batch, 20, generator=generator) * 0.1,
            "task": [task] * batch}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer_dir):
    directory = tmp_path_factory.mktemp("api_inputs")
    config = tiny_config(views=1, tokenizer_name=tokenizer_dir, num_denoising_steps=2, default_task="pick up the cube")
    torch.manual_seed(0)
    XVLAPolicy(config).save_pretrained(directory)
    for pipeline in make_xvla_pre_post_processors(config):
        pipeline.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module", params=["torch", "onnxruntime"])
def loaded(request, checkpoint, tmp_path_factory):
    """(policy, preprocessor, postprocessor) of the checkpoint, and of its ONNX export."""
    if request.param == "torch":
        return load_for_inference(checkpoint)
    pytest.importorskip("onnxruntime", reason="the `edge` extra is not installed here")
    from lerobot_xvla.cli import export

    exported = tmp_path_factory.mktemp("api_inputs_onnx") / "exported"
    export(str(checkpoint), exported)
    return load_for_inference(exported)


@pytest.mark.parametrize("steps", [0, -1, 2.5, True, "3"])
def test_denoising_steps_must_be_a_whole_number_of_at_least_one(loaded, steps):
    policy, pre, _ = loaded
    with pytest.raises(ValueError, match=rf"steps \(denoising steps\) must be a whole number >= 1, got {steps!r}"):
        policy.predict_action_chunk(pre(observation()), steps=steps)
    assert policy.predict_action_chunk(pre(observation()), steps=1).shape == (1, 30, 20)


@pytest.mark.parametrize(("override", "message"), [
    ({"num_denoising_steps": -3}, "num_denoising_steps must be an integer >= 1, got -3"),
    ({"n_action_steps": 0}, "n_action_steps must be in 1..30, got 0"),
    ({"domain_id": DOMAINS}, f"domain_id must be in \\[0, num_domains={DOMAINS}\\), got {DOMAINS}"),
    ({"num_denosing_steps": 4}, "load_for_inference got num_denosing_steps=4, which is not an XVLAConfig field"),
])  # fmt: skip
def test_load_for_inference_validates_its_overrides_like_the_config(checkpoint, override, message):
    with pytest.raises(XVLAConfigError, match=message):
        load_for_inference(checkpoint, **override)


def rtc_chunk(loaded, leftover, delay, batch: int = 1):
    policy, pre, _ = loaded
    return policy.predict_action_chunk(pre(observation(batch)), inference_delay=delay, prev_chunk_left_over=leftover)


@pytest.mark.parametrize(("leftover", "delay", "message"), [
    (torch.zeros(10, 14), 2, "prev_chunk_left_over has 14 values per action; this policy's chunks have 20"),
    (torch.zeros(10, 26), 2, "prev_chunk_left_over has 26 values per action; this policy's chunks have 20"),
    (torch.zeros(20), 2, r"prev_chunk_left_over must be a tensor \[T, 20\] or \[B, T, 20\], got \(20,\)"),
    (torch.zeros(1, 2, 10, 20), 2, r"got \(1, 2, 10, 20\)"),
    (torch.zeros(3, 10, 20), 2, "prev_chunk_left_over has a batch of 3 for observations of batch 1"),
    (torch.full((10, 20), float("nan")), 2, "prev_chunk_left_over holds NaN or inf"),
    (torch.zeros(10, 20), -1, r"inference_delay must be a whole number of steps in 0..30 \(chunk_size\), got -1"),
    (torch.zeros(10, 20), 31, "got 31"),
    (torch.zeros(10, 20), 1.5, "got 1.5"),
])  # fmt: skip
def test_rtc_arguments_that_do_not_fit_are_refused(loaded, leftover, delay, message):
    with pytest.raises(ValueError, match=message):
        rtc_chunk(loaded, leftover, delay)


def test_rtc_arguments_that_fit_guide_the_chunk(loaded):
    """The accepted cases: [T, 20], [1, T, 20] and [B, T, 20], delays 0 and chunk_size."""
    for leftover, delay, batch in ((torch.zeros(10, 20), 0, 1), (torch.zeros(1, 10, 20), 30, 2), (torch.zeros(2, 10, 20), 3, 2)):
        assert rtc_chunk(loaded, leftover, delay, batch).shape == (batch, 30, 20)


@pytest.mark.parametrize("value", [1e7, -1e10, 1e20])
def test_states_beyond_a_robots_magnitude_are_refused(loaded, value):
    _, pre, _ = loaded
    obs = observation()
    obs[STATE][0, 4] = value
    with pytest.raises(ValueError, match=r"'observation.state' holds values beyond \+-1e\+06 at indices \[4\]"):
        pre(obs)


# ----------------------------------------------------------------------------------------------------------
# Domain ids: -1, 0, N-1, N on every path (the /act path is in test_http_server.py)
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("domain", "ok"), [(-1, False), (0, True), (DOMAINS - 1, True), (DOMAINS, False)])
def test_domain_id_boundaries_on_every_input_path(loaded, tokenizer_dir, domain, ok):
    policy, pre, _ = loaded
    paths = {
        "--policy.domain_id": lambda: tiny_config(views=1, tokenizer_name=tokenizer_dir, domain_id=domain),
        "a per-sample domain feature": lambda: AddDomainIdStep(feature_key="observation.domain", num_domains=DOMAINS)(
            {TransitionKey.OBSERVATION: {"observation.domain": torch.tensor([[float(domain)]])}}),
        "the batch's domain_id": lambda: policy.predict_action_chunk({**pre(observation()), "domain_id": torch.tensor([domain])}),
    }
    for name, attempt in paths.items():
        if ok:
            attempt()
        else:
            with pytest.raises((ValueError, XVLAConfigError), match=rf"{domain}\]? .*outside \[0, num_domains={DOMAINS}\)|must be in \[0, num_domains={DOMAINS}\), got {domain}"):
                attempt()


@pytest.mark.parametrize("value", [2.7, -0.5, float("nan")])
def test_domain_ids_that_are_not_whole_numbers_are_refused(loaded, value):
    policy, pre, _ = loaded
    with pytest.raises(ValueError, match="'observation.domain' holds domain ids .* that are not whole numbers"):
        AddDomainIdStep(feature_key="observation.domain", num_domains=DOMAINS)({TransitionKey.OBSERVATION: {"observation.domain": torch.tensor([[value]])}})
    with pytest.raises(ValueError, match="'domain_id' holds domain ids .* that are not whole numbers"):
        policy.predict_action_chunk({**pre(observation()), "domain_id": torch.tensor([value])})
    assert AddDomainIdStep(feature_key="observation.domain")({TransitionKey.OBSERVATION: {"observation.domain": torch.tensor([[2.0]])}})


# ----------------------------------------------------------------------------------------------------------
# Instructions: blank is missing; default_task reaches fresh and loaded policies
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("blank", ["", " ", "\t\n", None])
def test_a_blank_instruction_gets_the_default_task(blank):
    step = DefaultTaskStep(task="fold the towel")
    out = step({TransitionKey.COMPLEMENTARY_DATA: {"task": [blank, "wipe"]}})
    assert out[TransitionKey.COMPLEMENTARY_DATA]["task"] == ["fold the towel", "wipe"]


def test_default_task_reaches_fresh_and_loaded_preprocessors(checkpoint, tokenizer_dir):
    fresh, _ = make_xvla_pre_post_processors(tiny_config(views=1, tokenizer_name=tokenizer_dir, default_task="stack the cups"))
    _, loaded_pre, _ = load_for_inference(checkpoint)
    policy = XVLAPolicy.from_pretrained(checkpoint)
    policy.config.default_task = "open the drawer"
    by_lerobot, _ = make_pre_post_processors(policy.config, pretrained_path=str(checkpoint))
    for pipeline, task in ((fresh, "stack the cups"), (loaded_pre, "pick up the cube"), (by_lerobot, "open the drawer")):
        (step,) = [s for s in pipeline.steps if isinstance(s, DefaultTaskStep)]
        assert step.task == task
        blank = pipeline(observation(task=" "))
        named = pipeline(observation(task=task))
        assert torch.equal(blank["observation.language.tokens"], named["observation.language.tokens"])


# ----------------------------------------------------------------------------------------------------------
# A checkpoint's config and statistics are untrusted input (issue 23's first items)
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("field", "value"), [
    ("depth", 1_000_000), ("num_domains", 1_000_000), ("hidden_size", 2**20), ("num_denoising_steps", 10**9),
    ("chunk_size", 10**6), ("max_len_seq", 10**7),
])  # fmt: skip
def test_sizes_far_beyond_any_checkpoint_are_refused_before_anything_is_built(tokenizer_dir, field, value):
    with pytest.raises(XVLAConfigError, match=rf"{field} must be at most \d+ \(far above any published X-VLA\), got {value}"):
        tiny_config(views=1, tokenizer_name=tokenizer_dir, **{field: value})


@pytest.mark.parametrize("parts", [[""], [" "], [3]])
def test_checkpoint_reinit_must_name_parts(tokenizer_dir, parts):
    with pytest.raises(XVLAConfigError, match="checkpoint_reinit lists parts of the model by name"):
        tiny_config(views=1, tokenizer_name=tokenizer_dir, checkpoint_reinit=parts)


def test_impossible_statistics_and_crossed_guard_bounds_are_refused(tokenizer_dir):
    from lerobot_xvla.processor_xvla import ActionGuardStep

    config = tiny_config(views=1, tokenizer_name=tokenizer_dir)
    good = {"mean": torch.zeros(20), "std": torch.ones(20), "min": -torch.ones(20), "max": torch.ones(20)}
    crossed = {**good, "min": torch.full((20,), 600.0), "max": torch.full((20,), 512.0)}
    with pytest.raises(ValueError, match=r"the dataset statistics are impossible for any dataset: action min\[0\]=600 > max\[0\]=512"):
        make_xvla_pre_post_processors(config, dataset_stats={STATE: good, "action": crossed})
    negative = {**good, "std": torch.full((20,), -100.0)}
    with pytest.raises(ValueError, match=r"observation.state std\[0\]=-100 < 0"):
        make_xvla_pre_post_processors(config, dataset_stats={STATE: negative, "action": good})
    with pytest.raises(ValueError, match=r"bounds need low <= high; index 0 has low=600 > high=512"):
        ActionGuardStep(low=[600.0, 600.0], high=[512.0, 512.0])
