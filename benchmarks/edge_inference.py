"""Edge inference on a CPU: ONNX Runtime fp32 and int8 against LeRobot's built-in X-VLA, same weights and noise.

    python benchmarks/edge_inference.py [--repeats 3] [--threads 2] [--workdir /tmp/xvla_edge_bench]

The setting of `benchmarks/inference.py`: X-VLA-0.9B, 3 views at 224 x 224, 50 text tokens, 10 denoising
steps, batch 1, ee6d, the built-in's random weights (seed 0) in every variant and the same initial noise.
Variants: builtin fp32 / bf16 (dtype=bfloat16), ours fp32 / bf16 (weights_dtype=bfloat16), and ours on ONNX
Runtime with the fp32 and the int8 graphs that `lerobot-xvla export --int8` writes (`lerobot_xvla/edge.py`).

1. A fresh process exports the graphs into --workdir (kept: a second run reuses them).
2. Latency: every variant in this process, timed in interleaved rounds after a warm-up call (median); drift:
   max abs difference of the chunk from builtin fp32's, also in units of the std of builtin fp32's chunk.
3. Memory: for each variant a fresh process builds it, then runs one chunk; the resident memory once built
   and the peak during the chunk (VmRSS, and VmHWM reset after building).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from common import full_size_kwargs, random_batch
from inference import chunk, make_builtin, make_builtin_bf16, make_ours

TORCH_VARIANTS = ("builtin fp32", "builtin bf16", "ours fp32", "ours bf16")
ONNX_VARIANTS = {"ours ONNX Runtime fp32": "none", "ours ONNX Runtime int8": "int8"}


def export(workdir: Path) -> None:
    """Write the fp32 and int8 graphs of the benchmark's weights into `workdir`."""
    from lerobot_xvla.edge import export_graphs, quantize_graphs

    workdir.mkdir(parents=True, exist_ok=True)
    ours = make_ours(make_builtin("cpu"), "cpu")
    start = time.perf_counter()
    export_graphs(ours.model, workdir)
    exported = time.perf_counter()
    quantize_graphs(workdir)
    sizes = {p.name: round(p.stat().st_size / 2**30, 2) for p in sorted(workdir.iterdir())}
    print(json.dumps({"export_s": exported - start, "quantize_s": time.perf_counter() - exported, "sizes_gb": sizes}))


def onnx_policy(workdir: Path, quantization: str):
    from lerobot_xvla import XVLAConfig, XVLAPolicy

    config = XVLAConfig(**full_size_kwargs("cpu"), inference_backend="onnxruntime", quantization=quantization)
    policy = XVLAPolicy(config)
    policy.model.load_graphs(workdir)
    return policy.eval()


def build(name: str, workdir: Path, builtin=None):
    """Variant `name`; torch variants take `builtin`'s weights (built here when None)."""
    if name in ONNX_VARIANTS:
        return onnx_policy(workdir, ONNX_VARIANTS[name])
    builtin = make_builtin("cpu") if builtin is None else builtin
    if name == "builtin fp32":
        return builtin
    if name == "builtin bf16":
        return make_builtin_bf16(builtin, "cpu")
    return make_ours(builtin, "cpu", **({"weights_dtype": "bfloat16"} if name == "ours bf16" else {}))


def memory_gb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    raise KeyError(field)


def measure_memory(name: str, workdir: Path) -> None:
    """Resident memory of variant `name` once built, and the peak while it computes one chunk (GiB)."""
    policy = build(name, workdir)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # what building freed goes back to the system
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak resident set
    built = memory_gb("VmRSS")
    chunk(policy, random_batch(1, seed=1), "cpu")
    print(json.dumps({"built_gb": built, "peak_gb": memory_gb("VmHWM")}))


def run_stage(*args: str) -> dict:
    """This script in a fresh process; its last output line (JSON)."""
    result = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"{' '.join(args)} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up (default: 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime threads (default: 2)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/xvla_edge_bench"), help="where the graphs go (default: /tmp/xvla_edge_bench)")
    parser.add_argument("--stage", choices=["all", "export", "memory"], default="all", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)  # before any ONNX Runtime session: they take torch's thread count
    if args.stage == "export":
        return export(args.workdir)
    if args.stage == "memory":
        return measure_memory(args.variant, args.workdir)

    common = ["--threads", str(args.threads), "--workdir", str(args.workdir)]
    if not (args.workdir / "denoise_step.int8.onnx").exists():
        print("export:", json.dumps(run_stage("--stage", "export", *common)), flush=True)
    builtin = make_builtin("cpu")
    policies = {name: build(name, args.workdir, builtin) for name in (*TORCH_VARIANTS, *ONNX_VARIANTS)}
    batch = random_batch(1, seed=1)
    first_call, times, chunks = {}, {name: [] for name in policies}, {}
    for name, policy in policies.items():  # warm-up (session initialisation) outside the timed rounds
        chunks[name], first_call[name] = chunk(policy, batch, "cpu")
        print(f"warm-up {name}: {first_call[name]:.1f} s", flush=True)
    for _ in range(args.repeats):
        for name, policy in policies.items():
            times[name].append(chunk(policy, batch, "cpu")[1])
        print("round:", json.dumps({name: round(values[-1], 2) for name, values in times.items()}), flush=True)
    del policies, builtin
    gc.collect()

    reference = chunks["builtin fp32"]
    drift = {name: (actions - reference).abs().max().item() for name, actions in chunks.items()}
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"\ndevice: {platform.machine()} CPU, {args.threads} threads, torch {torch.__version__}, 3 views 224x224, 10 steps, batch 1")
    print("\n| variant | latency per chunk (s) | vs builtin bf16 | first call (s) | max abs drift vs builtin fp32 | drift / chunk std |")
    print("|---|---|---|---|---|---|")
    for name, median in medians.items():
        print(
            f"| {name} | {median:.2f} | {medians['builtin bf16'] / median:.2f}x | {first_call[name]:.1f} | {drift[name]:.1e} | "
            f"{drift[name] / reference.std().item():.1e} |",
            flush=True,
        )
    print("\n| variant | memory once built (GiB) | peak during a chunk (GiB) |")
    print("|---|---|---|")
    memory = {}
    for name in times:
        memory[name] = run_stage("--stage", "memory", "--variant", name, *common)
        print(f"| {name} | {memory[name]['built_gb']:.2f} | {memory[name]['peak_gb']:.2f} |", flush=True)
    print(json.dumps({"median_s": medians, "times_s": times, "drift": drift, "memory_gb": memory}))


if __name__ == "__main__":
    main()
