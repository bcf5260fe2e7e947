"""Shared fixtures: tiny X-VLA configs, deterministic weights, batches and a local tokenizer (all offline)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*GenerationMixin.*")

import lerobot_xvla  # noqa: E402, F401  (owns `xvla` for every test)
from lerobot.configs.types import FeatureType, PolicyFeature  # noqa: E402
from lerobot_xvla import XVLAConfig  # noqa: E402
from lerobot_xvla.demo import lerobot_command  # noqa: E402
from lerobot_xvla.offline import TINY_ARCHITECTURE, build_word_tokenizer  # noqa: E402

LEROBOT_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}


def lerobot(name: str, *args: str) -> str:
    """Run a LeRobot console script (lerobot-train, lerobot-eval, ...) as a user would; returns its output."""
    result = subprocess.run([lerobot_command(name), *args], capture_output=True, text=True, env=LEROBOT_ENV, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    return output


def features(views: int = 2, state: int | None = 20, action: int = 20, size: tuple[int, int] = (64, 64)):
    """(input_features, output_features) of a robot with `views` cameras named observation.images.cam{i}."""
    inputs = {f"observation.images.cam{i}": PolicyFeature(FeatureType.VISUAL, (3, *size)) for i in range(views)}
    if state is not None:
        inputs["observation.state"] = PolicyFeature(FeatureType.STATE, (state,))
    return inputs, {"action": PolicyFeature(FeatureType.ACTION, (action,))}


def tiny_kwargs(views: int = 2, state: int | None = 20, action: int = 20, size=(64, 64), **overrides) -> dict:
    """Keyword arguments accepted by both XVLAConfig classes (ours and LeRobot's built-in)."""
    inputs, outputs = features(views, state, action, size)
    kwargs = {k: copy.deepcopy(v) for k, v in TINY_ARCHITECTURE.items() if k != "image_size"}
    kwargs.update(device="cpu", chunk_size=30, n_action_steps=30, max_state_dim=20, input_features=inputs, output_features=outputs, push_to_hub=False)
    kwargs.update(overrides)
    return kwargs


def tiny_config(views: int = 2, state: int | None = 20, action: int = 20, size=(64, 64), **overrides) -> XVLAConfig:
    overrides.setdefault("image_size", size)
    return XVLAConfig(**tiny_kwargs(views, state, action, size, **overrides))


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter a distinct deterministic value (biases and norms included), so a wrongly
    mapped weight cannot go unnoticed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.05
            is_norm_weight = name.endswith("weight") and param.ndim == 1
            param.copy_(1.0 + noise if is_norm_weight else noise)
    return module


def make_batch(config: XVLAConfig, batch_size: int = 2, seed: int = 0, image_size=None) -> dict:
    """A preprocessed batch (tokens, ImageNet-normalised images, state, targets) for `config`'s features."""
    generator = torch.Generator().manual_seed(seed)
    batch = {
        "observation.language.tokens": torch.randint(4, 1000, (batch_size, config.tokenizer_max_length), generator=generator)
    }
    for key, feature in config.image_features.items():
        if "empty_camera" in key:
            continue
        height, width = image_size or feature.shape[1:]
        batch[key] = torch.randn(batch_size, 3, height, width, generator=generator)
    if config.robot_state_feature is not None:
        batch["observation.state"] = torch.randn(batch_size, config.robot_state_feature.shape[0], generator=generator) * 0.1
    action_dim = config.action_feature.shape[0]
    actions = torch.randn(batch_size, config.chunk_size, action_dim, generator=generator) * 0.1
    if config.action_mode in ("ee6d", "joint"):  # binary grippers for the BCE terms
        grippers = {"ee6d": [9, 19], "joint": [6, 13]}[config.action_mode]
        grippers = [g for g in grippers if g < action_dim]
        actions[..., grippers] = (torch.rand(batch_size, config.chunk_size, len(grippers), generator=generator) > 0.5).float()
    batch["action"] = actions
    return batch


def train_losses(policy, batch: dict, steps: int = 30, lr: float = 1e-3) -> list[float]:
    """Losses of `steps` AdamW steps of `policy` on one fixed preprocessed batch."""
    policy.train()
    optimizer = torch.optim.AdamW(policy.get_optim_params(), lr=lr)
    losses = []
    for _ in range(steps):
        loss, _ = policy.forward(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> str:
    return str(build_word_tokenizer(tmp_path_factory.mktemp("tokenizer")))


@pytest.fixture(scope="session")
def three_view_checkpoint(tmp_path_factory, tokenizer_dir):
    """A pretrained-like X-VLA with three views and 20-D end-effector actions, as xvla-base."""
    from so101_deploy import save_three_view_checkpoint

    return save_three_view_checkpoint(tmp_path_factory.mktemp("pretrained") / "xvla_three_views", tokenizer_dir)


@pytest.fixture(scope="session")
def two_camera_checkpoint(tmp_path_factory, three_view_checkpoint):
    """The user's command (lerobot#4245): fine-tune the three-view checkpoint on a two-camera SO101 dataset."""
    from so101_deploy import RENAME_TO_THREE_VIEWS, write_two_camera_dataset

    root = tmp_path_factory.mktemp("so101_two_cameras")
    dataset = write_two_camera_dataset(root / "dataset")
    lerobot(
        "lerobot-train",
        f"--policy.path={three_view_checkpoint}",
        "--policy.action_mode=so101_bimanual",
        "--policy.empty_cameras=1",
        f"--rename_map={json.dumps(RENAME_TO_THREE_VIEWS)}",
        f"--dataset.repo_id={dataset.repo_id}",
        f"--dataset.root={dataset.root}",
        "--steps=2",
        "--batch_size=2",
        "--num_workers=0",
        "--save_freq=2",
        "--log_freq=1",
        f"--output_dir={root / 'train'}",
    )
    return root / "train" / "checkpoints" / "last" / "pretrained_model"


SO101_DOMAIN, PUSHT_DOMAIN = 6, 3  # the domains of `mixture_checkpoint`


@pytest.fixture(scope="session")
def mixture_checkpoint(tmp_path_factory, tokenizer_dir):
    """One X-VLA co-trained (`--policy.mixture`, 2 steps) on the two-arm SO101's dataset (domain 6: 12 joints, two
    cameras, 10 fps) and a PushT reach dataset (domain 3: a 2-D target, one camera renamed onto the SO101's first)."""
    from so101_deploy import ROBOT_CAMERAS, write_two_camera_dataset

    from lerobot_xvla.demo import DEMO_CONFIG
    from lerobot_xvla.demo_pusht import record_pusht_dataset

    root = tmp_path_factory.mktemp("so101_pusht_mixture")
    so101 = write_two_camera_dataset(root / "so101")
    pusht = record_pusht_dataset(root / "pusht", seeds=[0, 1], frames=8, repo_id="local/xvla_demo_pusht")
    mixture = [
        {"repo_id": so101.repo_id, "root": str(so101.root), "domain_id": SO101_DOMAIN},
        {"repo_id": pusht.repo_id, "root": str(pusht.root), "domain_id": PUSHT_DOMAIN,
         "rename_map": {"observation.image": ROBOT_CAMERAS[0]}},
    ]  # fmt: skip
    lerobot(
        "lerobot-train", f"--config_path={DEMO_CONFIG}", "--dataset.repo_id=mixture", f"--policy.mixture={json.dumps(mixture)}",
        f"--policy.tokenizer_name={tokenizer_dir}", "--steps=2", "--batch_size=2", "--num_workers=0", "--save_freq=2",
        "--log_freq=1", f"--output_dir={root / 'train'}",
    )  # fmt: skip
    return root / "train" / "checkpoints" / "last" / "pretrained_model"
