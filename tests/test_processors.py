"""The X-VLA processors: LeRobot's standard steps, image steps without guesses, domain ids, files of both
implementations, and the action guard."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
from lerobot.policies.factory import make_pre_post_processors
from lerobot.policies.xvla.configuration_xvla import XVLAConfig as BuiltinConfig
from lerobot.policies.xvla.processor_xvla import make_xvla_pre_post_processors as builtin_processors
from lerobot.processor import PolicyProcessorPipeline
from lerobot.processor.converters import policy_action_to_transition, transition_to_policy_action

from lerobot_xvla import XVLAConfigError, XVLAPolicy, builtin_xvla
from lerobot_xvla.processor_xvla import (
    ActionGuardStep,
    AddDomainIdStep,
    ImageNetNormalizeStep,
    ImageToFloatStep,
    make_xvla_pre_post_processors,
)

from conftest import tiny_config, tiny_kwargs

STATS = {
    "observation.state": {"mean": torch.zeros(20), "std": torch.ones(20), "min": -torch.ones(20), "max": torch.ones(20)},
    "action": {"mean": torch.zeros(20), "std": torch.ones(20), "min": -torch.ones(20), "max": torch.ones(20)},
}


def observation(cameras=("observation.images.cam0", "observation.images.cam1"), size=(64, 64), uint8=True) -> dict:
    generator = torch.Generator().manual_seed(0)
    obs = {"observation.state": torch.randn(20, generator=generator), "task": "pick up the red cube"}
    for key in cameras:
        image = torch.randint(0, 256, (3, *size), generator=generator, dtype=torch.uint8)
        obs[key] = image if uint8 else image.float() / 255
    return obs


def test_pipelines_contain_lerobots_overridable_steps(tokenizer_dir):
    pre, post = make_xvla_pre_post_processors(tiny_config(tokenizer_name=tokenizer_dir), dataset_stats=STATS)
    names = [getattr(step, "_registry_name", None) for step in pre.steps]
    for overridable in ("rename_observations_processor", "device_processor", "normalizer_processor", "tokenizer_processor"):
        assert overridable in names
    assert names.index("xvla_imagenet_normalize") < names.index("device_processor")  # checks run on the CPU
    assert [getattr(s, "_registry_name", None) for s in post.steps] == ["unnormalizer_processor", "device_processor", "xvla_action_guard"]


def test_local_tokenizer_uint8_and_float_images(tokenizer_dir):
    config = tiny_config(tokenizer_name=tokenizer_dir)
    pre, _ = make_xvla_pre_post_processors(config, dataset_stats=STATS)
    from_uint8, from_float = pre(observation(uint8=True)), pre(observation(uint8=False))
    tokens = from_uint8["observation.language.tokens"]
    assert tokens.shape == (1, config.tokenizer_max_length) and tokens[0, 0] == 0  # BART's <s>
    image = from_uint8["observation.images.cam0"]
    assert image.dtype == torch.float32 and image.shape == (1, 3, 64, 64)
    assert torch.allclose(image, from_float["observation.images.cam0"], atol=1e-6)
    expected = (observation()["observation.images.cam0"].float() / 255 - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    assert torch.allclose(image[0], expected, atol=1e-5)
    assert torch.equal(from_uint8["domain_id"], torch.tensor([0]))


def test_dark_uint8_frames_are_still_divided():
    """LeRobot's built-in guesses the range from max <= 1: a nearly black uint8 frame was left in [0, 255]."""
    dark = {"observation.images.cam0": torch.ones(1, 3, 4, 4, dtype=torch.uint8)}
    out = ImageToFloatStep().process(dict(dark))
    assert torch.allclose(out["observation.images.cam0"], torch.full((1, 3, 4, 4), 1 / 255))


def test_float_images_outside_unit_range_are_refused():
    bad = {"observation.images.cam0": torch.full((1, 3, 4, 4), 200.0)}
    with pytest.raises(ValueError, match=re.escape("camera 'observation.images.cam0' has values in [200, 200]; xvla_image_to_float expects float images in [0, 1] or uint8 images in [0, 255]")):
        ImageToFloatStep().process(bad)
    with pytest.raises(ValueError, match="xvla_imagenet_normalize expects"):
        ImageNetNormalizeStep().process({"observation.image": torch.full((1, 3, 4, 4), -0.5)})


def test_builtin_processor_files_load_and_give_the_same_tensors(tmp_path, tokenizer_dir):
    with builtin_xvla():
        builtin_pre, _ = builtin_processors(BuiltinConfig(**tiny_kwargs(2, tokenizer_name=tokenizer_dir)), dataset_stats=STATS)
    builtin_pre.save_pretrained(tmp_path)
    loaded = PolicyProcessorPipeline.from_pretrained(tmp_path, config_filename="policy_preprocessor.json")
    assert {type(s) for s in loaded.steps} >= {ImageToFloatStep, ImageNetNormalizeStep, AddDomainIdStep}
    for uint8 in (True, False):
        expected, actual = builtin_pre(observation(uint8=uint8)), loaded(observation(uint8=uint8))
        for key, value in expected.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(actual[key], value), key


