"""What the main job measures and draws: closed-loop scores, offline action error and the learning figure."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# The policy's own log line (modeling_xvla.XVLAPolicy.forward), printed by lerobot-train every
# `log_loss_terms_every` steps; the step is LeRobot's progress counter on the same line or before it.
LOSS_LINE = re.compile(r"X-VLA loss terms \(mean of (\d+) steps\): loss=([0-9.eE+-]+)")


def loss_curve(train_log: str, every: int) -> tuple[np.ndarray, np.ndarray]:
    """(steps, mean loss) from lerobot-train's output: one point per `every` training steps."""
    losses = [float(match.group(2)) for match in LOSS_LINE.finditer(train_log)]
    return every * np.arange(1, len(losses) + 1), np.asarray(losses)


@dataclass
class ClosedLoop:
    """Per-episode results of one lerobot-eval run (the same env seeds for every policy)."""

    max_reward: np.ndarray  # [episodes] best reward reached in the episode
    sum_reward: np.ndarray  # [episodes]
    success: np.ndarray  # [episodes] bool

    @classmethod
    def from_eval_info(cls, path: Path) -> ClosedLoop:
        """Read lerobot-eval's eval_info.json: LeRobot 0.4 lists `per_episode` records at the top, LeRobot 0.6
        lists per task `metrics` with one value per episode (in both, episode i ran with env seed --seed + i)."""
        info = json.loads(path.read_text())
        if "per_episode" in info:
            episodes = info["per_episode"]
            max_reward, sum_reward, success = ([e[key] for e in episodes] for key in ("max_reward", "sum_reward", "success"))
        else:
            metrics = [task["metrics"] for task in info["per_task"]]
            max_reward, sum_reward, success = ([v for m in metrics for v in m[key]] for key in ("max_rewards", "sum_rewards", "successes"))
        return cls(np.asarray(max_reward, dtype=float), np.asarray(sum_reward, dtype=float), np.asarray(success, dtype=bool))

    def describe(self) -> str:
        return (
            f"max reward {_spread(self.max_reward)}, sum reward {_spread(self.sum_reward, 2)}, "
            f"success {100 * self.success.mean():.0f}% of {len(self.success)}"
        )

    def paired_with(self, other: ClosedLoop) -> str:
        """Episode by episode (same env seed): how often this policy succeeded where `other` did not, and back."""
        only_self, only_other = (self.success & ~other.success).sum(), (other.success & ~self.success).sum()
        return f"succeeded alone in {only_self}, failed alone in {only_other}, same outcome in {len(self.success) - only_self - only_other}"


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a success rate (95% for z = 1.96); sound at 0 and at `trials` successes."""
    if trials <= 0:
        raise ValueError(f"wilson_interval needs trials > 0, got {trials}")
    rate = successes / trials
    centre = (rate + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * np.sqrt(rate * (1 - rate) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def _spread(values: np.ndarray, digits: int = 3) -> str:
    """mean ± std [min, max] of per-episode values."""
    return f"{values.mean():.{digits}f} ± {values.std():.{digits}f} [{values.min():.{digits}f}, {values.max():.{digits}f}]"


@dataclass
class OfflineError:
    """Action error on held-out episodes, in the action's units (pixels for PushT)."""

    per_episode: np.ndarray  # [episodes] mean |predicted - recorded| over frames, horizon and action dims
    episode_prediction: np.ndarray  # [frames, action_dim] first predicted action at every frame of episode 0
    episode_recorded: np.ndarray  # [frames, action_dim] recorded actions of episode 0

    def describe(self) -> str:
        return _spread(self.per_episode, 1)


