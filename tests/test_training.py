"""The paper's training recipe: parameter groups, the two-stage schedule (and resuming it), time anchors,
new-domain initialisation, LoRA defaults, precision and gradient checkpointing."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from lerobot.configs.default import PeftConfig
from lerobot.configs.types import FeatureType, PolicyFeature
from lerobot_xvla.compat import load_training_state, save_training_state

from lerobot_xvla import XVLAConfig, XVLAConfigError, XVLAPolicy
from lerobot_xvla.training import TwoStageSchedulerConfig, group_of, resample_anchors

from conftest import make_batch, randomize_, tiny_config


def optimizer_and_scheduler(policy: XVLAPolicy, steps: int = 100):
    optimizer = policy.config.get_optimizer_preset().build(policy.get_optim_params())
    return optimizer, policy.config.get_scheduler_preset().build(optimizer, steps)


def rates(optimizer) -> dict[str, float]:
    return {group["name"]: group["lr"] for group in optimizer.param_groups}


def rates_over(optimizer, scheduler, steps: int) -> list[dict[str, float]]:
    """The rates of each of `steps` optimizer steps, stepping the scheduler after each."""
    history = []
    for _ in range(steps):
        history.append(rates(optimizer))
        optimizer.step()
        scheduler.step()
    return history


def test_every_parameter_in_exactly_one_of_the_four_groups():
    policy = XVLAPolicy(tiny_config())
    groups = policy.get_optim_params()
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen)) == len(list(policy.parameters()))
    by_name = {name: g["name"] for g in groups for name, p in policy.model.named_parameters() if any(p is q for q in g["params"])}
    assert by_name["vlm.vision_tower.convs.0.conv.weight"] == "vlm"
    assert by_name["transformer.vlm_proj.weight"] == "transformer_core"
    assert by_name["transformer.pos_emb"] == "transformer_core"
    assert by_name["transformer.soft_prompt_hub.weight"] == "soft_prompts"
    assert by_name["transformer.action_encoder.fc.weight"] == by_name["transformer.action_decoder.bias.weight"] == "action_heads"
    peft_name = "base_model.model.model.transformer.action_decoder.modules_to_save.default.fc.weight"
    assert group_of(peft_name.removeprefix("base_model.model.model.")) == group_of(peft_name) == "action_heads"


def test_learning_rates_per_phase():
    policy = XVLAPolicy(tiny_config(optimizer_lr=1e-3, learning_coef=0.1, freeze_steps=3, scheduler_warmup_steps=4))
    history = rates_over(*optimizer_and_scheduler(policy), steps=9)
    for step in range(3):  # freeze phase: only prompts (0.1x) and heads (1x) move
        assert history[step] == pytest.approx({"vlm": 0.0, "transformer_core": 0.0, "soft_prompts": 1e-4, "action_heads": 1e-3})
    for step, fraction in zip(range(3, 7), (0.25, 0.5, 0.75, 1.0), strict=True):  # linear warm-up of VLM and core
        assert history[step] == pytest.approx({"vlm": 1e-4 * fraction, "transformer_core": 1e-3 * fraction, "soft_prompts": 1e-4, "action_heads": 1e-3})
    assert history[8] == pytest.approx({"vlm": 1e-4, "transformer_core": 1e-3, "soft_prompts": 1e-4, "action_heads": 1e-3})


def test_cosine_decay_reaches_the_floor_of_every_group():
    schedule = TwoStageSchedulerConfig(freeze_steps=2, num_warmup_steps=2, decay="cosine", num_decay_steps=10, min_lr_ratio=0.1)
    assert schedule.factor("vlm", 3) == 1.0 and schedule.factor("action_heads", 3) == 1.0
    assert schedule.factor("vlm", 9) == pytest.approx(0.55)  # half-way through the cosine
    assert schedule.factor("soft_prompts", 14) == schedule.factor("transformer_core", 100) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="does not know parameter group 'head'"):
        schedule.factor("head", 0)


def test_resume_in_the_middle_of_the_warm_up(tmp_path):
    """LeRobot's save/load of the training state continues the schedule exactly where it stopped."""
    config = dict(optimizer_lr=1e-3, freeze_steps=2, scheduler_warmup_steps=4)
    policy = XVLAPolicy(tiny_config(**config))
    optimizer, scheduler = optimizer_and_scheduler(policy)
    straight = rates_over(optimizer, scheduler, 3)
    save_training_state(tmp_path, 3, optimizer, scheduler)  # after 3 steps: one step into the warm-up
    straight += rates_over(optimizer, scheduler, 5)
    resumed_policy = XVLAPolicy(tiny_config(**config))
    optimizer, scheduler = optimizer_and_scheduler(resumed_policy)
    step, optimizer, scheduler = load_training_state(tmp_path, optimizer, scheduler)
    assert step == 3
    for resumed, expected in zip(rates_over(optimizer, scheduler, 5), straight[3:], strict=True):
        assert resumed == pytest.approx(expected)


