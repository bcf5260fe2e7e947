"""What the benchmark scripts share: the full-size X-VLA-0.9B setting, its inputs, and dataset frames."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch


def fresh_output_dir(path: Path) -> Path:
    """`path` resolved and created; a benchmark never writes over an earlier run's output."""
    out = path.resolve()
    if out.exists():
        sys.exit(f"refusing to overwrite {out}: pass another --output-dir or remove it")
    out.mkdir(parents=True)
    return out


def full_size_kwargs(device: str = "cpu", **overrides: Any) -> dict[str, Any]:
    """Config fields that LeRobot's built-in XVLAConfig and ours both take: X-VLA-0.9B with the pretrained
    defaults, 3 camera views at 224 x 224, a 20-D state and 20-D ee6d actions."""
    from lerobot.configs.types import FeatureType, PolicyFeature

    from lerobot_xvla.florence import FLORENCE2_LARGE

    features = {f"observation.images.cam{i}": PolicyFeature(FeatureType.VISUAL, (3, 224, 224)) for i in range(3)}
    features["observation.state"] = PolicyFeature(FeatureType.STATE, (20,))
    return dict(
        device=device, push_to_hub=False, chunk_size=30, n_action_steps=30, tokenizer_max_length=50, max_state_dim=20,
        input_features=features, output_features={"action": PolicyFeature(FeatureType.ACTION, (20,))},
        florence_config=FLORENCE2_LARGE, **overrides,
    )  # fmt: skip


def random_batch(batch_size: int, seed: int, device: str = "cpu", with_actions: bool = False) -> dict[str, torch.Tensor]:
    """A preprocessed batch for `full_size_kwargs` policies (ImageNet-normalised-like images, tokens, domain 0);
    with_actions adds ee6d target chunks [B, 30, 20] with 0/1 grippers."""
    generator = torch.Generator().manual_seed(seed)
    batch = {f"observation.images.cam{i}": torch.randn(batch_size, 3, 224, 224, generator=generator) for i in range(3)}
    batch["observation.state"] = torch.randn(batch_size, 20, generator=generator) * 0.1
    batch["observation.language.tokens"] = torch.randint(4, 50000, (batch_size, 50), generator=generator)
    if with_actions:
        batch["action"] = torch.randn(batch_size, 30, 20, generator=generator) * 0.1
        batch["action"][..., [9, 19]] = (batch["action"][..., [9, 19]] > 0).float()
    batch["domain_id"] = torch.zeros(batch_size, dtype=torch.long)
    return {k: v.to(device) for k, v in batch.items()}


def dataset_observation(item: dict[str, Any]) -> dict[str, Any]:
    """A LeRobotDataset frame as the observation a robot would give the preprocessor."""
    return {k: v for k, v in item.items() if k.startswith("observation.")} | {"task": item["task"]}


def plot_latencies(seconds: dict[str, float], path: str, title: str) -> None:
    """A horizontal bar chart of seconds per action chunk, built-in variants grey, ours blue."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 0.4 * len(seconds) + 1.2))
    axis.barh(list(seconds), list(seconds.values()), color=["tab:gray" if "builtin" in n else "tab:blue" for n in seconds])
    axis.set_xlabel("seconds per action chunk (lower is better)")
    axis.set_title(title)
    axis.invert_yaxis()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
