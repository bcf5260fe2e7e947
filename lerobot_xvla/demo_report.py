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

    def paired_counts(self, other: ClosedLoop) -> dict[str, int]:
        """Episode by episode (same env seed): where both, only this policy, only `other` or neither succeeded."""
        both, only_this = (self.success & other.success).sum(), (self.success & ~other.success).sum()
        only_other, neither = (other.success & ~self.success).sum(), (~self.success & ~other.success).sum()
        return {"both": int(both), "only_this": int(only_this), "only_other": int(only_other), "neither": int(neither)}

    def paired_with(self, other: ClosedLoop) -> str:
        return paired_text(self.paired_counts(other))

    def summary(self) -> dict:
        return {
            **success_summary(self.success),
            "max_reward": spread(self.max_reward),
            "sum_reward": spread(self.sum_reward),
            "success_per_episode": self.success.tolist(),
        }


def paired_text(counts: dict[str, int]) -> str:
    return (
        f"succeeded alone in {counts['only_this']}, failed alone in {counts['only_other']}, "
        f"same outcome in {counts['both'] + counts['neither']}"
    )


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a success rate (95% for z = 1.96); sound at 0 and at `trials` successes."""
    if trials <= 0:
        raise ValueError(f"wilson_interval needs trials > 0, got {trials}")
    rate = successes / trials
    centre = (rate + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * np.sqrt(rate * (1 - rate) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def spread(values: np.ndarray) -> dict:
    """Per-episode values as summary.json holds them: mean, std, min, max and the values."""
    values = np.asarray(values, dtype=float)
    stats = {"mean": values.mean(), "std": values.std(), "min": values.min(), "max": values.max()}
    return {**{name: float(value) for name, value in stats.items()}, "per_episode": values.tolist()}


def success_summary(success: np.ndarray) -> dict:
    """How many episodes succeeded, of how many, with the 95% Wilson interval of the rate."""
    successes, episodes = int(np.sum(success)), len(success)
    return {
        "episodes": episodes,
        "successes": successes,
        "success_rate": successes / episodes,
        "success_rate_95ci": list(wilson_interval(successes, episodes)),
    }


def _spread_text(values: dict, digits: int = 1) -> str:
    """mean ± std [min, max] of a `spread`."""
    mean, std, low, high = (f"{values[key]:.{digits}f}" for key in ("mean", "std", "min", "max"))
    return f"{mean} ± {std} [{low}, {high}]"


def _success_text(values: dict) -> str:
    low, high = values["success_rate_95ci"]
    return (
        f"{values['successes']} of {values['episodes']} ({100 * values['success_rate']:.0f}%, "
        f"95% Wilson interval {100 * low:.0f}-{100 * high:.0f}%)"
    )


@dataclass
class OfflineError:
    """Action error on held-out episodes, in the action's units (pixels for PushT)."""

    per_episode: np.ndarray  # [episodes] mean |predicted - recorded| over frames, horizon and action dims
    episode_prediction: np.ndarray  # [frames, action_dim] first predicted action at every frame of episode 0
    episode_recorded: np.ndarray  # [frames, action_dim] recorded actions of episode 0


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
    return _baseline_error(dataset, horizon, lambda state: mean_action)


def stay_put_error(dataset, horizon: int) -> np.ndarray:
    """The same error for the baseline that predicts the agent stays where it is: every action of the window is
    the frame's state (PushT's state and action are both the agent's position in pixels): [episodes]."""
    return _baseline_error(dataset, horizon, lambda state: state)


def _baseline_error(dataset, horizon: int, predict) -> np.ndarray:
    errors = []
    for frames in _episode_frames(dataset):
        items = [dataset[i] for i in frames]
        actions = np.stack([item["action"].numpy() for item in items])
        states = [item["observation.state"].numpy() for item in items]
        windows = [np.abs(actions[i : i + horizon] - predict(states[i])).mean() for i in range(len(frames))]
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


