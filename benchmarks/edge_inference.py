"""Edge inference on a CPU: ONNX Runtime fp32 and int8 against LeRobot's built-in X-VLA, same weights and noise.

    python benchmarks/edge_inference.py [--repeats 3] [--threads 2] [--workdir /tmp/xvla_edge_bench]
        [--variants NAME,...] [--demo-dir outputs/demo] [--plot benchmarks/edge_inference_cpu.png]

The setting of `benchmarks/inference.py`: X-VLA-0.9B, 3 views at 224 x 224, 50 text tokens, 10 denoising
steps, batch 1, ee6d, the built-in's random weights (seed 0) in every variant and the same initial noise.
Variants: builtin fp32 / bf16 (dtype=bfloat16), ours fp32 / bf16 (weights_dtype=bfloat16), and ours on ONNX
Runtime with the fp32 and the int8 graphs that `lerobot-xvla export --int8` writes (`lerobot_xvla/edge.py`).

1. A fresh process exports the graphs into --workdir (kept: a second run reuses them).
2. Latency: every variant in this process, timed in interleaved rounds after a warm-up call (median); drift:
   max abs difference of the chunk from builtin fp32's, also in units of the std of builtin fp32's chunk.
3. Memory: for each variant a fresh process builds it, then runs one chunk; the resident memory once built
   and the peak during the chunk (VmRSS, and VmHWM reset after building).
4. With --demo-dir (the main job's output): the trained demo checkpoint is exported with `lerobot-xvla export
   --int8`, and the drift of ONNX Runtime fp32 / int8 from torch fp32 is measured on its held-out frames, in
   units of each action dimension's std in the checkpoint's dataset statistics.

The bf16 variants are left out on a CPU without native bf16 matmuls (no avx512_bf16 or AMX): there torch
emulates them hundreds of times slower than fp32 (measured at start and printed), so a bf16 chunk would take
hours. `--variants` selects variants by name either way.
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
from common import full_size_kwargs, plot_latencies, random_batch
from inference import chunk, make_builtin, make_builtin_bf16, make_ours

TORCH_VARIANTS = ("builtin fp32", "builtin bf16", "ours fp32", "ours bf16")
ONNX_VARIANTS = {"ours ONNX Runtime fp32": "none", "ours ONNX Runtime int8": "int8"}
VARIANTS = (*TORCH_VARIANTS, *ONNX_VARIANTS)


def matmul_rate(dtype: torch.dtype, size: tuple[int, int, int] = (300, 1024, 1024)) -> float:
    """GFLOP/s of one [M, K] x [K, N] torch matmul in `dtype` on this CPU (X-VLA's typical shapes)."""
    m, k, n = size
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    a @ b
    start = time.perf_counter()
    a @ b
    return 2 * m * k * n / (time.perf_counter() - start) / 1e9


def default_variants() -> list[str]:
    """Every variant, less the bf16 ones where this CPU has no native bf16 matmul (see the module docstring)."""
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return list(VARIANTS)
    fp32, bf16 = matmul_rate(torch.float32), matmul_rate(torch.bfloat16)
    print(f"no native bf16 on this CPU: a bf16 matmul runs at {bf16:.1f} GFLOP/s against {fp32:.0f} in fp32; bf16 variants left out")
    return [name for name in VARIANTS if "bf16" not in name]


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


def demo_checkpoint(demo_dir: Path) -> Path:
    """The trained checkpoint in a main-job output directory (`python -m lerobot_xvla.demo --output-dir`)."""
    return demo_dir / "train" / "checkpoints" / "last" / "pretrained_model"


def demo_drift(demo_dir: Path, workdir: Path, frames: int = 40) -> dict[str, dict[str, float]]:
    """Drift of the demo checkpoint's ONNX Runtime fp32 / int8 chunks from its torch fp32 chunks on held-out
    frames (same noise), in units of each action dimension's dataset std: the max and the mean over
    frames, chunk steps and dimensions."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    from lerobot_xvla.cli import export as export_checkpoint
    from lerobot_xvla.modeling_xvla import load_for_inference

    checkpoint = demo_checkpoint(demo_dir)
    exported = workdir / "demo_export"
    export_checkpoint(str(checkpoint), exported, int8=True, overwrite=True)
    heldout = LeRobotDataset("local/xvla_demo_pusht_heldout", root=demo_dir / "heldout")
    std = torch.as_tensor(heldout.meta.stats["action"]["std"]).float()
    items = [heldout[i] for i in torch.linspace(0, len(heldout) - 1, frames).long().tolist()]
    loaded = {
        "torch fp32": load_for_inference(checkpoint),
        "ONNX Runtime fp32": load_for_inference(exported, quantization="none"),
        "ONNX Runtime int8": load_for_inference(exported, quantization="int8"),
    }
    chunks = {}
    for name, (policy, preprocessor, postprocessor) in loaded.items():
        outputs = []
        for item in items:
            observation = {key: item[key] for key in policy.config.input_features} | {"task": item["task"]}
            outputs.append(chunk(policy, preprocessor(observation), "cpu")[0])  # loaded in eval mode
        chunks[name] = postprocessor(torch.cat(outputs))  # [frames, T, action_dim], dataset units
    drift = {name: ((actions - chunks["torch fp32"]) / std).abs() for name, actions in chunks.items() if name != "torch fp32"}
    return {name: {"max_std": values.max().item(), "mean_std": values.mean().item()} for name, values in drift.items()}


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
    parser.add_argument("--variants", help=f"comma-separated, from {', '.join(VARIANTS)} (default: all, less bf16 on a CPU without native bf16)")
    parser.add_argument("--demo-dir", type=Path, help="the main job's output directory: also measure drift on its checkpoint")
    parser.add_argument("--plot", help="write a bar chart of the latencies to this PNG")
    parser.add_argument("--stage", choices=["all", "export", "memory"], default="all", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)  # before any ONNX Runtime session: they take torch's thread count
    if args.stage == "export":
        return export(args.workdir)
    if args.stage == "memory":
        return measure_memory(args.variant, args.workdir)

    names = args.variants.split(",") if args.variants else default_variants()
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    if "builtin fp32" not in names:
        parser.error("--variants must include 'builtin fp32': drift is measured against it")
    if args.demo_dir and not (demo_checkpoint(args.demo_dir) / "config.json").exists():
        parser.error(f"--demo-dir: no main-job checkpoint at {demo_checkpoint(args.demo_dir)}; run `bash scripts/demo.sh` first")
    common = ["--threads", str(args.threads), "--workdir", str(args.workdir)]
    if not (args.workdir / "denoise_step.int8.onnx").exists():
        print("export:", json.dumps(run_stage("--stage", "export", *common)), flush=True)
    builtin = make_builtin("cpu")
    policies = {name: build(name, args.workdir, builtin) for name in names}
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
    fastest_builtin = min(median for name, median in medians.items() if name.startswith("builtin"))
    device = f"{platform.machine()} CPU, {args.threads} threads, torch {torch.__version__}"
    print(f"\ndevice: {device}, 3 views 224x224, 10 steps, batch 1")
    print("\n| variant | latency per chunk (s) | vs the fastest built-in | first call (s) | max abs drift vs builtin fp32 | drift / chunk std |")
    print("|---|---|---|---|---|---|")
    for name, median in medians.items():
        print(
            f"| {name} | {median:.2f} | {fastest_builtin / median:.2f}x | {first_call[name]:.1f} | {drift[name]:.1e} | "
            f"{drift[name] / reference.std().item():.1e} |",
            flush=True,
        )
    if args.plot:
        plot_latencies(medians, args.plot, f"X-VLA-0.9B on a CPU ({args.threads} threads), 10 steps, 3 views")
    print("\n| variant | memory once built (GiB) | peak during a chunk (GiB) |")
    print("|---|---|---|")
    memory = {}
    for name in times:
        memory[name] = run_stage("--stage", "memory", "--variant", name, *common)
        print(f"| {name} | {memory[name]['built_gb']:.2f} | {memory[name]['peak_gb']:.2f} |", flush=True)
    demo = demo_drift(args.demo_dir, args.workdir) if args.demo_dir else None
    if demo:
        print(f"\n| demo checkpoint ({args.demo_dir}), held-out frames | max drift / action std | mean drift / action std |")
        print("|---|---|---|")
        for name, values in demo.items():
            print(f"| {name} vs torch fp32 | {values['max_std']:.1e} | {values['mean_std']:.1e} |")
    print(json.dumps({"median_s": medians, "times_s": times, "drift": drift, "memory_gb": memory, "demo_drift": demo}))


if __name__ == "__main__":
    main()
