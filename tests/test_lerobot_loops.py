"""LeRobot's own command-line loops with lerobot_xvla, offline on the CPU: lerobot-train (train, resume,
fine-tune) on a locally written dataset, and lerobot-eval in the pusht and aloha gym envs."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from lerobot.configs.types import FeatureType, PolicyFeature
from safetensors.torch import load_file

from lerobot_xvla import XVLAConfig, XVLAPolicy
from lerobot_xvla.demo import DEMO_CONFIG, lerobot_command, save_untrained_policy
from lerobot_xvla.demo_pusht import PUSHT_TASK, REACH_ENV, record_pusht_dataset
from lerobot_xvla.demo_report import ClosedLoop, loss_curve, mean_action_error, offline_action_error, plot_learning
from lerobot_xvla.offline import TINY_ARCHITECTURE
from lerobot_xvla.processor_xvla import make_xvla_pre_post_processors

from conftest import LEROBOT_ENV, lerobot

@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return record_pusht_dataset(tmp_path_factory.mktemp("data") / "pusht", seeds=[0, 1], frames=20, repo_id="local/xvla_demo_pusht").root


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dataset, tokenizer_dir) -> tuple[Path, str]:
    """A tiny X-VLA trained for 4 steps with the demo config, checkpoints every 2 steps (the plugin is
    also named with --policy.discover_packages_path, on top of LeRobot's automatic discovery)."""
    out = tmp_path_factory.mktemp("train") / "run"
    log = lerobot(
        "lerobot-train",
        f"--config_path={DEMO_CONFIG}",
        "--policy.discover_packages_path=lerobot_xvla",
        f"--dataset.root={dataset}",
        f"--policy.tokenizer_name={tokenizer_dir}",
        "--policy.log_loss_terms_every=2",
        "--steps=4",
        "--save_freq=2",
        "--log_freq=2",
        "--batch_size=4",
        "--num_workers=0",
        f"--output_dir={out}",
    )
    return out, log


def test_train_uses_the_plugin_logs_loss_terms_and_checkpoints(trained):
    out, log = trained
    assert "X-VLA implementation: lerobot_xvla" in log
    assert "X-VLA loss terms (mean of 2 steps): loss=" in log and "joints_loss=" in log
    assert (out / "checkpoints" / "000002").is_dir() and (out / "checkpoints" / "000004").is_dir()
    model = out / "checkpoints" / "000004" / "pretrained_model"
    config = json.loads((model / "config.json").read_text())
    assert config["type"] == "xvla" and config["action_mode"] == "auto"
    assert config["default_task"] == PUSHT_TASK  # the dataset's only task, for envs that send none
    steps = [s["registry_name"] for s in json.loads((model / "policy_postprocessor.json").read_text())["steps"]]
    assert steps[-1] == "xvla_action_guard"


def test_resume_continues_from_the_last_checkpoint(trained):
    out, _ = trained
    log = lerobot(
        "lerobot-train",
        f"--config_path={out / 'checkpoints' / 'last' / 'pretrained_model' / 'train_config.json'}",
        "--resume=true",
        "--steps=6",
    )
    assert "X-VLA implementation: lerobot_xvla" in log
    state = json.loads((out / "checkpoints" / "last" / "training_state" / "training_step.json").read_text())
    assert state["step"] == 6


def test_finetune_freeze_phase_moves_only_prompts_and_heads(trained, dataset, tmp_path):
    """Fine-tuning from --policy.path starts with the two-stage recipe's freeze phase: over real
    lerobot-train steps the VLM and the transformer core stay bit-identical, prompts and heads move."""
    out, _ = trained
    start = out / "checkpoints" / "000004" / "pretrained_model"
    log = lerobot(
        "lerobot-train",
        f"--policy.path={start}",
        "--policy.freeze_steps=100",
        "--policy.push_to_hub=false",
        "--dataset.repo_id=local/xvla_demo_pusht",
        f"--dataset.root={dataset}",
        "--steps=3",
        "--batch_size=4",
        "--num_workers=0",
        "--save_freq=3",
        "--wandb.enable=false",
        f"--output_dir={tmp_path / 'finetune'}",
    )
    assert "steps 0-99 train only the soft prompts and the action heads" in log
    before = load_file(str(start / "model.safetensors"))
    after = load_file(str(tmp_path / "finetune" / "checkpoints" / "000003" / "pretrained_model" / "model.safetensors"))
    assert before.keys() == after.keys()
    moved = {key for key in before if not torch.equal(before[key], after[key])}
    trainable = ("soft_prompt_hub", "action_encoder", "action_decoder")
    assert moved and all(any(part in key for part in trainable) for key in moved), sorted(moved)[:5]
    assert {part for part in trainable if any(part in key for key in moved)} == set(trainable)


def test_lora_adapter_trains_and_evaluates(trained, dataset, tmp_path):
    """lerobot-train --peft.method_type=LORA with the recipe's defaults, then lerobot-eval on the adapter."""
    out, _ = trained
    log = lerobot(
        "lerobot-train",
        f"--policy.path={out / 'checkpoints' / '000004' / 'pretrained_model'}",
        "--peft.method_type=LORA",
        "--policy.push_to_hub=false",
        "--dataset.repo_id=local/xvla_demo_pusht",
        f"--dataset.root={dataset}",
        "--steps=2",
        "--batch_size=4",
        "--num_workers=0",
        "--save_freq=2",
        "--wandb.enable=false",
        f"--output_dir={tmp_path / 'lora'}",
    )
    assert "LoRA rank 8 (X-VLA recipe)" in log
    adapter = tmp_path / "lora" / "checkpoints" / "000002" / "pretrained_model"
    settings = json.loads((adapter / "adapter_config.json").read_text())
    assert settings["r"] == 8  # "all-linear", resolved: the transformer, the BART encoder and DaViT
    assert {"qkv", "proj", "fc1", "fc2", "q_proj", "out_proj", "vlm_proj", "aux_visual_proj"} <= set(settings["target_modules"])
    assert set(settings["modules_to_save"]) == {"soft_prompt_hub", "action_encoder", "action_decoder"}
    lerobot(
        "lerobot-eval",
        f"--policy.path={adapter}",
        "--env.type=pusht",
        "--env.episode_length=10",
        "--eval.n_episodes=1",
        "--eval.batch_size=1",
        "--policy.device=cpu",
        f"--output_dir={tmp_path / 'eval'}",
    )
    assert json.loads((tmp_path / "eval" / "eval_info.json").read_text())["overall"]["n_episodes"] == 1


def test_ddp_with_two_cpu_processes(dataset, tokenizer_dir, tmp_path):
    """accelerate launch runs lerobot-train as two DDP processes (gloo on the CPU)."""
    result = subprocess.run(
        [
            lerobot_command("accelerate"), "launch", "--multi_gpu", "--num_processes=2", "--num_machines=1",
            "--mixed_precision=no", "--dynamo_backend=no", lerobot_command("lerobot-train"),
            f"--config_path={DEMO_CONFIG}", f"--dataset.root={dataset}", f"--policy.tokenizer_name={tokenizer_dir}",
            "--steps=2", "--save_freq=2", "--log_freq=1", "--batch_size=2", "--num_workers=0", f"--output_dir={tmp_path / 'ddp'}",
        ],
        capture_output=True, text=True, env=LEROBOT_ENV, timeout=900,
    )  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    assert "Effective batch size: 2 x 2 = 4" in log
    assert (tmp_path / "ddp" / "checkpoints" / "000002" / "pretrained_model" / "model.safetensors").exists()


def test_eval_pusht_writes_metrics_and_videos(trained, tmp_path):
    """PushT sends an empty instruction: the policy is given the one it was trained with, and says so. The env
    is the main job's reach variant, which lerobot-eval finds because the plugin registers it."""
    out, _ = trained
    log = lerobot(
        "lerobot-eval",
        f"--policy.path={out / 'checkpoints' / '000004' / 'pretrained_model'}",
        "--env.type=pusht",
        f"--env.task={REACH_ENV}",
        "--env.episode_length=20",
        "--eval.n_episodes=1",
        "--eval.batch_size=1",
        "--policy.device=cpu",
        f"--output_dir={tmp_path}",
    )
    metrics = json.loads((tmp_path / "eval_info.json").read_text())["overall"]
    assert metrics["n_episodes"] == 1 and "avg_sum_reward" in metrics
    episodes = ClosedLoop.from_eval_info(tmp_path / "eval_info.json")  # the main job's reading of this file
    assert len(episodes.success) == 1 and episodes.sum_reward[0] == pytest.approx(metrics["avg_sum_reward"])
    assert episodes.max_reward[0] == pytest.approx(metrics["avg_max_reward"])
    assert list(tmp_path.glob("videos/**/*.mp4"))
    assert f"using the instruction it was trained with, {PUSHT_TASK!r} (policy.default_task)" in log


def test_eval_aloha_with_14_joints(tmp_path, tokenizer_dir):
    """A freshly initialised checkpoint for ALOHA's features (one 480x640 camera, 14-D state and action)."""
    config = XVLAConfig(
        **copy.deepcopy(TINY_ARCHITECTURE),
        action_mode="auto",
        n_action_steps=5,
        tokenizer_name=tokenizer_dir,
        device="cpu",
        push_to_hub=False,
        input_features={
            "observation.images.top": PolicyFeature(FeatureType.VISUAL, (3, 480, 640)),
            "observation.state": PolicyFeature(FeatureType.STATE, (14,)),
        },
        output_features={"action": PolicyFeature(FeatureType.ACTION, (14,))},
    )
    stats = {key: {"mean": torch.zeros(14), "std": torch.ones(14), "min": -torch.ones(14), "max": torch.ones(14)} for key in ("observation.state", "action")}
    checkpoint = tmp_path / "aloha_checkpoint"
    XVLAPolicy(config).save_pretrained(checkpoint)
    for pipeline in make_xvla_pre_post_processors(config, dataset_stats=stats):
        pipeline.save_pretrained(checkpoint)
    lerobot(
        "lerobot-eval",
        f"--policy.path={checkpoint}",
        "--env.type=aloha",
        "--env.task=AlohaTransferCube-v0",
        "--env.episode_length=10",
        "--eval.n_episodes=1",
        "--eval.batch_size=1",
        "--policy.device=cpu",
        f"--output_dir={tmp_path / 'eval'}",
    )
    metrics = json.loads((tmp_path / "eval" / "eval_info.json").read_text())["overall"]
    assert metrics["n_episodes"] == 1
    assert list((tmp_path / "eval").glob("videos/**/*.mp4"))


@pytest.mark.slow
def test_full_size_default_architecture_trains(dataset, tokenizer_dir, tmp_path):
    """`--policy.type=xvla` with no checkpoint builds X-VLA-0.9B and takes two training steps (~15 GB RAM)."""
    log = lerobot(
        "lerobot-train",
        "--policy.type=xvla",
        "--policy.action_mode=auto",
        "--policy.device=cpu",
        "--policy.push_to_hub=false",
        f"--policy.tokenizer_name={tokenizer_dir}",
        "--policy.log_loss_terms_every=1",
        "--dataset.repo_id=local/xvla_demo_pusht",
        f"--dataset.root={dataset}",
        "--steps=2",
        "--batch_size=1",
        "--num_workers=0",
        "--save_checkpoint=false",
        "--log_freq=1",
        "--wandb.enable=false",
        f"--output_dir={tmp_path / 'full'}",
    )
    assert "X-VLA implementation: lerobot_xvla" in log
    assert "num_total_params=876336728" in log
    assert log.count("X-VLA loss terms (mean of 1 steps)") == 2


def test_main_job_measures_what_lerobot_train_wrote(trained, tmp_path):
    """The main job's learning curve, untrained twin and offline error, on a real lerobot-train run."""
    out, log = trained
    steps, losses = loss_curve(log, every=2)
    logged = [float(line.split("loss=")[1].split(",")[0]) for line in log.splitlines() if "X-VLA loss terms" in line]
    assert steps.tolist() == [2, 4] and losses.tolist() == logged

    checkpoint = out / "checkpoints" / "000004" / "pretrained_model"
    untrained = save_untrained_policy(checkpoint, tmp_path / "untrained", seed=7)
    trained_weights, fresh_weights = (load_file(str(path / "model.safetensors")) for path in (checkpoint, untrained))
    assert trained_weights.keys() == fresh_weights.keys()
    changed = [key for key in trained_weights if not torch.equal(trained_weights[key], fresh_weights[key])]
    assert len(changed) > len(trained_weights) // 2  # a fresh draw, not the trained weights (norms start equal)
    for name in ("policy_preprocessor.json", "policy_postprocessor.json", "config.json"):
        assert json.loads((untrained / name).read_text()) == json.loads((checkpoint / name).read_text())

    held_out = record_pusht_dataset(tmp_path / "heldout", seeds=[5, 6], frames=30, repo_id="local/heldout")
    frames = int(held_out.meta.episodes["dataset_to_index"][0])  # episode 0 ends when the expert touches the block
    assert 1 < frames < 30
    error = offline_action_error(checkpoint, held_out, horizon=8)  # on the dataset as the main job gets it
    assert error.per_episode.shape == (2,) and np.isfinite(error.per_episode).all()
    assert error.episode_prediction.shape == error.episode_recorded.shape == (frames, 2)
    assert np.array_equal(offline_action_error(checkpoint, held_out, horizon=8).per_episode, error.per_episode)
    swapped = offline_action_error(checkpoint, held_out, horizon=8, other_images=True)
    assert np.isfinite(swapped.per_episode).all() and not np.array_equal(swapped.per_episode, error.per_episode)
    assert np.array_equal(swapped.episode_recorded, error.episode_recorded)  # same frames, other images
    actions = np.stack([held_out[i]["action"].numpy() for i in range(frames)])  # episode 0
    assert np.array_equal(error.episode_recorded, actions)
    mean = actions.mean(0)
    expected = np.mean([np.abs(actions[i : i + 8] - mean).mean() for i in range(frames)])
    assert mean_action_error(held_out, mean, horizon=8)[0] == pytest.approx(expected)

    loop = ClosedLoop(np.array([0.1, 0.4]), np.array([1.0, 2.0]), np.array([False, True]))
    other = ClosedLoop(np.array([1.0, 0.0, 1.0]), np.array([1.0, 0.0, 1.0]), np.array([True, False, True]))
    assert ClosedLoop(np.zeros(3), np.zeros(3), np.array([False, True, True])).paired_with(other) == (
        "succeeded alone in 1, failed alone in 1, same outcome in 1"
    )
    figure = plot_learning(tmp_path / "eval" / "learning.png", (steps, losses), error, mean, loop, loop, np.array([0.5]))
    assert figure.read_bytes().startswith(b"\x89PNG") and figure.stat().st_size > 10_000