# Held-out measures of summary.json, in the order the figure draws them, with the figure's labels.
HELDOUT_LABELS = {
    "trained": "trained",
    "trained_given_other_episodes_images": "trained, each\nframe given another\nepisode's image",
    "untrained": "untrained",
    "mean_action": "baseline:\nmean action",
    "agent_stays_put": "baseline:\nagent stays put",
}
HELDOUT_COLORS = {
    "trained": "tab:green",
    "trained_given_other_episodes_images": "tab:orange",
    "untrained": "tab:gray",
    "mean_action": "tab:brown",
    "agent_stays_put": "tab:brown",
}


def summarise(
    loss: tuple[np.ndarray, np.ndarray],
    trained: ClosedLoop,
    untrained: ClosedLoop,
    expert: np.ndarray,
    heldout: dict[str, np.ndarray],
    horizon: int,
    eval_seed: int,
) -> dict:
    """Every figure the main job prints (`report_lines` reads them from here): summary.json.

    `heldout` holds the per-episode action errors named in HELDOUT_LABELS; `expert` the scripted expert's max
    reward per episode on the closed loop's seeds (1: it touched the block)."""
    steps, losses = loss
    paired = trained.paired_counts(untrained)
    return {
        "closed_loop": {
            "env_seeds": [eval_seed, eval_seed + len(trained.success) - 1],
            "trained": trained.summary(),
            "untrained": untrained.summary(),
            "scripted_expert": {**success_summary(expert >= 1.0), "max_reward": spread(expert)},
            "paired_by_env_seed": {
                "both_succeeded": paired["both"],
                "only_trained_succeeded": paired["only_this"],
                "only_untrained_succeeded": paired["only_other"],
                "neither_succeeded": paired["neither"],
            },
        },
        "heldout_action_error_px": {
            "episodes": len(heldout["trained"]),
            "first_actions": horizon,
            **{name: spread(heldout[name]) for name in HELDOUT_LABELS},
        },
        "loss_curve": {"step": np.asarray(steps).tolist(), "loss": np.asarray(losses).tolist()},
    }


def report_lines(summary: dict) -> list[str]:
    """The figures the main job prints at its end, all read from `summary`."""
    loop, heldout = summary["closed_loop"], summary["heldout_action_error_px"]
    paired = loop["paired_by_env_seed"]
    counts = {"both": paired["both_succeeded"], "only_this": paired["only_trained_succeeded"]}
    counts |= {"only_other": paired["only_untrained_succeeded"], "neither": paired["neither_succeeded"]}
    first_seed, last_seed = loop["env_seeds"]
    lines = [f"  closed loop, touched the block within the episode (env seeds {first_seed}-{last_seed}):"]
    for name in ("trained", "untrained"):
        policy = loop[name]
        lines.append(
            f"    {name + ':':10} {_success_text(policy)}; max reward {_spread_text(policy['max_reward'], 3)}, "
            f"sum reward {_spread_text(policy['sum_reward'], 2)}"
        )
    lines += [
        f"    {'expert:':10} {_success_text(loop['scripted_expert'])}",
        f"    paired by env seed, trained vs untrained: {paired_text(counts)} "
        f"(both succeeded in {counts['both']}, neither in {counts['neither']})",
        f"  held-out action error (pixels, mean ± std [min, max] over {heldout['episodes']} episodes, "
        f"first {heldout['first_actions']} actions of each chunk):",
    ]
    labels = {name: " ".join(label.split()) + ":" for name, label in HELDOUT_LABELS.items()}
    width = max(len(label) for label in labels.values())
    lines += [f"    {labels[name]:{width}} {_spread_text(heldout[name])}" for name in HELDOUT_LABELS]
    return lines


