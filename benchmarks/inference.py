"""Latency of one action chunk: lerobot_xvla against LeRobot's built-in X-VLA, same weights, same run.

    python benchmarks/inference.py [--repeats 3] [--device cpu] [--compile] [--plot benchmarks/inference_cpu.png]
                                   [--variants "builtin bf16,ours bf16"]

X-VLA-0.9B, 3 camera views at 224 x 224, 50 text tokens, 10 denoising steps, batch 1, ee6d. Both
implementations get the same random weights (ours loads the built-in's state dict through the checkpoint
converter) and the same initial noise. Variants are timed in interleaved rounds, so a slow phase of the
machine hits every variant alike; the table has the median latency, the ratio to the built-in at the same
precision, and the max abs difference of the actions from the built-in fp32 chunk.

Variants: builtin fp32 / bf16 (LeRobot's dtype=bfloat16 casts every weight to bf16), ours fp32, ours bf16
(weights_dtype=bfloat16: matmul/conv weights bf16, norms and residual stream fp32 under autocast), and with
--compile ours compiled (torch.compile of the observation encoding and of one denoising step; on a GPU also
"reduce-overhead", i.e. CUDA graphs).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings

import torch
from common import full_size_kwargs, plot_latencies, random_batch


def make_builtin(device: str, **overrides):
    """LeRobot's built-in X-VLA-0.9B with the benchmark's random weights (seed 0), fp32."""
    from lerobot.policies.xvla.configuration_xvla import XVLAConfig as BuiltinConfig
    from lerobot.policies.xvla.modeling_xvla import XVLAPolicy as BuiltinPolicy

    import lerobot_xvla

    with lerobot_xvla.builtin_xvla():
        builtin = BuiltinPolicy(BuiltinConfig(**full_size_kwargs(device), **overrides))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the built-in leaves its image projection uninitialised (NaN): fill everything
        for name, param in builtin.named_parameters():
            norm = name.endswith("weight") and param.ndim == 1
            param.copy_((1.0 if norm else 0.0) + torch.randn(param.shape, generator=generator) * 0.02)
    return builtin.to(device).eval()


def make_ours(builtin, device: str, **overrides):
    """Our X-VLA-0.9B with the built-in's weights (through the checkpoint converter)."""
    from lerobot_xvla import XVLAConfig, XVLAPolicy
    from lerobot_xvla.checkpoints import load_state_dict_strict

    ours = XVLAPolicy(XVLAConfig(**full_size_kwargs(device), **overrides))
    load_state_dict_strict(ours, builtin.state_dict())
    ours._apply_weights_dtype()
    return ours.to(device).eval()


def make_builtin_bf16(builtin, device: str):
    """The built-in with dtype=bfloat16 (every weight cast to bf16) and `builtin`'s weights."""
    from lerobot.policies.xvla.configuration_xvla import XVLAConfig as BuiltinConfig
    from lerobot.policies.xvla.modeling_xvla import XVLAPolicy as BuiltinPolicy

    import lerobot_xvla

    with lerobot_xvla.builtin_xvla():
        builtin_bf16 = BuiltinPolicy(BuiltinConfig(**full_size_kwargs(device), dtype="bfloat16"))
    builtin_bf16.load_state_dict(builtin.state_dict())
    builtin_bf16.model.to(torch.bfloat16)
    return builtin_bf16.to(device).eval()


def make_policies(device: str, compile_modes: list[str]):
    builtin = make_builtin(device)
    policies = {"builtin fp32": builtin}
    variants = {"ours fp32": {}, "ours bf16": {"weights_dtype": "bfloat16"}}
    for mode in compile_modes:
        variants[f"ours bf16 compiled ({mode})"] = {"weights_dtype": "bfloat16", "compile_model": True, "compile_mode": mode}
    for name, overrides in variants.items():
        policies[name] = make_ours(builtin, device, **overrides)
    policies["builtin bf16"] = make_builtin_bf16(builtin, device)
    return policies


def chunk(policy, batch: dict, device: str) -> tuple[torch.Tensor, float]:
    torch.manual_seed(0)  # the same initial noise for every variant
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    actions = policy.predict_action_chunk(batch)
    if device == "cuda":
        torch.cuda.synchronize()
    return actions.float().cpu(), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true", help="also time ours compiled")
    parser.add_argument("--plot", help="write a bar chart of the latencies to this PNG")
    parser.add_argument("--variants", help="comma-separated variants to time (default: all); builtin fp32 always gives the reference chunk")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    modes = ["default"] + (["reduce-overhead"] if args.device == "cuda" else []) if args.compile else []
    policies = make_policies(args.device, modes)
    batch = random_batch(1, seed=1, device=args.device)

    reference = None
    first_call, times, diffs = {}, {name: [] for name in policies}, {}
    for name, policy in policies.items():  # warm-up (and compilation) outside the timed rounds
        actions, seconds = chunk(policy, batch, args.device)
        first_call[name] = seconds
        reference = actions if reference is None else reference
        diffs[name] = (actions - reference).abs().max().item()
    if args.variants:
        timed = [name.strip() for name in args.variants.split(",")]
        unknown = sorted(set(timed) - set(policies))
        if unknown:
            parser.error(f"--variants: unknown {unknown}; choose from {list(policies)}")
        times = {name: times[name] for name in timed}
    for _ in range(args.repeats):
        for name in times:
            times[name].append(chunk(policies[name], batch, args.device)[1])

    device = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"device: {device}, torch {torch.__version__}, 3 views 224x224, 10 steps, batch 1")
    print("\n| variant | latency per chunk (s), median (min) | vs built-in at the same precision | first call (s) | max abs diff vs built-in fp32 |")
    print("|---|---|---|---|---|")
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, median in medians.items():
        baseline = medians.get("builtin bf16" if "bf16" in name else "builtin fp32")
        ratio = f"{baseline / median:.2f}x" if baseline else "-"
        print(f"| {name} | {median:.3f} (min {min(times[name]):.3f}) | {ratio} | {first_call[name]:.1f} | {diffs[name]:.1e} |")
    print(json.dumps({"device": device, "median_s": medians, "max_abs_diff": diffs}))
    if args.plot:
        plot_latencies(medians, args.plot, f"X-VLA-0.9B, 10 steps, 3 views ({device})")


if __name__ == "__main__":
    main()
