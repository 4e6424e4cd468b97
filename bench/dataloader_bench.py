#!/usr/bin/env python
"""Data path throughput: plan + read + build 64k-token THD micro-batches.

The data path must be far faster than a training step. This measures, on preprocessed
synthetic data in the LongAlign mix (long samples up to about 64k tokens plus short
chats):
- planning one epoch (pool, shuffle, packing, global batches, rank balancing, loss weights);
- building micro-batches (read samples from the IndexedDataset, labels, loss weights,
  positions, cu_seqlens), with default positions and with SkipAlign.

    python bench/dataloader_bench.py
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from megatron_longalign.config.data import DataConfig, DatasetSource, SkipAlignConfig
from megatron_longalign.data.microbatch import MicroBatchBuilder
from megatron_longalign.data.mixture import DatasetMixture
from megatron_longalign.data.planner import GlobalBatchPlanner
from megatron_longalign.data.preprocess import EncodeSpec, PreprocessConfig, preprocess
from megatron_longalign.devdata.synthetic import (
    generate_long_samples,
    generate_short_chats,
    write_jsonl,
)

REPO = Path(__file__).resolve().parents[1]


def build_datasets(root: Path, num_long: int, num_short: int) -> list[DatasetSource]:
    tokenizer = str(REPO / "data/sample/tokenizer.model")
    sources = []
    for name, records in (
        ("long", generate_long_samples(num_long, 600, 14000, seed=1)),
        ("short", generate_short_chats(num_short, seed=2)),
    ):
        write_jsonl(records, root / f"{name}.jsonl")
        config = PreprocessConfig(
            inputs=(str(root / f"{name}.jsonl"),),
            output_prefix=str(root / name),
            spec=EncodeSpec(tokenizer, "llama3", max_length=65536, on_overlength="truncate-middle"),
            workers=2,
            progress=False,
        )
        preprocess(config)
        sources.append(DatasetSource(str(root / name)))
    return sources


def time_builds(planner, builder, limit: int) -> tuple[int, int, float]:
    built = tokens = 0
    start = time.perf_counter()
    for batch in planner.iterate(epochs=1):
        for rank in batch.micro_batches:
            for plan in rank:
                tokens += builder.build(plan, batch.epoch).num_tokens
                built += 1
                if built >= limit:
                    return built, tokens, time.perf_counter() - start
    return built, tokens, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-long", type=int, default=300)
    parser.add_argument("--num-short", type=int, default=700)
    parser.add_argument("--micro-batches", type=int, default=60)
    parser.add_argument("--dp", type=int, default=8)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        sources = build_datasets(Path(tmp), args.num_long, args.num_short)
        mixture = DatasetMixture(sources)
        config = DataConfig(
            sources=sources,
            seq_length=65536,
            global_batch_size=args.dp,
            micro_batch_size=1,
            pad_to_multiple_of=8,
        )
        start = time.perf_counter()
        planner = GlobalBatchPlanner(
            mixture.lengths,
            mixture.target_counts,
            mixture.sizes,
            mixture.weights,
            config,
            dp_size=args.dp,
        )
        steps = planner.num_steps(0)
        for step in range(steps):
            planner.global_batch(0, step)
        plan_seconds = time.perf_counter() - start

        rows = []
        for label, skipalign in (
            ("default positions", SkipAlignConfig()),
            (
                "SkipAlign positions (target 128k)",
                SkipAlignConfig(enabled=True, target_context_length=131072),
            ),
        ):
            builder = MicroBatchBuilder(
                mixture.__getitem__, pad_to_multiple_of=8, skipalign=skipalign
            )
            built, tokens, seconds = time_builds(planner, builder, args.micro_batches)
            rows.append((label, built, tokens, seconds))

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    print(
        f"data: {len(mixture):,} samples, {int(mixture.lengths.sum()):,} tokens "
        f"(longest {int(mixture.lengths.max()):,}); packed best_fit_decreasing to 65,536; DP {args.dp}"
    )
    print(f"planning one epoch ({steps} global batches of {args.dp} packs): {plan_seconds:.2f} s\n")
    print("| micro-batch build | micro-batches | mean tokens | micro-batches/s | tokens/s |")
    print("|---|---|---|---|---|")
    for label, built, tokens, seconds in rows:
        print(
            f"| {label} | {built} | {tokens / built:,.0f} | {built / seconds:,.1f} "
            f"| {tokens / seconds:,.0f} |"
        )
    rate = rows[0][1] / rows[0][3]
    # Lower bound on a training step's micro-batch: a 7B Llama on 65,536 tokens needs at
    # least 6 * 6.7e9 * 65536 FLOPs for its matmuls alone (per-document attention comes on
    # top); at 400 TFLOP/s (about 40% MFU on an H100) that is ~6.6 s.
    step_seconds = 6 * 6.7e9 * 65536 / 400e12
    print(
        f"\none 64k micro-batch of a 7B model takes at least ~{step_seconds:.1f} s at 400 TFLOP/s; "
        f"the data path builds one in {1000 / rate:.1f} ms ({step_seconds * rate:,.0f}x faster)"
    )


if __name__ == "__main__":
    main()
