"""How far fewer denoising steps drift from the default 10, on a fixed checkpoint and real observations.

    python benchmarks/denoising_steps.py CHECKPOINT DATASET_ROOT [--frames 64]

For frames spread over the dataset, predicts the chunk with 1, 2, 5 and 10 steps from the same initial
noise and reports the mean and max absolute difference to the 10-step chunk, in dataset units and relative
to the standard deviation of the dataset's actions. Latency is linear in the steps (one transformer pass
per step after one encoding of the observation).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import dataset_observation

STEPS = (1, 2, 5, 10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("dataset_root", type=Path)
    parser.add_argument("--frames", type=int, default=64)
    args = parser.parse_args()

    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    from lerobot_xvla.modeling_xvla import load_for_inference

    policy, preprocessor, postprocessor = load_for_inference(args.checkpoint)
    config = policy.config
    dataset = LeRobotDataset("local/data", root=args.dataset_root)
    action_std = torch.as_tensor(dataset.meta.stats["action"]["std"]).float()
    indices = torch.linspace(0, len(dataset) - 1, args.frames).long().tolist()
    drifts = {steps: [] for steps in STEPS}
    for index in indices:
        item = dataset[index]
        batch = preprocessor(dataset_observation(item))
        noise = torch.randn(1, config.chunk_size, policy.model.dim_action, generator=torch.Generator().manual_seed(index))
        chunks = {s: postprocessor(policy.predict_action_chunk(batch, noise=noise, steps=s)[0]) for s in STEPS}
        for steps in STEPS:
            drifts[steps].append(chunks[steps] - chunks[10])
    print(f"checkpoint {args.checkpoint}, {len(indices)} frames, chunk {config.chunk_size}, action std {action_std.tolist()}\n")
    print("| denoising steps | mean abs drift from 10 steps | max abs drift | mean drift / action std |\n|---|---|---|---|")
    for steps in STEPS:
        drift = torch.stack(drifts[steps]).abs()
        print(f"| {steps} | {drift.mean():.4f} | {drift.max():.4f} | {(drift / action_std).mean():.3f} |")


if __name__ == "__main__":
    main()
