#!/usr/bin/env python
"""Packing speed and efficiency: the three algorithms on 1M samples, and first-fit-decreasing
against a straightforward quadratic Python implementation, in one run.

- Lengths follow LongAlign's data: 70% short chats, log-uniform in [100, 8192] tokens, and
  30% long samples, log-uniform in [8192, 65536] (capped at the capacity). The processing
  order is a seeded shuffle.
- Each algorithm runs in its own child process with an empty numba cache, so its first
  call pays the full JIT compilation of every kernel it uses; the second call is warm
  (the median of 3 is reported).
- The baseline is a pure-Python first-fit-decreasing that scans all open packs for every
  sample: O(n * packs), quadratic. It runs only on the first `--baseline-samples` samples,
  next to our first_fit_decreasing on the same subset, and both must give identical packs.

Exits non-zero if a target is missed: a first call over 10 s, an efficiency under 0.99 for
a decreasing variant, or a baseline mismatch.

    python bench/packing_bench.py
    python bench/packing_bench.py --num-samples 200000 --capacity 131072
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

TIME_TARGET_S = 10.0
EFFICIENCY_TARGET = 0.99
DECREASING = ("first_fit_decreasing", "best_fit_decreasing")


def longalign_lengths(n: int, capacity: int, rng: np.random.Generator) -> np.ndarray:
    """70% short chats (log-uniform 100..8192 tokens), 30% long (log-uniform 8192..65536)."""
    short = rng.random(n) < 0.7
    low, high = np.where(short, 100, 8192), np.where(short, 8192, 65536)
    lengths = np.rint(np.exp(rng.uniform(np.log(low), np.log(high)))).astype(np.int64)
    return np.minimum(lengths, capacity)


def make_data(n: int, capacity: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = longalign_lengths(n, capacity, rng)
    return lengths, rng.permutation(n)


def quadratic_first_fit_decreasing(lengths: list[int], capacity: int, order: list[int]):
    """The obvious implementation: for each sample, scan every open pack from the left."""
    packs: list[list[int]] = []
    rooms: list[int] = []
    for i in sorted(order, key=lambda i: -lengths[i]):  # stable: ties keep `order`
        size = lengths[i]
        p = next((q for q, room in enumerate(rooms) if room >= size), None)
        if p is None:
            p = len(rooms)
            packs.append([])
            rooms.append(capacity)
        packs[p].append(i)
        rooms[p] -= size
    return packs


def run_child(algorithm: str, args: argparse.Namespace) -> dict:
    """Time one algorithm in this (fresh) process: first call, then warm calls."""
    from megatron_longalign.data.packing import pack_samples

    lengths, order = make_data(args.num_samples, args.capacity, args.seed)
    start = time.perf_counter()
    packs = pack_samples(lengths, args.capacity, algorithm, order)
    first = time.perf_counter() - start
    warm = []
    for _ in range(3):
        start = time.perf_counter()
        pack_samples(lengths, args.capacity, algorithm, order)
        warm.append(time.perf_counter() - start)
    return {
        "algorithm": algorithm,
        "first_s": first,
        "warm_s": statistics.median(warm),
        "packs": packs.num_packs,
        "efficiency": packs.efficiency(),
        "samples_per_pack": args.num_samples / max(packs.num_packs, 1),
    }


def spawn_child(algorithm: str, args: argparse.Namespace) -> dict:
    """A child process with an empty numba cache, so compilation is really paid."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        command = [sys.executable, __file__, "--child", algorithm]
        command += ["--num-samples", str(args.num_samples), "--capacity", str(args.capacity)]
        command += ["--seed", str(args.seed)]
        out = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_baseline(args: argparse.Namespace) -> dict:
    from megatron_longalign.data.packing import pack_samples

    lengths, order = make_data(args.num_samples, args.capacity, args.seed)
    m = min(args.baseline_samples, args.num_samples)
    lengths = lengths[:m]
    order = np.random.default_rng(args.seed + 1).permutation(m)
    pack_samples(lengths, args.capacity, "first_fit_decreasing", order)  # compile/load first
    ours = []
    for _ in range(5):
        start = time.perf_counter()
        packs = pack_samples(lengths, args.capacity, "first_fit_decreasing", order)
        ours.append(time.perf_counter() - start)
    py_lengths, py_order = lengths.tolist(), order.tolist()  # plain ints, outside the timing
    start = time.perf_counter()
    expected = quadratic_first_fit_decreasing(py_lengths, args.capacity, py_order)
    quadratic = time.perf_counter() - start
    got = [packs.pack(p).tolist() for p in range(packs.num_packs)]
    return {
        "samples": m,
        "packs": packs.num_packs,
        "quadratic_s": quadratic,
        "ours_s": statistics.median(ours),
        "identical": got == expected,
    }


