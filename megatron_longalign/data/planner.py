"""The global batch plan: which samples every data-parallel rank sees at every step.

Everything is a pure function of (seed, epoch, sample lengths, config), so every rank
computes the same plan with no communication, and a run resumed at (epoch, step)
continues the exact same stream.

Per epoch:
1. pool: the epoch's global sample ids (mixture weights), shuffled;
2. units, by batching mode:
   - packed: the shuffled pool packed into packs of <= seq_length tokens (next_fit keeps
     the shuffled order; the decreasing algorithms sort by length), pack order shuffled;
   - sorted (LongAlign's sorted batching): the pool sorted by length (ties in shuffled
     order), cut into global batches of similar lengths, batch order shuffled;
   - naive: the shuffled pool, one sample per unit (micro-batches padded to the longest);
3. global batches of `global_batch_size` units (the last one may be smaller: nothing is
   dropped); within each, units are assigned to ranks balancing estimated cost
   (sum over documents of L + L^2 / attention_equiv_length), at most
   micro_batch_size * num_micro_batches units per rank; each rank's units are ordered by
   cost and grouped into micro-batches. Ranks left with fewer units get empty
   micro-batches (a zero-weight pad), so all ranks run the same number of micro-batches;
4. loss weights from the global batch's target counts (see `weights`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache

import numpy as np

from megatron_longalign.config.data import (
    BATCHING_MODES,
    LOSS_REDUCTIONS,
    OVERLENGTH_ACTIONS,
    PACKING_ALGORITHMS,
    DataConfig,
)
from megatron_longalign.config.errors import raise_if_problems
from megatron_longalign.data.mixture import (
    STREAM_SHUFFLE,
    STREAM_UNIT_ORDER,
    epoch_pool,
    epoch_rng,
)
from megatron_longalign.data.packing import pack_samples
from megatron_longalign.data.positions import skipalign_problems
from megatron_longalign.data.weights import per_token_weights


@dataclass(frozen=True)
class MicroBatchPlan:
    samples: np.ndarray  # int64 global sample ids, in document order (may be empty)
    weights: np.ndarray  # float64 loss weight of each target token, per sample
    pad_to: int = 0  # naive batching: pad each sample to this length (0: no padding)

    @property
    def is_empty(self) -> bool:
        return self.samples.size == 0


@dataclass(frozen=True)
class GlobalBatch:
    epoch: int
    step: int  # index of this global batch within its epoch
    micro_batches: list[list[MicroBatchPlan]]  # [dp_rank][micro_batch]
    rank_costs: np.ndarray  # (dp,) estimated cost per rank
    num_samples: int
    num_sequences: int  # samples with >= 1 predicted target (M)
    real_tokens: int
    target_tokens: int

    @property
    def imbalance(self) -> float:
        """max / mean rank cost (1.0 = perfectly balanced)."""
        mean = float(self.rank_costs.mean())
        return float(self.rank_costs.max()) / mean if mean > 0 else 1.0


@dataclass(frozen=True)
class PlanPosition:
    """Where the data stream is: the next global batch is `step` of `epoch`."""

    epoch: int = 0
    step: int = 0


@dataclass(frozen=True)
class EpochUnits:
    """One epoch's units in order (CSR over global sample ids) and the global batches
    as ranges of units."""

    members: np.ndarray  # int64 global ids
    unit_offsets: np.ndarray  # (num_units + 1,)
    batch_offsets: np.ndarray  # (num_batches + 1,) in units

    @property
    def num_batches(self) -> int:
        return int(self.batch_offsets.size - 1)

    def unit(self, u: int) -> np.ndarray:
        return self.members[self.unit_offsets[u] : self.unit_offsets[u + 1]]


@dataclass
class PlannerReport:
    """What the planner left out, for the logs (never silent)."""

    dropped_overlength: int = 0
    dropped_examples: list[int] = field(default_factory=list)


def data_problems(data: DataConfig, dp_size: int = 1) -> list[str]:
    """What is wrong with the data group for `dp_size` data-parallel ranks (empty when
    nothing), each naming the field to change. The start-up validator and the planner
    both call it."""
    problems: list[str] = []

    def fail(message: str) -> None:
        problems.append(f"data config: {message}")

    if not data.sources:
        fail("no dataset sources (data.sources is empty)")
    if data.batching not in BATCHING_MODES:
        fail(f"data.batching={data.batching!r}; choose one of {BATCHING_MODES}")
    if data.packing.algorithm not in PACKING_ALGORITHMS:
        fail(
            f"data.packing.algorithm={data.packing.algorithm!r}; choose one of {PACKING_ALGORITHMS}"
        )
    if data.on_overlength not in OVERLENGTH_ACTIONS:
        fail(f"data.on_overlength={data.on_overlength!r}; choose one of {OVERLENGTH_ACTIONS}")
    if data.seq_length < 2:
        fail("data.seq_length must be >= 2")
    if (
        data.micro_batch_size < 1
        or data.pad_to_multiple_of < 1
        or data.pad_documents_to_multiple_of < 1
    ):
        fail(
            "data.micro_batch_size, data.pad_to_multiple_of and "
            "data.pad_documents_to_multiple_of must be >= 1"
        )
    else:
        if data.global_batch_size % (data.micro_batch_size * dp_size):
            fail(
                f"data.global_batch_size ({data.global_batch_size}) must be divisible by "
                f"micro_batch_size ({data.micro_batch_size}) x data-parallel size ({dp_size})"
            )
        if data.seq_length % data.pad_to_multiple_of:
            fail(
                f"data.seq_length ({data.seq_length}) must be a multiple of "
                f"pad_to_multiple_of ({data.pad_to_multiple_of})"
            )
    for problem in skipalign_problems(data.skipalign, "data.skipalign."):
        fail(problem)
    for i, source in enumerate(data.sources):
        if not source.prefix:
            fail(
                f"data.sources[{i}].prefix is empty: give the dataset's prefix P "
                "(tools/preprocess.py --output-prefix P); with data=single, data.prefix=P"
            )
        if source.weight < 0:
            fail(f"dataset {source.prefix}: weight must be >= 0, got {source.weight}")
    problems += [f"data config: {p}" for p in validation_data_problems(data)]
    if data.prefix and data.prefix not in [source.prefix for source in data.sources]:
        fail(
            f"data.prefix={data.prefix!r} is not one of data.sources: data.prefix is read "
            "by data=single only; add data=single, or list the dataset in data.sources"
        )
    return problems


def validation_data_problems(data: DataConfig) -> list[str]:
    """data.valid_sources / data.valid_fraction: one of them at most, a fraction in
    [0, 1), and validation sources that name a prefix and keep weight 1 (validation uses
    every sample once)."""
    problems = []
    fraction = data.valid_fraction
    if not 0.0 <= fraction < 1.0:
        problems.append(
            f"data.valid_fraction={fraction} must be in [0, 1) (the share of the training "
            "sources' samples held out for validation; 0 = none)"
        )
    if data.valid_sources and fraction > 0:
        problems.append(
            f"data.valid_sources ({len(data.valid_sources)} set(s)) and data.valid_fraction="
            f"{fraction} are both set: validate on separate sets or on a held-out share of "
            "the training data, not both; set data.valid_fraction=0 or data.valid_sources=[]"
        )
    for i, source in enumerate(data.valid_sources):
        if not source.prefix:
            problems.append(
                f"data.valid_sources[{i}].prefix is empty: give the validation set's prefix "
                "P (tools/preprocess.py --output-prefix P)"
            )
        if source.weight != 1.0:
            problems.append(
                f"data.valid_sources[{i}] ({source.prefix}): weight {source.weight} is not "
                "used (validation reads every sample once); remove it"
            )
    return problems


def loss_reduction_problems(loss_reduction: str) -> list[str]:
    """train.loss_reduction must name a reduction the planner knows."""
    if loss_reduction in LOSS_REDUCTIONS:
        return []
    return [
        f"train.loss_reduction={loss_reduction!r}: unknown loss reduction {loss_reduction!r}; "
        f"choose one of {LOSS_REDUCTIONS}"
    ]


class GlobalBatchPlanner:
    def __init__(
        self,
        lengths: np.ndarray,
        target_counts: np.ndarray,
        source_sizes: Sequence[int],
        source_weights: Sequence[float],
        config: DataConfig,
        dp_size: int = 1,
        loss_reduction: str = "sequence",
        document_multiple: int = 1,
        sample_mask: np.ndarray | None = None,
    ) -> None:
        """`sample_mask` (bool per global id; None: all) is the samples the plan may use:
        the training planner leaves out the held-out ones (data/holdout.py), the
        validation planner takes only them."""
        raise_if_problems(data_problems(config, dp_size) + loss_reduction_problems(loss_reduction))
        self.config = config
        self.dp_size = dp_size
        self.loss_reduction = loss_reduction
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.target_counts = np.asarray(target_counts, dtype=np.int64)
        self.source_sizes = list(source_sizes)
        self.source_weights = list(source_weights)
        if self.lengths.size != sum(self.source_sizes):
            raise ValueError("lengths must cover all samples of all sources")
        self.sample_mask = (
            np.ones(self.lengths.size, dtype=bool)
            if sample_mask is None
            else np.asarray(sample_mask, dtype=bool)
        )
        if self.sample_mask.shape != self.lengths.shape:
            raise ValueError("sample_mask must have one entry per sample of all sources")
        self.micro_batches_per_rank = config.global_batch_size // (
            config.micro_batch_size * dp_size
        )
        # Context parallelism pads every document to a multiple of 2 x CP: packs and
        # costs count those padded lengths, so a pack never outgrows seq_length.
        self.layout_lengths = -(-self.lengths // document_multiple) * document_multiple
        self.report = PlannerReport()
        self._usable = self._check_lengths()
        per_token = float(config.attention_equiv_length)
        self._cost = self.layout_lengths + self.layout_lengths.astype(np.float64) ** 2 / per_token
        self._epoch_units = lru_cache(maxsize=2)(self._build_epoch_units)

    def _check_lengths(self) -> np.ndarray:
        """The usable samples: in `sample_mask` and no longer than seq_length (the
        others are an error or dropped and counted, by data.on_overlength)."""
        too_long = np.flatnonzero((self.lengths > self.config.seq_length) & self.sample_mask)
        if too_long.size and self.config.on_overlength == "error":
            raise ValueError(
                f"{too_long.size} sample(s) are longer than data.seq_length="
                f"{self.config.seq_length} (longest {int(self.lengths.max())} tokens, e.g. "
                f"global id {int(too_long[0])}); re-run tools/preprocess.py with "
                f"--max-length {self.config.seq_length}, or set data.on_overlength=drop"
            )
        self.report.dropped_overlength = int(too_long.size)
        self.report.dropped_examples = too_long[:10].tolist()
        return (self.lengths <= self.config.seq_length) & self.sample_mask

    # ---- epoch structure -------------------------------------------------------------

    def _pool(self, epoch: int) -> np.ndarray:
        pool = epoch_pool(self.source_sizes, self.source_weights, self.config.seed, epoch)
        pool = pool[self._usable[pool]]
        return epoch_rng(self.config.seed, epoch, STREAM_SHUFFLE).permutation(pool)

    def _build_epoch_units(self, epoch: int) -> EpochUnits:
        pool = self._pool(epoch)
        rng = epoch_rng(self.config.seed, epoch, STREAM_UNIT_ORDER)
        gbs = self.config.global_batch_size
        mode = self.config.batching
        if mode == "packed":
            packs = pack_samples(
                self.layout_lengths[pool], self.config.seq_length, self.config.packing.algorithm
            )
            order = rng.permutation(packs.num_packs)
            members, unit_offsets = _reorder_csr(pool[packs.members], packs.offsets, order)
            batch_offsets = _fixed_batches(packs.num_packs, gbs)
        elif mode == "sorted":
            by_length = pool[np.argsort(self.lengths[pool], kind="stable")]
            batch_offsets = _fixed_batches(by_length.size, gbs)
            order = rng.permutation(batch_offsets.size - 1)
            members, batch_offsets = _reorder_csr(by_length, batch_offsets, order)
            unit_offsets = np.arange(members.size + 1, dtype=np.int64)
        else:  # naive
            members = pool
            unit_offsets = np.arange(members.size + 1, dtype=np.int64)
            batch_offsets = _fixed_batches(members.size, gbs)
        return EpochUnits(members, unit_offsets, batch_offsets)

    def epoch_units(self, epoch: int) -> EpochUnits:
        return self._epoch_units(epoch)

    def num_steps(self, epoch: int) -> int:
        return self.epoch_units(epoch).num_batches

    # ---- one global batch ------------------------------------------------------------

    def global_batch(self, epoch: int, step: int) -> GlobalBatch:
        units = self.epoch_units(epoch)
        if not 0 <= step < units.num_batches:
            raise IndexError(f"epoch {epoch} has {units.num_batches} steps, asked for {step}")
        unit_ids = np.arange(units.batch_offsets[step], units.batch_offsets[step + 1])
        unit_samples = [units.unit(u) for u in unit_ids]
        all_samples = np.concatenate(unit_samples)
        counts = self.target_counts[all_samples]
        weights = per_token_weights(counts, self.loss_reduction)
        # Weights follow positions, not ids: with mixture weights > 1 the same sample can
        # occur twice in one batch, and each occurrence is its own sequence.
        unit_weights = np.split(weights, np.cumsum([s.size for s in unit_samples])[:-1])
        unit_costs = np.array([self._cost[s].sum() for s in unit_samples])
        assignment = balanced_assignment(
            unit_costs, self.dp_size, self.config.micro_batch_size * self.micro_batches_per_rank
        )
        micro_batches, rank_costs = [], np.zeros(self.dp_size)
        for rank, rank_units in enumerate(assignment):
            plans = self._micro_batches(rank_units, unit_samples, unit_weights, unit_costs)
            micro_batches.append(plans)
            rank_costs[rank] = sum(self._plan_cost(p) for p in plans)
        return GlobalBatch(
            epoch=epoch,
            step=step,
            micro_batches=micro_batches,
            rank_costs=rank_costs,
            num_samples=int(all_samples.size),
            num_sequences=int((counts > 0).sum()),
            real_tokens=int(self.lengths[all_samples].sum()),
            target_tokens=int(counts.sum()),
        )

    def _micro_batches(self, rank_units, unit_samples, unit_weights, unit_costs):
        # Costliest first: similar lengths end up in the same micro-batch (which also
        # minimises naive padding) and the schedule runs by length.
        ordered = sorted(rank_units, key=lambda u: (-unit_costs[u], u))
        mbs = self.config.micro_batch_size
        plans = []
        for i in range(self.micro_batches_per_rank):
            chosen = ordered[i * mbs : (i + 1) * mbs]
            if not chosen:
                plans.append(MicroBatchPlan(np.zeros(0, np.int64), np.zeros(0)))
                continue
            samples = np.concatenate([unit_samples[u] for u in chosen])
            weights = np.concatenate([unit_weights[u] for u in chosen])
            pad_to = int(self.lengths[samples].max()) if self.config.batching == "naive" else 0
            plans.append(MicroBatchPlan(samples, weights, pad_to))
        return plans

    def _plan_cost(self, plan: MicroBatchPlan) -> float:
        if plan.is_empty:
            return 0.0
        if plan.pad_to:
            per_token = float(self.config.attention_equiv_length)
            return plan.samples.size * (plan.pad_to + plan.pad_to**2 / per_token)
        return float(self._cost[plan.samples].sum())

    # ---- iteration and resume --------------------------------------------------------

    def iterate(
        self, start: PlanPosition | None = None, epochs: int | None = None
    ) -> Iterator[GlobalBatch]:
        """Global batches from `start` on, through `epochs` epochs in total (forever if
        None)."""
        position = start or PlanPosition()
        epoch, step = position.epoch, position.step
        while epochs is None or epoch < epochs:
            steps = self.num_steps(epoch)
            if steps == 0:
                raise ValueError("the data plan is empty: no usable samples in this epoch")
            while step < steps:
                yield self.global_batch(epoch, step)
                step += 1
            epoch, step = epoch + 1, 0

    def position_after(self, consumed_samples: int) -> PlanPosition:
        """The position after `consumed_samples` samples (a checkpoint's counter); it must
        fall on a global batch boundary."""
        epoch, consumed = 0, 0
        while True:
            units = self.epoch_units(epoch)
            per_batch = [
                int(
                    units.unit_offsets[units.batch_offsets[b + 1]]
                    - units.unit_offsets[units.batch_offsets[b]]
                )
                for b in range(units.num_batches)
            ]
            if not per_batch:
                raise ValueError("the data plan is empty: no usable samples")
            for step, size in enumerate(per_batch):
                if consumed == consumed_samples:
                    return PlanPosition(epoch, step)
                consumed += size
                if consumed > consumed_samples:
                    raise ValueError(
                        f"consumed_samples={consumed_samples} is not on a global batch "
                        f"boundary (epoch {epoch}, step {step} ends at {consumed})"
                    )
            epoch += 1


def weighted_as_one_set(
    batches: Sequence[GlobalBatch], target_counts: np.ndarray, reduction: str
) -> list[GlobalBatch]:
    """`batches` with their loss weights recomputed over all of them together (one
    `per_token_weights` over every sample occurrence of every batch), so that
    sum_t w_t * nll_t over all the batches is the reduction over the whole set, however
    it is cut into global batches, micro-batches and ranks (validation: the
    sequence-mode value is the mean over the set's sequences of their mean NLL)."""
    plans = [plan for batch in batches for rank in batch.micro_batches for plan in rank]
    sizes = [plan.samples.size for plan in plans]
    counts = np.asarray(target_counts, dtype=np.int64)
    all_counts = (
        np.concatenate([counts[plan.samples] for plan in plans])
        if plans
        else np.zeros(0, dtype=np.int64)
    )
    weights = iter(np.split(per_token_weights(all_counts, reduction), np.cumsum(sizes)[:-1]))
    return [
        replace(
            batch,
            micro_batches=[
                [replace(plan, weights=next(weights)) for plan in rank]
                for rank in batch.micro_batches
            ],
        )
        for batch in batches
    ]


def _fixed_batches(num_units: int, batch_size: int) -> np.ndarray:
    """Offsets of consecutive batches of `batch_size` units, the last one partial."""
    offsets = np.arange(0, num_units, batch_size, dtype=np.int64)
    return np.append(offsets, num_units)


def _reorder_csr(members: np.ndarray, offsets: np.ndarray, order: np.ndarray):
    """CSR groups rearranged into `order`; returns (members, offsets)."""
    sizes = np.diff(offsets)[order]
    new_offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    if members.size == 0:
        return members, new_offsets
    pieces = [members[offsets[g] : offsets[g + 1]] for g in order]
    return np.concatenate(pieces), new_offsets


def balanced_assignment(costs: np.ndarray, ranks: int, slots: int | None = None) -> list[list[int]]:
    """Greedy longest-processing-time: costliest unit first, onto the least-loaded rank
    that still has a free slot (`slots` per rank; None: no limit; ties: lowest rank).
    Deterministic. Also used to shard GATEAU scoring over DP ranks."""
    slots = costs.size if slots is None else slots
    loads = np.zeros(ranks)
    assigned: list[list[int]] = [[] for _ in range(ranks)]
    for unit in sorted(range(costs.size), key=lambda u: (-costs[u], u)):
        open_ranks = [r for r in range(ranks) if len(assigned[r]) < slots]
        rank = min(open_ranks, key=lambda r: (loads[r], r))
        assigned[rank].append(unit)
        loads[rank] += costs[unit]
    return assigned
