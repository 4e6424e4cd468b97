"""Build one THD micro-batch (documents back to back, no padding between them).

For a document of L tokens, position t < L - 1 predicts token t + 1: `labels[t]` is that
token and `loss_weights[t]` is the sample's per-token weight if token t + 1 is a target,
else 0. The last position of every document predicts nothing (label 0, weight 0), so
nothing crosses a document boundary. Padding (naive batching pads each sample to the
micro-batch's longest; `pad_to_multiple_of` adds a trailing pseudo-document) has
weight 0 and label 0, and an empty plan becomes a single zero-weight pad document.
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

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.size)

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
    ) -> None:
        self.read_sample = read_sample
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pad_token_id = pad_token_id
        self.skipalign = skipalign or SkipAlignConfig()
        self.seed = seed

    def build(self, plan: MicroBatchPlan, epoch: int = 0) -> MicroBatch:
        tokens, labels, weights, positions, doc_lengths = [], [], [], [], []
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
            pad = max(plan.pad_to - length, 0)
            doc_positions = self._positions(sample, epoch, sample_id, reserve=pad)
            if pad:
                doc_tokens = np.concatenate([doc_tokens, np.full(pad, self.pad_token_id)])
                doc_labels = np.concatenate([doc_labels, np.zeros(pad, np.int64)])
                doc_weights = np.concatenate([doc_weights, np.zeros(pad, np.float32)])
                tail = doc_positions[-1] + 1 + np.arange(pad)
                doc_positions = np.concatenate([doc_positions, tail])
            tokens.append(doc_tokens)
            labels.append(doc_labels)
            weights.append(doc_weights)
            positions.append(doc_positions)
            doc_lengths.append(length + pad)
        total = sum(doc_lengths)
        pad_doc = -total % self.pad_to_multiple_of if total else self.pad_to_multiple_of
        if pad_doc:
            tokens.append(np.full(pad_doc, self.pad_token_id, dtype=np.int64))
            labels.append(np.zeros(pad_doc, np.int64))
            weights.append(np.zeros(pad_doc, np.float32))
            positions.append(np.arange(pad_doc, dtype=np.int64))
            doc_lengths.append(pad_doc)
        cu_seqlens = np.concatenate([[0], np.cumsum(doc_lengths)]).astype(np.int32)
        return MicroBatch(
            tokens=np.concatenate(tokens),
            labels=np.concatenate(labels),
            loss_weights=np.concatenate(weights),
            position_ids=np.concatenate(positions),
            cu_seqlens=cu_seqlens,
            max_seqlen=int(max(doc_lengths)),
            sample_ids=plan.samples.copy(),
            num_real_tokens=real,
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