def test_anchor_resampling_on_a_known_trajectory():
    frames = torch.arange(13, dtype=torch.float32)  # position = frame index
    trajectory = torch.stack([frames, 2 * frames], dim=-1).unsqueeze(0).repeat(2, 1, 1)  # [2, 13, 2]
    valid = torch.ones(2, 13, dtype=torch.bool)
    valid[1, 7:] = False  # the second sample's episode ends 6 frames after the current one
    anchors = resample_anchors(trajectory, valid, horizon=12.0, points=5)
    assert torch.allclose(anchors[0, :, 0], torch.tensor([0.0, 3.0, 6.0, 9.0, 12.0]))
    assert torch.allclose(anchors[1, :, 0], torch.tensor([0.0, 1.5, 3.0, 4.5, 6.0]))  # window shrunk, not padded
    assert torch.allclose(anchors[..., 1], 2 * anchors[..., 0])
    fractional = resample_anchors(trajectory[:1], None, horizon=2.5, points=3)
    assert torch.allclose(fractional[0, :, 0], torch.tensor([0.0, 1.25, 2.5]))


def test_time_anchors_in_the_policy(monkeypatch):
    config = tiny_config(action=20, anchor_horizon_s=1.0, anchor_fps=12.0, chunk_size=6, n_action_steps=6)
    assert config.action_delta_indices == list(range(13))
    policy = XVLAPolicy(config)
    batch = make_batch(policy.config)
    steps = torch.arange(13, dtype=torch.float32)[None, :, None]
    batch["action"] = (steps * 0.01).expand(2, 13, 20).clone()
    targets, valid, first = policy._targets(batch)
    assert valid is None and first.shape == (2, 20) and torch.allclose(first, torch.zeros(2, 20))
    assert torch.allclose(targets[0, :, 0], torch.tensor([0.02, 0.04, 0.06, 0.08, 0.10, 0.12]))
    seen = {}
    original = policy.model.forward

    def recording_forward(**inputs):
        seen.update(inputs)
        return original(**inputs)

    monkeypatch.setattr(policy.model, "forward", recording_forward)
    policy.forward(batch)
    assert torch.equal(seen["proprio"], first)  # the trajectory's first point, not observation.state
    with pytest.raises(XVLAConfigError, match="anchor_horizon_s and anchor_fps go together"):
        tiny_config(anchor_horizon_s=1.0)


def test_a_new_domain_starts_from_a_pretrained_one(tmp_path):
    source = randomize_(XVLAPolicy(tiny_config()))
    source.save_pretrained(tmp_path)
    config = tiny_config(domain_id=6, init_domain_from=2)
    policy = XVLAPolicy.from_pretrained(tmp_path, config=config)
    old, new = source.model.transformer, policy.model.transformer
    for table in ("soft_prompt_hub", "action_encoder.fc", "action_encoder.bias", "action_decoder.fc", "action_decoder.bias"):
        weight = new.get_submodule(table).weight
        assert torch.equal(weight[6], old.get_submodule(table).weight[2]), table
        assert torch.equal(weight[3], old.get_submodule(table).weight[3]), table
    assert config.init_domain_from is None  # applied once; the saved config will not re-apply it
    with pytest.raises(XVLAConfigError, match=re.escape("init_domain_from=2 needs domain_id set to the new robot's (another) id")):
        tiny_config(init_domain_from=2)


