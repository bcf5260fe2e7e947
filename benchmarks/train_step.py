"""One full-size X-VLA training step: lerobot_xvla against LeRobot's built-in X-VLA, in the same run.

    python benchmarks/train_step.py [--steps 3] [--batch-size 2] [--variants ours_fp32,builtin_fp32,...]
                                    [--jemalloc /usr/lib/x86_64-linux-gnu/libjemalloc.so.2]

X-VLA-0.9B (Florence-2-large + 24 x 1024 transformer), ee6d actions, 3 camera views at 224 x 224,
50 text tokens, chunk 30, AdamW from each implementation's own training preset, gradient clipping as
configured. Every variant runs in a fresh process, so its peak resident memory (construction included) is
its own. Reports the median step time (forward, backward, clip, optimizer step) after one warm-up step.

--jemalloc runs every variant with jemalloc preloaded (MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1:
freed memory is reused, never returned), instead of glibc's malloc, whose fragmentation adds 1.5-2 GB to
a full fine-tuning step here (Debian: `apt-get install libjemalloc2`).

Variants:
    builtin_fp32        LeRobot built-in, dtype=float32
    builtin_bf16        LeRobot built-in, dtype=bfloat16 (bf16 weights and optimizer state)
    ours_fp32           lerobot_xvla, fp32
    ours_bf16           lerobot_xvla, dtype=bfloat16: bf16 autocast over fp32 master weights and optimizer state
    ours_bf16_gc        ours_bf16 with gradient_checkpointing=true
    ours_lora_bf16_gc   LoRA with the recipe's defaults (r=8), bf16 autocast, gradient checkpointing
    <variant>_mixture   any of ours_* trained as a two-robot mixture (`--policy.mixture`): half the batch a 20-D
                        ee6d robot with 3 cameras, half a one-arm (10-D) robot with 2, so each domain's loss, input
                        masking and view mask run per sample; what the mixture adds to a step is the difference
                        to <variant> (e.g. ours_lora_bf16_gc,ours_lora_bf16_gc_mixture)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings

from common import full_size_kwargs, random_batch

VARIANTS = ("builtin_fp32", "builtin_bf16", "ours_fp32", "ours_bf16", "ours_bf16_gc", "ours_lora_bf16_gc")
MIXTURE = "_mixture"


def two_robot_mixture() -> list:
    """The mixture of the *_mixture variants: domains 0 (two arms, 3 cameras) and 1 (one arm, 2 cameras)."""
    from lerobot_xvla.mixture.sources import MixtureSource

    cameras = [f"observation.images.cam{i}" for i in range(3)]
    return [
        MixtureSource(repo_id="bench/two_arms", domain_id=0, action_dim=20, state_dim=20, cameras=cameras),
        MixtureSource(repo_id="bench/one_arm", domain_id=1, action_dim=10, state_dim=20, cameras=cameras[:2]),
    ]


def build(variant: str):
    """(policy, optimizer, grad_clip_norm) for one variant, X-VLA-0.9B with the pretrained defaults."""
    import lerobot_xvla

    mixture = two_robot_mixture() if variant.endswith(MIXTURE) else []
    variant = variant.removesuffix(MIXTURE)

    common = full_size_kwargs(dtype="bfloat16" if "bf16" in variant or "lora" in variant else "float32")
    if variant.startswith("builtin"):
        from lerobot.policies.xvla.configuration_xvla import XVLAConfig
        from lerobot.policies.xvla.modeling_xvla import XVLAPolicy

        with lerobot_xvla.builtin_xvla():
            config = XVLAConfig(**common)
            policy = XVLAPolicy(config)
        params = policy.get_optim_params()
    else:
        from lerobot.configs.default import PeftConfig

        from lerobot_xvla import XVLAConfig, XVLAPolicy

        config = XVLAConfig(
            **common,
            freeze_steps=0,  # every group trains: a full fine-tuning step
            gradient_checkpointing=variant.endswith("_gc"),
            # LeRobot's wrap_with_peft refuses LoRA without a pretrained path; the weights do not matter here.
            pretrained_path="benchmark" if "lora" in variant else None,
            mixture=mixture,
        )
        policy = XVLAPolicy(config)
        if "lora" in variant:
            policy = policy.wrap_with_peft(peft_cli_overrides=dataclasses.asdict(PeftConfig()))
        params = policy.get_optim_params()
    preset = config.get_optimizer_preset()
    return policy, preset.build(params), preset.grad_clip_norm


def run_variant(variant: str, steps: int, batch_size: int) -> dict:
    import torch

    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    policy, optimizer, clip = build(variant)
    build_s = time.perf_counter() - start
    policy.train()
    data = random_batch(batch_size, seed=0, with_actions=True)
    if variant.endswith(MIXTURE):
        from lerobot_xvla.mixture.sources import MIXTURE_DOMAIN_KEY

        data[MIXTURE_DOMAIN_KEY] = torch.arange(batch_size) % 2  # alternate robots; the one-arm samples' padding is 0
        data["action"][1::2, :, 10:] = 0
    trainable = [p for p in policy.parameters() if p.requires_grad]
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        loss, _ = policy.forward(data)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, clip)
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    return {
        "variant": variant,
        "step_s": statistics.median(times[1:]),
        "peak_gb": peak_gb,
        "build_s": build_s,
        "trainable_m": sum(p.numel() for p in trainable) / 1e6,
        "loss": float(loss),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--jemalloc", help="path of libjemalloc.so.2 to preload in every variant's process")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_variant(args.child, args.steps, args.batch_size)))
        return

    import torch

    allocator = "glibc malloc"
    env = dict(os.environ)
    if args.jemalloc:
        env.update(LD_PRELOAD=args.jemalloc, MALLOC_CONF="dirty_decay_ms:-1,muzzy_decay_ms:-1")
        allocator = "jemalloc (no decay)"
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, {allocator}")
    results = {}
    for variant in args.variants.split(","):
        command = [sys.executable, __file__, f"--child={variant}", f"--steps={args.steps}", f"--batch-size={args.batch_size}"]
        output = subprocess.run(command, capture_output=True, text=True, env=env)
        if output.returncode != 0:
            print(f"{variant}: failed\n{output.stderr[-3000:]}")
            continue
        results[variant] = json.loads(output.stdout.strip().splitlines()[-1])
        print(json.dumps(results[variant]), flush=True)

    reference = results.get("builtin_fp32")
    print("\n| variant | step (s) | vs built-in fp32 | peak memory (GB) | trainable (M) |\n|---|---|---|---|---|")
    for variant, r in results.items():
        ratio = f"{reference['step_s'] / r['step_s']:.2f}x faster" if reference else "-"
        print(f"| {variant} | {r['step_s']:.1f} | {ratio} | {r['peak_gb']:.1f} | {r['trainable_m']:.1f} |")


if __name__ == "__main__":
    main()
