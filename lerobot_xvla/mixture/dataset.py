"""The mixture as one map-style dataset that `lerobot-train` samples like any LeRobotDataset.

Weights are realised over the index space: source i with N_i frames and weight w_i owns a block of M_i indices,
M_i proportional to w_i, with the total chosen so that every source's block covers its frames at least once
(sources of larger weight repeat frames evenly). LeRobot's own sampler then draws indices uniformly (a seeded
permutation per epoch on 0.6, which also makes `--resume` sample-exact), so sources come at the frequencies
of their weights, and accelerate shards the index space across processes as for one dataset.

Every item has the same keys and shapes, whatever its source, so batches mix robots: each policy camera
(the sources' cameras after their `rename_map`), zeros where the source has no such camera (the policy masks
those views per sample by the domain id); `observation.state` and `action` zero-padded to the widest source;
`action_is_pad` (also over the frames a source with a shorter time-anchor horizon lacks); `task`; and the source's
domain id under `MIXTURE_DOMAIN_KEY`. Images are resized to the network's image size here, because samples of
different sources must stack. Nothing is normalised here: the
preprocessor does it per domain, with each domain's own statistics (`mixture.normalize`).
"""

from __future__ import annotations

import bisect
import inspect
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from lerobot.datasets.compute_stats import aggregate_stats
from lerobot.datasets.lerobot_dataset import LeRobotDataset, LeRobotDatasetMetadata
from lerobot.utils.constants import ACTION, OBS_STATE
from torch.nn import functional as F

from ..action_modes import build_action_mode
from ..configuration_xvla import MAX_ANCHOR_FRAMES, action_frames
from .sources import MIXTURE_DOMAIN_KEY, MixtureError, MixtureSource, check_sources
from .stats import MixtureStats

logger = logging.getLogger(__name__)

ACTION_IS_PAD = f"{ACTION}_is_pad"
# `--dataset.repo_id` of a mixture run: LeRobot requires the field, the sources name the data.
MIXTURE_REPO_ID = "mixture"


@dataclass
class MixtureMetadata:
    """What lerobot-train reads of `dataset.meta`, for the mixture as a whole."""

    features: dict[str, dict]
    camera_keys: list[str]
    stats: MixtureStats
    tasks: pd.DataFrame
    episodes: dict[str, list[int]]  # one "episode" per source block of the index space
    repo_id: str
    robot_type: str | None = None
    fps: float | None = None  # the sources' rates differ; each source's chunks are read at its own
    has_language_columns: bool = False
    depth_keys: list[str] = field(default_factory=list)

    @property
    def total_frames(self) -> int:
        return self.episodes["dataset_to_index"][-1]

    @property
    def total_episodes(self) -> int:
        return len(self.episodes["dataset_to_index"])


def block_sizes(frames: list[int], weights: list[float]) -> list[int]:
    """Indices each source owns: proportional to its weight, and at least its frame count (each frame seen once an
    epoch by the source whose frames-per-weight is largest, more often by the others)."""
    total_weight = sum(weights)
    shares = [w / total_weight for w in weights]
    total = max(math.ceil(n / p) for n, p in zip(frames, shares, strict=True))
    return [max(n, round(total * p)) for n, p in zip(frames, shares, strict=True)]