def test_lora_defaults_reproduce_the_recipe():
    """At full size on the meta device: LoRA r=8 on every linear layer, prompts and heads trained in full."""
    features = {"observation.images.top": PolicyFeature(FeatureType.VISUAL, (3, 224, 224)), "observation.state": PolicyFeature(FeatureType.STATE, (20,))}
    config = XVLAConfig(device="cpu", input_features=features, output_features={"action": PolicyFeature(FeatureType.ACTION, (20,))}, pretrained_path="base")
    with torch.device("meta"):
        policy = XVLAPolicy(config).wrap_with_peft(peft_cli_overrides=dataclasses.asdict(PeftConfig()))
    trainable = {n: p.numel() for n, p in policy.named_parameters() if p.requires_grad}
    lora = sum(v for n, v in trainable.items() if "lora_" in n)
    full = sum(v for n, v in trainable.items() if "lora_" not in n)
    assert full == 30 * 32 * 1024 + 30 * (72 * 1024 + 1024) + 30 * (1024 * 20 + 20)  # prompts + both heads
    assert lora == 8_052_736  # r=8, not LeRobot's default 16
    assert 0.01 < (lora + full) / sum(p.numel() for p in policy.parameters()) < 0.015
    lora_a = next(p for n, p in policy.named_parameters() if n.endswith("blocks.0.attn.qkv.lora_A.default.weight"))
    assert lora_a.shape[0] == 8


def test_lora_rank_can_still_be_chosen():
    policy = XVLAPolicy(tiny_config(pretrained_path="base"))
    wrapped = policy.wrap_with_peft(peft_cli_overrides=dataclasses.asdict(PeftConfig(r=4)))
    lora_a = next(p for n, p in wrapped.named_parameters() if "lora_A" in n)
    assert lora_a.shape[0] == 4


def test_bf16_autocast_keeps_fp32_master_weights():
    policy = XVLAPolicy(tiny_config(dtype="bfloat16")).train()
    optimizer, _ = optimizer_and_scheduler(policy)
    loss, _ = policy.forward(make_batch(policy.config))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert all(p.dtype == torch.float32 for p in policy.parameters())
    assert all(s["exp_avg"].dtype == torch.float32 for s in optimizer.state.values())


def test_bf16_weights_are_for_inference_only():
    fp32 = randomize_(XVLAPolicy(tiny_config())).eval()
    bf16 = XVLAPolicy(tiny_config(weights_dtype="bfloat16")).eval()
    bf16.load_state_dict(fp32.state_dict())
    assert bf16.model.transformer.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert bf16.model.transformer.norm.weight.dtype == bf16.model.transformer.pos_emb.dtype == torch.float32
    batch = make_batch(fp32.config)
    torch.manual_seed(0)
    reference = fp32.predict_action_chunk(batch)
    torch.manual_seed(0)
    approximate = bf16.predict_action_chunk(batch)
    assert approximate.dtype == torch.float32
    assert (approximate - reference).abs().mean() < 0.02 * reference.abs().mean()  # bf16 keeps ~3 digits
    with pytest.raises(ValueError, match="weights_dtype=bfloat16 is for inference"):
        bf16.train().forward(batch)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        policy = XVLAPolicy(tiny_config(gradient_checkpointing=checkpointing)).train()
        policy.load_state_dict(randomize_(XVLAPolicy(tiny_config())).state_dict())
        torch.manual_seed(0)
        loss, _ = policy.forward(make_batch(policy.config))
        loss.backward()
        grads.append({n: p.grad for n, p in policy.named_parameters()})
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])