def test_saved_pipelines_round_trip_through_lerobots_factory(tmp_path, tokenizer_dir):
    config = tiny_config(tokenizer_name=tokenizer_dir, domain_id=5)
    pre, post = make_xvla_pre_post_processors(config, dataset_stats=STATS)
    pre.save_pretrained(tmp_path)
    post.save_pretrained(tmp_path)
    overrides = {"device_processor": {"device": "cpu"}, "normalizer_processor": {"stats": STATS}, "rename_observations_processor": {"rename_map": {}}}
    loaded_pre, loaded_post = make_pre_post_processors(config, pretrained_path=str(tmp_path), preprocessor_overrides=overrides)
    expected, actual = pre(observation()), loaded_pre(observation())
    assert all(torch.equal(actual[k], v) for k, v in expected.items() if isinstance(v, torch.Tensor))
    assert torch.equal(actual["domain_id"], torch.tensor([5]))
    action = torch.tensor([[0.5, 3.0] + [0.0] * 18])
    assert loaded_post(action)[0, 1] == 1.0  # clamped to the training range


def test_per_sample_domain_ids_from_a_dataset_feature():
    step = AddDomainIdStep(feature_key="observation.domain", num_domains=8)
    pipeline = PolicyProcessorPipeline(steps=[step])
    out = pipeline({"observation.domain": torch.tensor([[3.0], [7.0]]), "observation.state": torch.zeros(2, 20)})
    assert out["domain_id"].tolist() == [3, 7] and out["domain_id"].dtype == torch.long
    with pytest.raises(ValueError, match=re.escape("domain ids [3, 9] are outside [0, num_domains=8)")):
        pipeline({"observation.domain": torch.tensor([[3.0], [9.0]]), "observation.state": torch.zeros(2, 20)})


def test_domain_map_resolves_the_robot_being_trained_or_recorded():
    config = tiny_config(domain_map={"bi_so_follower": 7, "local/aloha_sim": 4})
    XVLAPolicy(config, dataset_meta=SimpleNamespace(robot_type="bi_so_follower", repo_id="me/towels"))
    assert config.domain_id == 7
    XVLAPolicy(config, dataset_meta=SimpleNamespace(robot_type=None, repo_id="local/aloha_sim"))
    assert config.domain_id == 4
    with pytest.raises(ValueError, match=re.escape("domain_map has no entry for robot type 'koch_follower' or dataset 'me/x'")):
        XVLAPolicy(config, dataset_meta=SimpleNamespace(robot_type="koch_follower", repo_id="me/x"))
    with pytest.raises(XVLAConfigError, match=re.escape("domain_map['a'] must be in [0, num_domains=8), got 30")):
        tiny_config(domain_map={"a": 30})


def test_action_guard_refuses_non_finite_and_clamps():
    guard = PolicyProcessorPipeline(
        steps=[ActionGuardStep(low=[-1.0, 0.0], high=[1.0, 100.0])],
        to_transition=policy_action_to_transition,
        to_output=transition_to_policy_action,
    )
    assert guard(torch.tensor([[5.0, -3.0]])).tolist() == [[1.0, 0.0]]
    assert guard(torch.tensor([[0.5, 50.0]])).tolist() == [[0.5, 50.0]]
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="non-finite actions"):
            guard(torch.tensor([[0.0, bad]]))
    with pytest.raises(ValueError, match=re.escape("xvla_action_guard expects actions of 2 values, got shape (1, 3)")):
        guard(torch.zeros(1, 3))