class MixtureDataset(torch.utils.data.Dataset):
    """Several LeRobotDatasets behind one index space (module docstring); `sources` are filled in."""

    def __init__(self, sources: list[MixtureSource], datasets: list[LeRobotDataset], image_size: tuple[int, int]) -> None:
        self.sources, self.datasets, self.image_size = sources, datasets, tuple(image_size)
        self.frames = [len(d) for d in datasets]
        if min(self.frames) == 0:
            empty = self.frames.index(0)
            raise MixtureError(f"{sources[empty].label(empty)} has no frames (check its episodes)")
        self.sizes = block_sizes(self.frames, [s.weight for s in sources])
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).tolist()
        self.camera_keys = list(dict.fromkeys(key for s in sources for key in s.cameras))
        self.state_dim = max((s.state_dim or 0) for s in sources)
        self.action_dim = max(s.action_dim for s in sources)
        # Frames of actions per sample: chunk_size each, or with time anchors each source's horizon at its fps.
        self.action_steps = max(len(d.delta_timestamps[ACTION]) for d in datasets)
        self.meta = self._metadata()

    # What lerobot-train reads of a dataset besides `meta`.
    episodes = None
    absolute_to_relative_idx = None

    @property
    def num_frames(self) -> int:
        return self.offsets[-1]

    @property
    def num_episodes(self) -> int:
        return sum(d.num_episodes for d in self.datasets)

    def __len__(self) -> int:
        return self.offsets[-1]

    def locate(self, index: int) -> tuple[int, int]:
        """(source, frame of its dataset) of a mixture index."""
        if not 0 <= index < len(self):
            raise IndexError(f"mixture index {index} out of range [0, {len(self)})")
        source = bisect.bisect_right(self.offsets, index) - 1
        return source, (index - self.offsets[source]) * self.frames[source] // self.sizes[source]

    def __getitem__(self, index: int) -> dict[str, Any]:
        source_index, frame = self.locate(int(index))
        source, item = self.sources[source_index], self.datasets[source_index][frame]
        renamed = {source.rename_map.get(k, k): v for k, v in item.items()}
        out: dict[str, Any] = {key: self._view(renamed.get(key)) for key in self.camera_keys}
        if self.state_dim:
            out[OBS_STATE] = _pad_last(renamed[OBS_STATE].float(), self.state_dim)
        actions = _pad_last(renamed[ACTION].float(), self.action_dim)  # [T, action_dim]
        steps = self.action_steps - actions.shape[0]  # a shorter horizon than another source's: padded frames
        out[ACTION] = F.pad(actions, (0, 0, 0, steps))
        is_pad = renamed.get(ACTION_IS_PAD, torch.zeros(actions.shape[0], dtype=torch.bool))
        out[ACTION_IS_PAD] = F.pad(is_pad, (0, steps), value=True)
        out["task"] = renamed.get("task", "")
        out[MIXTURE_DOMAIN_KEY] = torch.tensor(source.domain_id)
        return out

    def _view(self, image: torch.Tensor | None) -> torch.Tensor:
        """[3, H, W] float in [0, 1] at the network's image size; zeros for a camera the source lacks."""
        height, width = self.image_size
        if image is None:
            return torch.zeros(3, height, width)
        if image.dtype == torch.uint8:
            image = image.float() / 255
        if image.ndim == 4:  # [T, 3, h, w] with observation delta indices: the policy uses the last frame
            image = image[-1]
        if tuple(image.shape[-2:]) != (height, width):
            image = F.interpolate(image[None], size=(height, width), mode="bilinear", antialias=True, align_corners=False)[0]
            image = image.clamp(0, 1)
        return image

    def _metadata(self) -> MixtureMetadata:
        height, width = self.image_size
        features: dict[str, dict] = {
            key: {"dtype": "video", "shape": (height, width, 3), "names": ["height", "width", "channels"]} for key in self.camera_keys
        }
        if self.state_dim:
            features[OBS_STATE] = {"dtype": "float32", "shape": (self.state_dim,), "names": None}
        features[ACTION] = {"dtype": "float32", "shape": (self.action_dim,), "names": None}
        by_domain: dict[int, list[dict]] = {}
        for source, dataset in zip(self.sources, self.datasets, strict=True):
            kept = {k: dataset.meta.stats[k] for k in (OBS_STATE, ACTION) if k in dataset.meta.stats}
            by_domain.setdefault(source.domain_id, []).append(kept)
        stats = MixtureStats({d: s[0] if len(s) == 1 else aggregate_stats(s) for d, s in by_domain.items()})
        tasks = list(dict.fromkeys(task for d in self.datasets for task in d.meta.tasks.index))
        return MixtureMetadata(
            features=features,
            camera_keys=list(self.camera_keys),
            stats=stats,
            tasks=pd.DataFrame({"task_index": range(len(tasks))}, index=pd.Index(tasks, name="task")),
            episodes={"dataset_from_index": self.offsets[:-1], "dataset_to_index": self.offsets[1:]},
            repo_id="mixture(" + ", ".join(s.repo_id for s in self.sources) + ")",
        )