def offline_action_error(checkpoint: Path, dataset, horizon: int, seed: int = 0, other_images: bool = False) -> OfflineError:
    """Mean absolute error of `checkpoint`'s first `horizon` actions against the recorded ones.

    Every frame of every episode of `dataset` (a LeRobotDataset) is one prediction from the observation of
    that frame; actions past the episode's end are not counted. With `other_images`, each frame's images are
    those of a random frame of another episode (its state and instruction stay): how much the policy's
    predictions rest on what it sees. The noise of the flow-matching sampler and that draw are seeded, so two
    calls give the same numbers.
    """
    import torch

    from .modeling_xvla import load_for_inference

    policy, preprocessor, postprocessor = load_for_inference(checkpoint, "cpu")
    torch.manual_seed(seed)
    episodes = _episode_frames(dataset)
    image_source = _frames_of_other_episodes(episodes, np.random.default_rng(seed)) if other_images else None
    errors, first_prediction, first_recorded = [], [], []
    for episode, frames in enumerate(episodes):
        items = [dataset[i] for i in frames]  # each frame decoded once
        actions = torch.stack([item["action"] for item in items])  # [frames, action_dim]
        episode_errors = []
        for position, item in enumerate(items):
            observation = {key: item[key] for key in policy.config.input_features}
            if image_source is not None:
                other = dataset[image_source[frames[position]]]
                observation |= {key: other[key] for key in policy.config.image_features}
            observation["task"] = item["task"]
            with torch.no_grad():
                chunk = postprocessor(policy.predict_action_chunk(preprocessor(observation)))[0]  # [T, action_dim]
            recorded = actions[position : position + horizon]
            episode_errors.append((chunk[: len(recorded)] - recorded).abs().mean().item())
            if episode == 0:
                first_prediction.append(chunk[0].numpy())
                first_recorded.append(recorded[0].numpy())
        errors.append(np.mean(episode_errors))
    return OfflineError(np.asarray(errors), np.asarray(first_prediction), np.asarray(first_recorded))


def mean_action_error(dataset, mean_action: np.ndarray, horizon: int) -> np.ndarray:
    """The same error for the baseline that always predicts the training data's mean action: [episodes]."""
    errors = []
    for frames in _episode_frames(dataset):
        actions = np.stack([dataset[i]["action"].numpy() for i in frames])
        windows = [np.abs(actions[i : i + horizon] - mean_action).mean() for i in range(len(frames))]
        errors.append(np.mean(windows))
    return np.asarray(errors)


def _frames_of_other_episodes(episodes: list[range], rng: np.random.Generator) -> dict[int, int]:
    """For each frame index, a random frame index of another episode (there must be two episodes or more)."""
    if len(episodes) < 2:
        raise ValueError("swapping images between episodes needs at least two episodes")
    everything = np.concatenate([np.asarray(frames) for frames in episodes])
    source = {}
    for frames in episodes:
        others = everything[(everything < frames.start) | (everything >= frames.stop)]
        source |= {frame: int(rng.choice(others)) for frame in frames}
    return source


def _episode_frames(dataset) -> list[range]:
    starts, ends = dataset.meta.episodes["dataset_from_index"], dataset.meta.episodes["dataset_to_index"]
    return [range(int(start), int(end)) for start, end in zip(starts, ends, strict=True)]


def plot_learning(
    path: Path,
    loss: tuple[np.ndarray, np.ndarray],
    offline: OfflineError,
    mean_action: np.ndarray,
    trained: ClosedLoop,
    untrained: ClosedLoop,
    expert: np.ndarray,
) -> Path:
    """Write the figure: the learning curve, a held-out episode's actions, and the closed-loop scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (curve, actions, scores) = plt.subplots(1, 3, figsize=(15, 4.2))
    steps, losses = loss
    curve.plot(steps, losses, marker="o", markersize=3)
    curve.set(title="training loss (lerobot-train)", xlabel="step", ylabel="flow-matching loss", yscale="log")

    frames = np.arange(len(offline.episode_recorded))
    for dim, (name, color) in enumerate(zip(("x", "y"), ("tab:blue", "tab:orange"), strict=False)):
        actions.plot(frames, offline.episode_recorded[:, dim], color=color, label=f"recorded {name}")
        actions.plot(frames, offline.episode_prediction[:, dim], color=color, linestyle="--", label=f"predicted {name}")
        actions.axhline(mean_action[dim], color=color, linestyle=":", linewidth=1, label=f"mean {name} (baseline)")
    actions.set(title="held-out episode 0: action (agent target)", xlabel="frame", ylabel="pixels")
    actions.legend(fontsize=7, ncol=3)

    groups = {"untrained": untrained.max_reward, "trained": trained.max_reward, "scripted expert": expert}
    for position, (name, values) in enumerate(groups.items()):
        jitter = np.random.default_rng(position).uniform(-0.12, 0.12, len(values))
        scores.scatter(position + jitter, values, s=14, alpha=0.7)
        scores.hlines(values.mean(), position - 0.3, position + 0.3, color="black")
    scores.set_xticks(range(len(groups)), list(groups))
    scores.set(title="closed loop (lerobot-eval), same env seeds", ylabel="max reward per episode (1: touched the block)", ylim=(-0.05, 1.05))

    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
