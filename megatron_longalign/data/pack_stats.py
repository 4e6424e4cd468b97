"""Batching statistics for one planned epoch: what each batching mode costs.

For every micro-batch the plan says which documents it holds and how long each is
after padding. From that:

- fill: real tokens / (micro-batches x micro_batch_size x seq_length), i.e. how much of
  each micro-batch's token budget holds real data (packing raises it; it sets the number
  of micro-batches an epoch takes);
- padding waste: padding tokens / computed tokens (naive pads to the longest sample);
- attention needed / computed: sum of L_i^2 over real documents against what is computed
  (per-document causal attention on the padded documents); `packed, whole-pack mask`
  shows what a trainer without per-document masking would compute (T^2 per pack);
- expected speed-up over naive: the ratio of total cost under the cost model
  sum(L + L^2 / attention_equiv_length), compute only (it ignores per-micro-batch
  overheads, which favour fewer, fuller micro-batches further);
- rank imbalance: mean over steps of max/mean rank cost.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from megatron_longalign.config.data import PACKING_ALGORITHMS, DataConfig, PackingConfig
from megatron_longalign.data.planner import GlobalBatchPlanner


@dataclass
class BatchingStats:
    name: str
    micro_batches: int
    steps: int
    real_tokens: int
    computed_tokens: int
    fill: float
    attention_needed: float
    attention_computed: float
    cost: float
    imbalance: float
    speedup_over_naive: float = 1.0

    @property
    def padding_waste(self) -> float:
        return 1.0 - self.real_tokens / self.computed_tokens if self.computed_tokens else 0.0


def epoch_stats(planner: GlobalBatchPlanner, name: str, epoch: int = 0) -> BatchingStats:
    config = planner.config
    lengths = planner.lengths
    real = computed = micro_batches = 0
    attention_needed = attention_computed = cost = 0.0
    imbalances = []
    steps = planner.num_steps(epoch)
    for step in range(steps):
        batch = planner.global_batch(epoch, step)
        imbalances.append(batch.imbalance)
        for rank in batch.micro_batches:
            for plan in rank:
                micro_batches += 1
                docs = lengths[plan.samples].astype(np.float64)
                padded = np.full_like(docs, plan.pad_to) if plan.pad_to else docs
                real += int(docs.sum())
                computed += int(padded.sum())
                attention_needed += float((docs**2).sum())
                attention_computed += float((padded**2).sum())
                cost += float((padded + padded**2 / config.attention_equiv_length).sum())
    budget = micro_batches * config.micro_batch_size * config.seq_length
    return BatchingStats(
        name=name,
        micro_batches=micro_batches,
        steps=steps,
        real_tokens=real,
        computed_tokens=computed,
        fill=real / budget if budget else 0.0,
        attention_needed=attention_needed,
        attention_computed=attention_computed,
        cost=cost,
        imbalance=float(np.mean(imbalances)) if imbalances else 1.0,
    )


def whole_pack_attention(planner: GlobalBatchPlanner, epoch: int = 0) -> float:
    """Attention computed if each pack were one causal sequence (no document mask)."""
    units = planner.epoch_units(epoch)
    pack_tokens = np.add.reduceat(planner.lengths[units.members], units.unit_offsets[:-1])
    return float((pack_tokens.astype(np.float64) ** 2).sum())


def compare_batching(
    lengths: np.ndarray,
    target_counts: np.ndarray,
    source_sizes: list[int],
    source_weights: list[float],
    config: DataConfig,
    dp_size: int = 1,
) -> list[BatchingStats]:
    """naive, sorted and packed (every algorithm) on the same data and settings."""
    variants = [
        ("naive", replace(config, batching="naive")),
        ("sorted", replace(config, batching="sorted")),
    ]
    variants += [
        (
            f"packed ({algorithm})",
            replace(config, batching="packed", packing=PackingConfig(algorithm)),
        )
        for algorithm in PACKING_ALGORITHMS
    ]
    results = []
    for name, variant in variants:
        planner = GlobalBatchPlanner(
            lengths, target_counts, source_sizes, source_weights, variant, dp_size=dp_size
        )
        results.append(epoch_stats(planner, name))
        if name.startswith("packed") and variant.packing.algorithm == config.packing.algorithm:
            unmasked = replace(results[-1], name="packed, whole-pack mask")
            unmasked.attention_computed = whole_pack_attention(planner)
            # Linear part unchanged; attention as for one sequence per pack.
            unmasked.cost = (
                results[-1].cost
                - results[-1].attention_needed / config.attention_equiv_length
                + unmasked.attention_computed / config.attention_equiv_length
            )
            results.append(unmasked)
    naive_cost = results[0].cost
    for stats in results:
        stats.speedup_over_naive = naive_cost / stats.cost if stats.cost else 1.0
    return results


def format_table(results: list[BatchingStats]) -> str:
    header = (
        "| batching | micro-batches | steps | fill | padding waste | attention computed / needed "
        "| expected speed-up vs naive | rank imbalance |\n|---|---|---|---|---|---|---|---|"
    )
    rows = [
        f"| {s.name} | {s.micro_batches:,} | {s.steps:,} | {100 * s.fill:.1f}% "
        f"| {100 * s.padding_waste:.1f}% | {s.attention_computed / max(s.attention_needed, 1):.2f}x "
        f"| {s.speedup_over_naive:.2f}x | {s.imbalance:.3f} |"
        for s in results
    ]
    return "\n".join([header, *rows])