def policy_input_features(meta: MixtureMetadata) -> dict:
    """The policy's input features of a mixture: every camera and the padded state."""
    from lerobot.configs.types import FeatureType

    from ..compat import dataset_to_policy_features

    return {k: f for k, f in dataset_to_policy_features(meta.features).items() if f.type is not FeatureType.ACTION}


def _pad_last(tensor: torch.Tensor, width: int) -> torch.Tensor:
    return F.pad(tensor, (0, width - tensor.shape[-1]))


def describe_sources(source: MixtureSource, index: int, meta: LeRobotDatasetMetadata, max_action_dim: int, default_mode: str) -> None:
    """Fill the fields the dataset decides (widths, cameras, fps), checking what the user gave against them."""
    name = source.label(index)
    features = meta.features
    unknown = sorted(set(source.rename_map) - set(features))
    if unknown:
        raise MixtureError(f"{name}: rename_map names {unknown}, which the dataset does not have (its features: {sorted(features)})")
    if ACTION not in features:
        raise MixtureError(f"{name}: the dataset has no '{ACTION}' feature")
    width = int(features[ACTION]["shape"][-1])
    if source.action_dim is not None and source.action_dim != width:
        raise MixtureError(f"{name}: action_dim={source.action_dim} but the dataset's actions have {width} values")
    mode = source.action_mode or default_mode
    try:
        build_action_mode(mode, width, max_action_dim)
    except ValueError as error:
        raise MixtureError(f"{name}: {error}") from None
    source.action_dim = width
    source.state_dim = int(features[OBS_STATE]["shape"][-1]) if OBS_STATE in features else None
    cameras = [source.rename_map.get(k, k) for k in meta.camera_keys]
    doubled = sorted({c for c in cameras if cameras.count(c) > 1})
    if doubled:
        raise MixtureError(f"{name}: rename_map maps several cameras onto {doubled}")
    source.cameras = cameras
    source.fps = float(meta.fps)
    tasks = list(meta.tasks.index)
    source.task = tasks[0] if len(tasks) == 1 else None


def _dataset_kwargs(cfg: Any) -> dict[str, Any]:
    """Keyword arguments of LeRobotDataset that lerobot-train passes, as far as the installed LeRobot takes them."""
    from .. import compat

    dataset_cfg = cfg.dataset
    transforms = compat.ImageTransforms(dataset_cfg.image_transforms) if dataset_cfg.image_transforms.enable else None
    wanted = {"image_transforms": transforms, "video_backend": dataset_cfg.video_backend, "tolerance_s": cfg.tolerance_s,
              "return_uint8": True}  # fmt: skip
    accepted = inspect.signature(LeRobotDataset.__init__).parameters
    return {k: v for k, v in wanted.items() if k in accepted}


def split_episodes(episodes: list[int], fraction: float) -> tuple[list[int], list[int]]:
    """The last ceil(n * fraction) episodes are held out (lerobot-train's `--dataset.eval_split` rule, per source)."""
    held_out = math.ceil(len(episodes) * fraction) if fraction > 0 else 0
    return episodes[: len(episodes) - held_out], episodes[len(episodes) - held_out :]