def plot_learning(
    path: Path,
    loss: tuple[np.ndarray, np.ndarray],
    offline: OfflineError,
    mean_action: np.ndarray,
    trained: ClosedLoop,
    untrained: ClosedLoop,
    expert: np.ndarray,
    heldout: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write `learning_figure` to `path` (PNG)."""
    figure = learning_figure(loss, offline, mean_action, trained, untrained, expert, heldout)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    _pyplot().close(figure)
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, also where a display exists
    import matplotlib.pyplot as plt

    return plt


def learning_figure(loss, offline, mean_action, trained, untrained, expert, heldout=None):
    """The figure of learning.png: the learning curve, a held-out episode's actions, the held-out action error per
    episode (`heldout`, named as in HELDOUT_LABELS; the panel stays empty without it) and the closed-loop
    success counts with their 95% Wilson intervals and the paired outcomes."""
    figure, ((curve, actions), (errors, scores)) = _pyplot().subplots(2, 2, figsize=(14, 9.5), layout="constrained")
    steps, losses = loss
    curve.plot(steps, losses, marker="o", markersize=3)
    curve.set(title="training loss (lerobot-train)", xlabel="step", ylabel="flow-matching loss", yscale="log")

    frames = np.arange(len(offline.episode_recorded))
    for dim, (name, color) in enumerate(zip(("x", "y"), ("tab:blue", "tab:orange"), strict=False)):
        actions.plot(frames, offline.episode_recorded[:, dim], color=color, label=f"recorded {name}")
        actions.plot(frames, offline.episode_prediction[:, dim], color=color, linestyle="--", label=f"predicted {name}")
        actions.axhline(mean_action[dim], color=color, linestyle=":", linewidth=1.5, label=f"baseline: mean {name}")
    actions.margins(y=0.1)
    actions.set(title="held-out episode 0: action (agent target)", xlabel="frame", ylabel="pixels")
    # Below the axes: inside, the legend hid the baselines
    actions.legend(fontsize=8, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.12))

    if heldout is None:
        errors.set_axis_off()
    else:
        _draw_heldout_errors(errors, heldout)
    _draw_closed_loop(scores, trained, untrained, expert)
    return figure


def _draw_heldout_errors(axes, heldout: dict[str, np.ndarray]) -> None:
    for position, name in enumerate(HELDOUT_LABELS):
        values = np.asarray(heldout[name])
        jitter = np.random.default_rng(position).uniform(-0.15, 0.15, len(values))
        axes.scatter(position + jitter, values, s=16, alpha=0.6, color=HELDOUT_COLORS[name])
        axes.errorbar(position + 0.3, values.mean(), yerr=values.std(), fmt="o", color="black", capsize=4)
        axes.annotate(
            f"{values.mean():.1f}", (position + 0.3, values.mean()), xytext=(6, 0), textcoords="offset points",
            va="center", fontsize=10, fontweight="bold",
        )
    axes.set_xticks(range(len(HELDOUT_LABELS)), list(HELDOUT_LABELS.values()), fontsize=8)
    axes.set_xlim(-0.5, len(HELDOUT_LABELS) - 0.2)
    axes.set_ylim(bottom=0)
    axes.set(
        title=f"held-out action error per episode ({len(heldout['trained'])} episodes; mean ± std in black)",
        ylabel="mean |predicted - recorded| action, pixels",
    )


def _draw_closed_loop(axes, trained: ClosedLoop, untrained: ClosedLoop, expert: np.ndarray) -> None:
    groups = {"untrained": untrained.success, "trained": trained.success, "scripted expert": expert >= 1.0}
    for position, (name, success) in enumerate(groups.items()):
        result = success_summary(success)
        rate, (low, high) = result["success_rate"], result["success_rate_95ci"]
        axes.bar(position, rate, width=0.6, color=("tab:gray", "tab:green", "tab:blue")[position], alpha=0.8)
        axes.errorbar(position, rate, yerr=[[rate - low], [high - rate]], color="black", capsize=6)
        axes.annotate(
            f"{result['successes']}/{result['episodes']}\n[{100 * low:.0f}-{100 * high:.0f}%]", (position, high),
            xytext=(0, 4), textcoords="offset points", ha="center", va="bottom", fontsize=10, fontweight="bold",
        )
    paired = trained.paired_counts(untrained)
    axes.text(
        0.02, 0.98,
        f"paired by env seed ({len(trained.success)} episodes):\nonly trained succeeded {paired['only_this']}, "
        f"only untrained {paired['only_other']}\nboth {paired['both']}, neither {paired['neither']}",
        transform=axes.transAxes, va="top", fontsize=9, bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.9},
    )
    axes.set_xticks(range(len(groups)), list(groups))
    axes.set_ylim(0, 1.45)
    axes.set_yticks(np.linspace(0, 1, 6))
    axes.set(
        title="closed loop (lerobot-eval), same env seeds: touched the block",
        ylabel="success rate, 95% Wilson interval",
    )
