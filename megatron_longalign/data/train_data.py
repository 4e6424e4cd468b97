"""The training data of one rank: the dataset mixture, the global batch planner (every
rank plans the same global batches) and the micro-batch builder, cut to this rank's
data-parallel and context-parallel share; and the validation data (`ValidationData`),
planned the same way from data.valid_sources or the held-out share of the training
sources (data.valid_fraction, data/holdout.py), which the training plan never uses."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from megatron_longalign.config.data import SkipAlignConfig
from megatron_longalign.config.training import LongAlignConfig
from megatron_longalign.data.holdout import held_out_mask
from megatron_longalign.data.microbatch import (
    MicroBatch,
    MicroBatchBuilder,
    shard_for_context_parallel,
)
from megatron_longalign.data.mixture import DatasetMixture
from megatron_longalign.data.planner import GlobalBatch, GlobalBatchPlanner, weighted_as_one_set
from megatron_longalign.parallel.context_parallel import document_multiple


@dataclass
class TrainData:
    """This rank's view of the data: every rank plans the same global batches."""

    mixture: DatasetMixture
    planner: GlobalBatchPlanner
    builder: MicroBatchBuilder
    dp_rank: int
    cp_size: int = 1
    cp_rank: int = 0

    def micro_batches(self, batch: GlobalBatch) -> list[MicroBatch]:
        """This rank's micro-batches: its DP rank's plans, built whole (cheap) and cut to
        its context-parallel share."""
        plans = batch.micro_batches[self.dp_rank]
        return [
            shard_for_context_parallel(
                self.builder.build(plan, batch.epoch), self.cp_size, self.cp_rank
            )
            for plan in plans
        ]


# The validation plan's own data seed: the validation batches (and with train.eval_iters
# the subset they cover) stay the same when data.seed changes, so runs compare.
VALIDATION_SEED = 20240101


def training_sample_mask(config: LongAlignConfig, mixture: DatasetMixture) -> np.ndarray | None:
    """The samples training may use: all but the held-out ones (None: all)."""
    if config.data.valid_fraction <= 0:
        return None
    return ~held_out_mask(mixture.sizes, config.data.valid_fraction)


def build_data(config: LongAlignConfig, dp_rank: int, dp_size: int, cp_rank: int = 0) -> TrainData:
    mixture = DatasetMixture(config.data.sources)
    return _plan_data(
        config, mixture, dp_rank, dp_size, cp_rank, training_sample_mask(config, mixture)
    )


def _plan_data(
    config: LongAlignConfig,
    mixture: DatasetMixture,
    dp_rank: int,
    dp_size: int,
    cp_rank: int,
    sample_mask: np.ndarray | None,
    *,
    validation: bool = False,
) -> TrainData:
    cp_size = config.parallel.context_parallel_size
    # Context parallelism: every document padded to a multiple of 2 x CP (TE's layout).
    doc_multiple = document_multiple(config.data.pad_documents_to_multiple_of, cp_size)
    data_config = config.data
    if validation:
        data_config = replace(data_config, seed=VALIDATION_SEED)
    planner = GlobalBatchPlanner(
        mixture.lengths,
        mixture.target_counts,
        mixture.sizes,
        # Validation reads every sample once, whatever the training mixture weights.
        [1.0] * len(mixture.sizes) if validation else mixture.weights,
        data_config,
        dp_size=dp_size,
        loss_reduction=config.train.loss_reduction,
        document_multiple=doc_multiple,
        sample_mask=sample_mask,
    )
    builder = MicroBatchBuilder(
        mixture.__getitem__,
        pad_to_multiple_of=config.data.pad_to_multiple_of,
        # Padding has weight 0 and its own pseudo-document: any valid id will do.
        pad_token_id=0,
        # SkipAlign is a training augmentation: validation measures plain positions.
        skipalign=SkipAlignConfig(enabled=False) if validation else config.data.skipalign,
        seed=config.data.seed,
        document_multiple=doc_multiple,
    )
    return TrainData(mixture, planner, builder, dp_rank, cp_size, cp_rank)


@dataclass
class ValidationData:
    """This rank's view of the validation set: `batches` are the validation plan's
    global batches (epoch 0 of its own planner, the first train.eval_iters of them),
    with loss weights computed over all of them together (`weighted_as_one_set`), so
    sum_t w_t * nll_t over every batch is train.loss_reduction over the whole set."""

    data: TrainData
    batches: list[GlobalBatch]
    available_batches: int  # the whole validation plan's global batches

    @property
    def num_sequences(self) -> int:
        return sum(batch.num_sequences for batch in self.batches)

    @property
    def num_samples(self) -> int:
        return sum(batch.num_samples for batch in self.batches)

    def micro_batches(self, batch: GlobalBatch) -> list[MicroBatch]:
        return self.data.micro_batches(batch)


def build_validation_data(
    config: LongAlignConfig,
    dp_rank: int,
    dp_size: int,
    cp_rank: int = 0,
    train_mixture: DatasetMixture | None = None,
) -> ValidationData | None:
    """The validation data of data.valid_sources or data.valid_fraction (None when
    neither is set). `train_mixture` (the training data's, when already open) is reused
    for the held-out split instead of opening the sources again."""
    data = config.data
    if data.valid_sources:
        mixture, mask = DatasetMixture(data.valid_sources), None
    elif data.valid_fraction > 0:
        mixture = train_mixture or DatasetMixture(data.sources)
        mask = held_out_mask(mixture.sizes, data.valid_fraction)
    else:
        return None
    planned = _plan_data(config, mixture, dp_rank, dp_size, cp_rank, mask, validation=True)
    available = planned.planner.num_steps(0)
    wanted = config.train.eval_iters
    count = available if wanted is None else min(wanted, available)
    batches = [planned.planner.global_batch(0, step) for step in range(count)]
    batches = weighted_as_one_set(
        batches, planned.planner.target_counts, config.train.loss_reduction
    )
    return ValidationData(planned, batches, available)