def make_mixture_datasets(cfg: Any) -> tuple[MixtureDataset, MixtureDataset | None]:
    """The training mixture of `cfg.policy.mixture` (and, with `--dataset.eval_split`, the held-out one)."""
    policy, dataset_cfg = cfg.policy, cfg.dataset
    if dataset_cfg.repo_id != MIXTURE_REPO_ID:
        raise MixtureError(
            f"--policy.mixture trains on its sources: pass --dataset.repo_id={MIXTURE_REPO_ID} (LeRobot requires the field), "
            f"or --policy.mixture='[]' to train on {dataset_cfg.repo_id} alone"
        )
    for name in ("root", "episodes", "revision"):
        if getattr(dataset_cfg, name, None) is not None:
            raise MixtureError(f"--dataset.{name} is per source with --policy.mixture: set it in the mixture entries")
    if getattr(dataset_cfg, "streaming", False):
        raise MixtureError("--dataset.streaming is not supported with --policy.mixture (map-style datasets only)")
    sources = policy.mixture
    metas = [LeRobotDatasetMetadata(s.repo_id, root=s.root, revision=s.revision) for s in sources]
    for index, (source, meta) in enumerate(zip(sources, metas, strict=True)):
        describe_sources(source, index, meta, policy.max_action_dim, policy.action_mode)
    check_sources(sources, policy.num_domains, policy.action_mode)  # again, now with the widths
    dims = {build_action_mode(s.action_mode or policy.action_mode, s.action_dim, policy.max_action_dim).dim_action for s in sources}
    if len(dims) > 1:
        raise MixtureError(f"the sources' action modes denoise vectors of different widths {sorted(dims)}; one network needs one width")
    fraction = getattr(dataset_cfg, "eval_split", 0.0) or 0.0
    kwargs = _dataset_kwargs(cfg)
    train, held_out = [], []
    for index, (source, meta) in enumerate(zip(sources, metas, strict=True)):
        horizon = None if source.anchor_horizon_s is None else source.anchor_horizon_s * meta.fps
        if horizon is not None and horizon > MAX_ANCHOR_FRAMES:
            raise MixtureError(
                f"{source.label(index)}: anchor_horizon_s={source.anchor_horizon_s:g} at its {meta.fps:g} fps spans {horizon:g} "
                f"frames, more than {MAX_ANCHOR_FRAMES} (a sample loads every frame of the horizon)"
            )
        if horizon is not None and round(horizon) < policy.n_action_steps:
            raise MixtureError(
                f"{source.label(index)}: anchor_horizon_s={source.anchor_horizon_s:g} at its {meta.fps:g} fps gives {round(horizon)} "
                f"control steps per chunk, fewer than n_action_steps={policy.n_action_steps}"
            )
        delta = {ACTION: [i / meta.fps for i in action_frames(policy.chunk_size, horizon)]}
        episodes = source.episodes if source.episodes is not None else list(range(meta.total_episodes))
        train_episodes, eval_episodes = split_episodes(list(episodes), fraction)
        if not train_episodes:
            raise MixtureError(f"eval_split={fraction} leaves {source.repo_id} no training episode")
        common = {"root": source.root, "revision": source.revision, "delta_timestamps": delta}
        train.append(LeRobotDataset(source.repo_id, episodes=train_episodes, **common, **kwargs))
        if eval_episodes:
            held_out.append(LeRobotDataset(source.repo_id, episodes=eval_episodes, **common, **{**kwargs, "image_transforms": None}))
    mixture = MixtureDataset(sources, train, policy.model_image_size)
    primary = policy.primary_camera or mixture.camera_keys[0]
    for index, source in enumerate(sources):
        if primary not in source.cameras:
            raise MixtureError(
                f"{source.label(index)} has no image for the primary camera '{primary}' (the view read with the "
                f"instruction); its cameras are {source.cameras}: map one onto it with rename_map"
            )
    for source, size, frames in zip(sources, mixture.sizes, mixture.frames, strict=True):
        logger.info("X-VLA mixture: %s -> domain %d, %d frames, %.1f%% of samples (weight %g)", source.repo_id,
                    source.domain_id, frames, 100 * size / len(mixture), source.weight)
    # eval_split > 0 holds out at least one episode of every source, so the held-out mixture has them all.
    return mixture, MixtureDataset(sources, held_out, policy.model_image_size) if held_out else None
