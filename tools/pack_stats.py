#!/usr/bin/env python
"""Compare naive / sorted / packed batching on preprocessed data, for one epoch.

    python tools/pack_stats.py --prefix data/long data/short_chat:0.5 --seq-length 65536 \
        --global-batch-size 64 --micro-batch-size 1 --dp 8

A prefix may carry a mixture weight as PREFIX:WEIGHT (default 1.0).
"""

from __future__ import annotations

import argparse
import sys

from megatron_longalign.config.data import (
    PACKING_ALGORITHMS,
    DataConfig,
    DatasetSource,
    PackingConfig,
)
from megatron_longalign.config.errors import raise_if_problems
from megatron_longalign.data.mixture import DatasetMixture
from megatron_longalign.data.pack_stats import compare_batching, format_table
from megatron_longalign.data.planner import data_problems


def parse_source(text: str) -> DatasetSource:
    prefix, _, weight = text.rpartition(":") if ":" in text else (text, "", "")
    try:
        return DatasetSource(prefix, float(weight)) if weight else DatasetSource(text)
    except ValueError:
        return DatasetSource(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefix", nargs="+", required=True, help="PREFIX[:WEIGHT] ...")
    parser.add_argument("--seq-length", type=int, default=65536)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--global-batch-size", type=int, default=8)
    parser.add_argument("--dp", type=int, default=1, help="data-parallel size")
    parser.add_argument("--algorithm", choices=PACKING_ALGORITHMS, default="best_fit_decreasing")
    parser.add_argument("--attention-equiv-length", type=int, default=50000)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)

    sources = [parse_source(p) for p in args.prefix]
    config = DataConfig(
        sources=sources,
        seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size,
        global_batch_size=args.global_batch_size,
        packing=PackingConfig(args.algorithm),
        attention_equiv_length=args.attention_equiv_length,
        on_overlength="drop",
        seed=args.seed,
    )
    try:
        raise_if_problems(data_problems(config, args.dp))
        mixture = DatasetMixture(sources)
        results = compare_batching(
            mixture.lengths, mixture.target_counts, mixture.sizes, mixture.weights, config, args.dp
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(
        f"{len(mixture):,} samples, {int(mixture.lengths.sum()):,} tokens; seq_length "
        f"{args.seq_length}, micro-batch {args.micro_batch_size}, global batch "
        f"{args.global_batch_size}, DP {args.dp}"
    )
    for source, dataset in zip(sources, mixture.datasets, strict=True):
        too_long = int((dataset.lengths > args.seq_length).sum())
        if too_long:
            print(
                f"note: {source.prefix}: {too_long} of {len(dataset)} sample(s) are longer than "
                "--seq-length and are left out of every mode"
            )
    print(format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
