"""Build one THD micro-batch (documents back to back, no padding between them).

For a document of L tokens, position t < L - 1 predicts token t + 1: `labels[t]` is that
token and `loss_weights[t]` is the sample's per-token weight if token t + 1 is a target,
else 0. The last position of every document predicts nothing (label 0, weight 0), so
nothing crosses a document boundary. Padding (naive batching pads each sample to the
micro-batch's longest; `pad_to_multiple_of` adds a trailing pseudo-document) has
weight 0 and label 0, and an empty plan becomes a single zero-weight pad document.

Context parallelism (`document_multiple` = 2 * CP) pads every document to a multiple of
that with zero-weight tokens at its end (after the real tokens, so causal attention of
the real tokens is unchanged). Then, in megatron-core's convention, `cu_seqlens` counts
real lengths and `cu_seqlens_padded` gives the token layout; `shard_for_context_parallel`
cuts the result into each CP rank's share (the layout: parallel/context_parallel.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from megatron_longalign.data.indexed import SFTSample
from megatron_longalign.data.planner import MicroBatchPlan
from megatron_longalign.data.positions import (
    SkipAlignConfig,
    sample_rng,
    skipalign_position_ids,
)
from megatron_longalign.parallel.context_parallel import (
    context_parallel_token_index,
    local_document_bounds,
)


@dataclass
class MicroBatch:
    tokens: np.ndarray  # int64 (T,)
    labels: np.ndarray  # int64 (T,)
    loss_weights: np.ndarray  # float32 (T,)
    position_ids: np.ndarray  # int64 (T,)
    cu_seqlens: np.ndarray  # int32 (D + 1,), documents including pad documents
    max_seqlen: int
    sample_ids: np.ndarray  # int64 global ids of the real documents, in order
    num_real_tokens: int
    # With document padding: the token layout ([D + 1], cu_seqlens then counts real
    # lengths); None when no document is padded (the layout is cu_seqlens).
    cu_seqlens_padded: np.ndarray | None = None
    # After shard_for_context_parallel: the arrays above hold only this CP rank's tokens,
    # while cu_seqlens / cu_seqlens_padded still describe the whole micro-batch.
    cp_size: int = 1
    cp_rank: int = 0

    @property
    def num_tokens(self) -> int:
        """Tokens held here (this CP rank's share when sharded)."""
        return int(self.tokens.size)

    @property
    def layout_cu_seqlens(self) -> np.ndarray:
        """Document boundaries in the whole micro-batch's token layout (padding included)."""
        return self.cu_seqlens if self.cu_seqlens_padded is None else self.cu_seqlens_padded

    @property
    def local_document_bounds(self) -> np.ndarray:
        """Document boundaries in the locally held arrays: each CP rank holds 1 / CP of
        every (padded) document, its two chunks back to back."""
        return local_document_bounds(self.layout_cu_seqlens, self.cp_size)

    @property
    def num_documents(self) -> int:
        return int(self.cu_seqlens.size - 1)


class MicroBatchBuilder:
    def __init__(
        self,
        read_sample: Callable[[int], SFTSample],
        pad_to_multiple_of: int = 1,
        pad_token_id: int = 0,
        skipalign: SkipAlignConfig | None = None,
        seed: int = 0,
        document_multiple: int = 1,
    ) -> None:
        if pad_to_multiple_of % document_multiple:
            raise ValueError(
                f"pad_to_multiple_of ({pad_to_multiple_of}) must be a multiple of "
                f"document_multiple ({document_multiple}): the alignment pad is a document too"
            )
        self.read_sample = read_sample
        self.document_multiple = document_multiple
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pad_token_id = pad_token_id
        self.skipalign = skipalign or SkipAlignConfig()
        self.seed = seed

    def build(self, plan: MicroBatchPlan, epoch: int = 0) -> MicroBatch:
        tokens, labels, weights, positions, doc_lengths = [], [], [], [], []
        padded_lengths = []
        real = 0
        for sample_id, weight in zip(plan.samples.tolist(), plan.weights.tolist(), strict=True):
            sample = self.read_sample(sample_id)
            length = sample.tokens.size
            real += length
            doc_tokens = sample.tokens.astype(np.int64)
            doc_labels = np.zeros(length, dtype=np.int64)
            doc_labels[:-1] = doc_tokens[1:]
            doc_weights = np.zeros(length, dtype=np.float32)
            doc_weights[:-1] = np.where(sample.loss_mask[1:], np.float32(weight), np.float32(0))
            # Naive batching's padding counts as part of the document (as before CP);
            # SkipAlign leaves room for its positions below the target.
            pad = max(plan.pad_to - length, 0)
            doc_positions = self._positions(sample, epoch, sample_id, reserve=pad)
            # Context parallelism's padding is layout only: real positions unchanged.
            cp_pad = -(length + pad) % self.document_multiple
            arrays = self._pad_tail(
                (doc_tokens, doc_labels, doc_weights, doc_positions), pad + cp_pad
            )
            for out, array in zip((tokens, labels, weights, positions), arrays, strict=True):
                out.append(array)
            doc_lengths.append(length + pad)
            padded_lengths.append(length + pad + cp_pad)
        total = sum(padded_lengths)
        pad_doc = -total % self.pad_to_multiple_of if total else self.pad_to_multiple_of
        if pad_doc:
            tokens.append(np.full(pad_doc, self.pad_token_id, dtype=np.int64))
            labels.append(np.zeros(pad_doc, np.int64))
            weights.append(np.zeros(pad_doc, np.float32))
            positions.append(np.arange(pad_doc, dtype=np.int64))
            doc_lengths.append(pad_doc)
            padded_lengths.append(pad_doc)
        cu_seqlens = np.concatenate([[0], np.cumsum(doc_lengths)]).astype(np.int32)
        cu_seqlens_padded = None
        if self.document_multiple > 1:
            cu_seqlens_padded = np.concatenate([[0], np.cumsum(padded_lengths)]).astype(np.int32)
        return MicroBatch(
            tokens=np.concatenate(tokens),
            labels=np.concatenate(labels),
            loss_weights=np.concatenate(weights),
            position_ids=np.concatenate(positions),
            cu_seqlens=cu_seqlens,
            # Of the layout (padded) lengths: TE sizes its work by the padded documents.
            max_seqlen=int(max(padded_lengths)),
            sample_ids=plan.samples.copy(),
            num_real_tokens=real,
            cu_seqlens_padded=cu_seqlens_padded,
        )

    def _pad_tail(self, arrays: tuple[np.ndarray, ...], count: int) -> tuple[np.ndarray, ...]:
        """(tokens, labels, weights, positions) of a document with `count` zero-weight
        pad tokens appended; their positions continue the document's."""
        if not count:
            return arrays
        tokens, labels, weights, positions = arrays
        return (
            np.concatenate([tokens, np.full(count, self.pad_token_id, dtype=np.int64)]),
            np.concatenate([labels, np.zeros(count, np.int64)]),
            np.concatenate([weights, np.zeros(count, np.float32)]),
            np.concatenate([positions, positions[-1] + 1 + np.arange(count)]),
        )

    def _positions(
        self, sample: SFTSample, epoch: int, sample_id: int, reserve: int = 0
    ) -> np.ndarray:
        """Positions of the sample's own tokens. `reserve` pad positions follow them in the
        same document, so SkipAlign's skips leave room for those below the target."""
        length = sample.tokens.size
        if not self.skipalign.enabled:
            return np.arange(length, dtype=np.int64)
        config = replace(
            self.skipalign, target_context_length=self.skipalign.target_context_length - reserve
        )
        rng = sample_rng(self.seed, epoch, sample_id)
        return skipalign_position_ids(length, sample.regions, config, rng)


def shard_for_context_parallel(microbatch: MicroBatch, cp_size: int, cp_rank: int) -> MicroBatch:
    """This CP rank's share of a whole (already document-padded) micro-batch. With
    cp_size 1 the micro-batch is returned unchanged."""
    if cp_size == 1:
        return microbatch
    if microbatch.cp_size != 1:
        raise ValueError("the micro-batch is already sharded for context parallelism")
    layout = microbatch.layout_cu_seqlens
    if int(layout[-1]) != microbatch.num_tokens:
        raise ValueError(
            f"cu_seqlens_padded ends at {int(layout[-1])} but the micro-batch has "
            f"{microbatch.num_tokens} tokens"
        )
    index = context_parallel_token_index(layout, cp_size, cp_rank)
    return replace(
        microbatch,
        tokens=microbatch.tokens[index],
        labels=microbatch.labels[index],
        loss_weights=microbatch.loss_weights[index],
        position_ids=microbatch.position_ids[index],
        cu_seqlens_padded=layout,
        cp_size=cp_size,
        cp_rank=cp_rank,
    )