@pytest.mark.parametrize("bound", ["low", "high"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_action_guard_refuses_non_finite_bounds(bound, value):
    """Statistics of a dataset with a NaN frame: a clamp to a NaN bound would hand NaN to the robot."""
    bounds = {"low": [-1.0, 0.0, -2.0], "high": [1.0, 100.0, 2.0]}
    bounds[bound][1] = value
    guard = PolicyProcessorPipeline(
        steps=[ActionGuardStep(**bounds)], to_transition=policy_action_to_transition, to_output=transition_to_policy_action
    )
    with pytest.raises(ValueError, match=re.escape("bounds are not finite for action channels [1]")):
        guard(torch.zeros(1, 3))


def test_more_than_three_cameras_of_different_resolutions(tokenizer_dir):
    cameras = [f"observation.images.cam{i}" for i in range(5)]
    config = tiny_config(5, tokenizer_name=tokenizer_dir, primary_camera="observation.images.cam3")
    policy = XVLAPolicy(config).eval()
    pre, post = make_xvla_pre_post_processors(config, dataset_stats=STATS)
    obs = observation(cameras)
    obs["observation.images.cam1"] = torch.randint(0, 256, (3, 48, 80), dtype=torch.uint8)
    obs["observation.images.cam4"] = torch.randint(0, 256, (3, 120, 90), dtype=torch.uint8)
    action = post(policy.select_action(pre(obs)))
    assert action.shape == (1, 20) and torch.isfinite(action).all()
    images, mask = policy._images(pre(obs))
    assert images.shape == (1, 5, 3, 64, 64) and mask.all()
    assert torch.equal(images[0, 0], policy._resize(pre(obs)["observation.images.cam3"])[0])  # primary first


def test_domain_id_of_a_builtin_preprocessor_is_adopted_unless_the_config_sets_one(tmp_path, tokenizer_dir):
    with builtin_xvla():
        builtin_pre, builtin_post = builtin_processors(BuiltinConfig(**tiny_kwargs(2, tokenizer_name=tokenizer_dir)), dataset_stats=STATS)
    next(s for s in builtin_pre.steps if type(s).__name__ == "XVLAAddDomainIdProcessorStep").domain_id = 3
    builtin_pre.save_pretrained(tmp_path)
    builtin_post.save_pretrained(tmp_path)
    adopting = tiny_config(tokenizer_name=tokenizer_dir)
    pre, _ = make_pre_post_processors(adopting, pretrained_path=str(tmp_path))
    assert adopting.domain_id == 3 and pre(observation())["domain_id"].tolist() == [3]
    explicit = tiny_config(tokenizer_name=tokenizer_dir, domain_id=6)
    pre, _ = make_pre_post_processors(explicit, pretrained_path=str(tmp_path))
    assert pre(observation())["domain_id"].tolist() == [6]


def test_guard_bounds_follow_overridden_statistics(tmp_path, tokenizer_dir):
    """Fine-tuning from --policy.path on another dataset: lerobot-train overrides the unnormaliser's
    statistics, and the guard's bounds follow them."""
    config = tiny_config(tokenizer_name=tokenizer_dir)
    for pipeline in make_xvla_pre_post_processors(config, dataset_stats=STATS):
        pipeline.save_pretrained(tmp_path)
    wider = {"action": {**STATS["action"], "min": -torch.ones(20) * 3, "max": torch.ones(20) * 3}}
    _, post = make_pre_post_processors(
        config, pretrained_path=str(tmp_path), postprocessor_overrides={"unnormalizer_processor": {"stats": wider}}
    )
    assert post(torch.full((1, 20), 7.0)).tolist() == [[3.0] * 20]


def test_builtin_checkpoints_get_the_action_guard_too(tmp_path, tokenizer_dir):
    """Processor files of LeRobot's built-in X-VLA have no guard; loading them for our policy adds one,
    bounded by the checkpoint's own action statistics."""
    with builtin_xvla():
        for pipeline in builtin_processors(BuiltinConfig(**tiny_kwargs(2, tokenizer_name=tokenizer_dir)), dataset_stats=STATS):
            pipeline.save_pretrained(tmp_path)
    _, post = make_pre_post_processors(tiny_config(tokenizer_name=tokenizer_dir), pretrained_path=str(tmp_path))
    assert isinstance(post.steps[-1], ActionGuardStep)
    assert post(torch.full((1, 20), 7.0)).tolist() == [[1.0] * 20]
    with pytest.raises(ValueError, match="non-finite actions"):
        post(torch.full((1, 20), float("nan")))


def test_observations_without_task_text_get_the_trained_instruction(tokenizer_dir, caplog):
    """lerobot-eval sends "" for envs without a task (PushT, ALOHA): the tokens must be those of default_task."""
    trained = "push the block"
    config = tiny_config(tokenizer_name=tokenizer_dir, default_task=trained)
    pre, _ = make_xvla_pre_post_processors(config, dataset_stats=STATS)
    expected = pre({**observation(), "task": trained})["observation.language.tokens"]
    with caplog.at_level("INFO", logger="lerobot_xvla"):
        for missing in ("", None, [""]):
            assert torch.equal(pre({**observation(), "task": missing})["observation.language.tokens"], expected)
    assert caplog.text.count(f"using the instruction it was trained with, {trained!r}") == 1  # logged once
    other = pre({**observation(), "task": "open the drawer"})["observation.language.tokens"]
    assert not torch.equal(other, expected)  # a given instruction is kept


def test_without_a_default_task_an_empty_instruction_is_warned_about(tokenizer_dir, caplog):
    pre, _ = make_xvla_pre_post_processors(tiny_config(tokenizer_name=tokenizer_dir), dataset_stats=STATS)
    with caplog.at_level("WARNING", logger="lerobot_xvla"):
        pre({**observation(), "task": ""})
    assert "X-VLA got an empty instruction and has no default_task" in caplog.text
