"""The training data of one rank: the dataset mixture, the global batch planner (every
rank plans the same global batches) and the micro-batch builder, cut to this rank's
data-parallel and context-parallel share."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_longalign.config.training import LongAlignConfig
from megatron_longalign.data.microbatch import (
    MicroBatch,
    MicroBatchBuilder,
    shard_for_context_parallel,
)
from megatron_longalign.data.mixture import DatasetMixture
from megatron_longalign.data.planner import GlobalBatch, GlobalBatchPlanner
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


def build_data(config: LongAlignConfig, dp_rank: int, dp_size: int, cp_rank: int = 0) -> TrainData:
    cp_size = config.parallel.context_parallel_size
    # Context parallelism: every document padded to a multiple of 2 x CP (TE's layout).
    doc_multiple = document_multiple(config.data.pad_documents_to_multiple_of, cp_size)
    mixture = DatasetMixture(config.data.sources)
    planner = GlobalBatchPlanner(
        mixture.lengths,
        mixture.target_counts,
        mixture.sizes,
        mixture.weights,
        config.data,
        dp_size=dp_size,
        loss_reduction=config.train.loss_reduction,
        document_multiple=doc_multiple,
    )
    builder = MicroBatchBuilder(
        mixture.__getitem__,
        pad_to_multiple_of=config.data.pad_to_multiple_of,
        # Padding has weight 0 and its own pseudo-document: any valid id will do.
        pad_token_id=0,
        skipalign=config.data.skipalign,
        seed=config.data.seed,
        document_multiple=doc_multiple,
    )
    return TrainData(mixture, planner, builder, dp_rank, cp_size, cp_rank)
