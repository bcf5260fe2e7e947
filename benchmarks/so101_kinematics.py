"""Cost of the SO101 end-effector path (action_mode=so101_ee6d) per control tick and per chunk, next to the
model's own chunk.

    python benchmarks/so101_kinematics.py [--repeats 20] [--skip-model]

Forward kinematics runs in the preprocessor (the state at every tick; state and 30 action targets of every
sample when training); inverse kinematics in the postprocessor (one pose per tick under lerobot-rollout's sync
engine and lerobot-record, a whole chunk under RTC). Times are medians over --repeats calls; the model's chunk
is X-VLA-0.9B (3 views, 10 denoising steps, batch 1, fp32), timed once after a warm-up call.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from lerobot.processor import TransitionKey

from lerobot_xvla.robots.so101_steps import EndEffectorToJointsStep, JointsToEndEffectorStep


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up (placo's first solve, caches)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def joints(arms: int, *shape: int) -> torch.Tensor:
    values = (torch.rand(*shape, 6 * arms) - 0.5) * 60
    values[..., 5::6] = 50
    return values


def kinematics_rows(repeats: int) -> list[tuple[str, float]]:
    rows = []
    for arms in (1, 2):
        forward = JointsToEndEffectorStep(arms=arms)
        inverse = EndEffectorToJointsStep(arms=arms)
        inverse.joints_source = forward
        state = joints(arms, 1)
        tick = {TransitionKey.OBSERVATION: {"observation.state": state}}
        batch = {TransitionKey.OBSERVATION: {"observation.state": joints(arms, 8)}, TransitionKey.ACTION: joints(arms, 8, 30)}
        name = "one arm" if arms == 1 else "two arms (bi_so_follower)"
        rows.append((f"FK, one tick ({name}): state [1, {6 * arms}]", median_ms(lambda: forward(tick), repeats)))
        rows.append((f"FK, training batch ({name}): state [8, {6 * arms}] + actions [8, 30, {6 * arms}]", median_ms(lambda: forward(batch), repeats)))
        forward(tick)
        # poses the arm can reach near the measured joints: the FK of a small sweep from them
        sweep = state[:, None] + torch.linspace(0, 1, 30)[None, :, None] * 10
        poses = forward({TransitionKey.ACTION: sweep})[TransitionKey.ACTION]
        forward(tick)
        rows.append((f"IK, one tick ({name}): pose [1, 20]", median_ms(lambda: inverse({TransitionKey.ACTION: poses[:, 0]}), repeats)))
        rows.append((f"IK, one chunk ({name}): poses [1, 30, 20]", median_ms(lambda: inverse({TransitionKey.ACTION: poses}), max(3, repeats // 4))))
    return rows


def model_chunk_ms() -> float:
    from common import full_size_kwargs, random_batch
    from lerobot_xvla import XVLAConfig, XVLAPolicy

    policy = XVLAPolicy(XVLAConfig(**full_size_kwargs())).eval()
    batch = random_batch(1, seed=0)
    with torch.no_grad():
        policy.predict_action_chunk(batch)
        start = time.perf_counter()
        policy.predict_action_chunk(batch)
    return 1e3 * (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--skip-model", action="store_true", help="leave out the X-VLA-0.9B chunk (about a minute, 4 GiB)")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = kinematics_rows(args.repeats)
    if not args.skip_model:
        rows.append(("X-VLA-0.9B chunk (3 views, 10 steps, fp32), for scale", model_chunk_ms()))
    print(f"| step (torch threads: {torch.get_num_threads()}) | median ms |\n|---|---|")
    for name, ms in rows:
        print(f"| {name} | {ms:.3f} |")


if __name__ == "__main__":
    main()