def machine() -> str:
    import numba

    return (
        f"{platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, numpy {np.__version__}, numba {numba.__version__}"
    )


def report(args: argparse.Namespace, results: list[dict], baseline: dict) -> list[str]:
    """Print the markdown tables; return the targets missed."""
    missed = []
    print(f"Machine: {machine()}")
    print(
        f"Data: {args.num_samples:,} samples (LongAlign-like mix, seed {args.seed}), "
        f"capacity {args.capacity:,} tokens, shuffled order.\n"
    )
    print(
        "| algorithm | first call, incl. JIT (s) | warm call (s) | packs | efficiency "
        "| padding waste | samples/pack |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['algorithm']} | {r['first_s']:.2f} | {r['warm_s']:.3f} | {r['packs']:,} "
            f"| {100 * r['efficiency']:.4f}% | {100 * (1 - r['efficiency']):.4f}% "
            f"| {r['samples_per_pack']:.2f} |"
        )
        if r["first_s"] > TIME_TARGET_S:
            missed.append(f"{r['algorithm']}: first call {r['first_s']:.1f} s > {TIME_TARGET_S} s")
        if r["algorithm"] in DECREASING and r["efficiency"] < EFFICIENCY_TARGET:
            missed.append(
                f"{r['algorithm']}: efficiency {r['efficiency']:.4f} < {EFFICIENCY_TARGET}"
            )
    b = baseline
    print(
        f"\nBaseline: quadratic pure-Python first-fit-decreasing (scans every open pack per "
        f"sample, O(n x packs)), on the first {b['samples']:,} samples only ({b['packs']:,} "
        "packs), because it is quadratic:\n"
    )
    print("| first_fit_decreasing | time (s) | speed-up | identical packs |")
    print("|---|---|---|---|")
    print(f"| quadratic Python scan | {b['quadratic_s']:.2f} | 1x | |")
    print(
        f"| ours (numba segment tree, warm) | {b['ours_s']:.4f} "
        f"| {b['quadratic_s'] / b['ours_s']:,.0f}x | {'yes' if b['identical'] else 'NO'} |"
    )
    print("\nRatios are measured side by side in one run on the machine above.")
    if not b["identical"]:
        missed.append("first_fit_decreasing differs from the quadratic baseline")
    return missed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-samples", type=int, default=1_000_000)
    parser.add_argument("--capacity", type=int, default=65536)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--baseline-samples",
        type=int,
        default=20_000,
        help="samples for the quadratic baseline comparison (it is O(n x packs))",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: time one algorithm
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(args.child, args)))
        return

    from megatron_longalign.config.data import PACKING_ALGORITHMS

    results = [spawn_child(algorithm, args) for algorithm in PACKING_ALGORITHMS]
    missed = report(args, results, run_baseline(args))
    if missed:
        print("\nTARGETS MISSED:\n" + "\n".join(f"- {m}" for m in missed))
        sys.exit(1)
    print(
        f"\nAll targets met: first call <= {TIME_TARGET_S:.0f} s for every algorithm, "
        f"efficiency >= {EFFICIENCY_TARGET} for the decreasing variants, baseline identical."
    )


if __name__ == "__main__":
    main()
