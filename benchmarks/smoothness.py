"""Action continuity at chunk boundaries, on a recorded episode, for each way of executing chunks.

    python benchmarks/smoothness.py CHECKPOINT DATASET_ROOT [--episode 0] [--plot benchmarks/smoothness.png]

Replays the episode's observations through `select_action` (open loop: frame t of the dataset is the
observation at control step t) with plain chunking, cross-fading (`chunk_blend_steps`) and RTC guidance
(`rtc_guidance`), all with the same noise. A jump is |a_t - a_{t-1}| in dataset units (mean over the action
values); the table compares the jumps at chunk boundaries with the jumps inside chunks.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import dataset_observation

MODES = {
    "plain chunks": {},
    "cross-fade (chunk_blend_steps=4)": {"chunk_blend_steps": 4},
    "RTC guidance (rtc_guidance=true)": {"rtc_guidance": True},
}


def rollout(checkpoint: Path, frames: list[dict], overrides: dict, n_action_steps: int) -> torch.Tensor:
    from lerobot_xvla.modeling_xvla import load_for_inference

    policy, preprocessor, postprocessor = load_for_inference(checkpoint, n_action_steps=n_action_steps, **overrides)
    policy.reset()
    torch.manual_seed(0)
    actions = [postprocessor(policy.select_action(preprocessor(frame))) for frame in frames]
    return torch.cat(actions)  # [T, D]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("dataset_root", type=Path)
    parser.add_argument("--episode", type=int, default=0)
    parser.add_argument("--n-action-steps", type=int, default=8)
    parser.add_argument("--plot")
    args = parser.parse_args()

    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    import lerobot_xvla  # noqa: F401

    dataset = LeRobotDataset("local/data", root=args.dataset_root, episodes=[args.episode])
    frames = [dataset_observation(dataset[index]) for index in range(len(dataset))]
    boundaries = torch.arange(args.n_action_steps, len(frames), args.n_action_steps)
    print(f"episode {args.episode}: {len(frames)} steps, a new chunk every {args.n_action_steps} steps\n")
    print("| execution | mean jump at chunk boundaries | mean jump inside chunks | ratio |\n|---|---|---|---|")
    trajectories = {}
    for name, overrides in MODES.items():
        actions = rollout(args.checkpoint, frames, overrides, args.n_action_steps)
        trajectories[name] = actions
        jumps = (actions[1:] - actions[:-1]).abs().mean(dim=-1)  # jump into step t+1
        at_boundary = torch.zeros_like(jumps, dtype=torch.bool)
        at_boundary[boundaries - 1] = True
        boundary, inside = jumps[at_boundary].mean().item(), jumps[~at_boundary].mean().item()
        print(f"| {name} | {boundary:.3f} | {inside:.3f} | {boundary / inside:.2f} |")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(8, 3.5))
        for name, actions in trajectories.items():
            axis.plot(actions[:, 0].numpy(), label=name)
        for boundary in boundaries.tolist():
            axis.axvline(boundary - 0.5, color="lightgray", linewidth=0.8)
        axis.set_xlabel("control step (gray: chunk boundaries)")
        axis.set_ylabel("action[0]")
        axis.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
