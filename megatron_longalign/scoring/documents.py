"""What the scoring engine takes and gives (`ScoringDocument`, `DocumentResult`), and the
host-side work around the forward pass: checking documents, packing them into THD
micro-batches, building the attention probe's request, and reading each document's
per-token NLL back out of a micro-batch's token layout.

Everything here is numpy; the model and the collectives are in scoring/engine.py.

The NLL shift. The trainer's micro-batches (data/microbatch.py) put the loss of token
t + 1 at position t ("position t predicts token t + 1"). A `DocumentResult` instead
stores -log p(tokens[t] | tokens[:t]) at index t, so it lines up with the document's own
tokens and loss mask; index 0 (nothing predicts it) and every non-target are NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from megatron_longalign.data.microbatch import MicroBatch, MicroBatchBuilder
from megatron_longalign.data.packing import pack_samples
from megatron_longalign.data.planner import MicroBatchPlan


@dataclass(frozen=True)
class ScoringDocument:
    key: int  # the caller's id (unique within one score() call)
    tokens: np.ndarray  # int [L]
    loss_mask: np.ndarray  # bool [L]: token t is a target (like SFTSample.loss_mask)
    position_ids: np.ndarray | None = None  # default arange(L)
    probe_query_mask: np.ndarray | None = None  # bool [L]: measured query rows (None: no probe)
    probe_segments: np.ndarray | None = None  # int32 [L]: segment per key, -1 none
    num_segments: int = 0

    @property
    def probed(self) -> bool:
        return self.probe_query_mask is not None


@dataclass
class DocumentResult:
    key: int
    # float32 [L]: -log p(tokens[t] | tokens[:t]); NaN where not loss_mask or t == 0.
    token_nll: np.ndarray
    # float64 [num_segments] when probed (AttentionProbe.result semantics), else None.
    attention_mass: np.ndarray | None = None

    @property
    def mean_nll(self) -> float:
        """Mean over the loss-mask tokens t >= 1 (the non-NaN entries); NaN if none."""
        values = self.token_nll[~np.isnan(self.token_nll)]
        return float(values.astype(np.float64).mean()) if values.size else math.nan

    @property
    def ppl(self) -> float:
        return math.exp(self.mean_nll) if not math.isnan(self.mean_nll) else math.nan


# ---- checks ------------------------------------------------------------------------------


def check_documents(documents: Sequence[ScoringDocument], vocab_size: int) -> None:
    """ValueError naming the first bad document's key and what is wrong with it."""
    seen: set[int] = set()
    for doc in documents:
        if doc.key in seen:
            raise ValueError(f"document key {doc.key} appears twice in one score() call")
        seen.add(doc.key)
        problem = _document_problem(doc, vocab_size)
        if problem:
            raise ValueError(f"document key {doc.key}: {problem}")


def _document_problem(doc: ScoringDocument, vocab_size: int) -> str | None:
    tokens = np.asarray(doc.tokens)
    if tokens.ndim != 1 or tokens.size == 0 or tokens.dtype.kind not in "iu":
        return f"tokens must be a non-empty 1-D integer array, got {tokens.dtype} {tokens.shape}"
    bad = np.flatnonzero((tokens < 0) | (tokens >= vocab_size))
    if bad.size:
        return (
            f"token {int(tokens[bad[0]])} at position {int(bad[0])} is outside the model's "
            f"vocabulary of {vocab_size} (was it tokenized for another model?)"
        )
    length = tokens.size
    for name in ("loss_mask", "position_ids", "probe_query_mask", "probe_segments"):
        array = getattr(doc, name)
        if array is not None and np.shape(array) != (length,):
            return f"{name} has shape {np.shape(array)}, tokens have ({length},)"
    if doc.probed:
        if doc.probe_segments is None:
            return "probe_query_mask is set but probe_segments is not"
        segments = np.asarray(doc.probe_segments)
        if segments.size and (segments.min() < -1 or segments.max() >= doc.num_segments):
            return f"probe_segments must lie in [-1, num_segments={doc.num_segments})"
    return None


# ---- packing -----------------------------------------------------------------------------


def padded_length(length: int, multiple: int) -> int:
    """A document's length in the micro-batch layout (padded for context parallelism)."""
    return -(-length // multiple) * multiple


def plan_microbatches(
    lengths: Sequence[int], seq_length: int, document_multiple: int, algorithm: str
) -> list[np.ndarray]:
    """Input indices of the documents of each micro-batch. Documents are packed by their
    padded lengths into micro-batches of at most `seq_length` tokens (data/packing.py);
    one longer than that gets a micro-batch of its own (scoring drops nothing)."""
    padded = np.array([padded_length(n, document_multiple) for n in lengths], dtype=np.int64)
    fits = np.flatnonzero(padded <= seq_length)
    groups: list[np.ndarray] = []
    if fits.size:
        packs = pack_samples(padded[fits], seq_length, algorithm)
        groups += [fits[packs.pack(p)] for p in range(packs.num_packs)]
    groups += [np.array([i], dtype=np.int64) for i in np.flatnonzero(padded > seq_length)]
    return groups


@dataclass(frozen=True)
class _Sample:
    """What MicroBatchBuilder reads of a sample (SFTSample's fields, without regions)."""

    tokens: np.ndarray
    loss_mask: np.ndarray
    regions: np.ndarray


def microbatch_builder(
    documents: Sequence[ScoringDocument], document_multiple: int, pad_to_multiple_of: int
) -> MicroBatchBuilder:
    """The trainer's THD builder over `documents` (sample id = input index): the same
    labels, zero-weight padding and CP document padding as training."""

    def read(index: int) -> Any:
        doc = documents[index]
        return _Sample(
            np.asarray(doc.tokens, dtype=np.int64),
            np.asarray(doc.loss_mask, dtype=bool),
            np.zeros((0, 3), dtype=np.int64),
        )

    return MicroBatchBuilder(
        read, pad_to_multiple_of=pad_to_multiple_of, document_multiple=document_multiple
    )


def build_microbatch(
    documents: Sequence[ScoringDocument], indices: np.ndarray, builder: MicroBatchBuilder
) -> MicroBatch:
    """The whole (unsharded) micro-batch of documents `indices`, loss weight 1 per target,
    positions from each document's position_ids (arange by default; CP padding continues
    them, as the builder does)."""
    plan = MicroBatchPlan(samples=indices.astype(np.int64), weights=np.ones(indices.size))
    microbatch = builder.build(plan)
    layout = microbatch.layout_cu_seqlens
    for slot, index in enumerate(indices.tolist()):
        positions = documents[index].position_ids
        if positions is None:
            continue
        start, end = int(layout[slot]), int(layout[slot + 1])
        length = positions.size
        microbatch.position_ids[start : start + length] = positions
        tail = np.arange(end - start - length, dtype=np.int64)
        microbatch.position_ids[start + length : end] = int(positions[-1]) + 1 + tail
    return microbatch


# ---- results -----------------------------------------------------------------------------


def document_token_nll(
    layout_nll: np.ndarray, layout: np.ndarray, slot: int, doc: ScoringDocument
) -> np.ndarray:
    """Document `slot`'s NLL [L] from the micro-batch's layout NLL (the loss of token
    t + 1 sits at layout position start + t): shifted so index t is token t's NLL."""
    length = int(np.asarray(doc.tokens).size)
    start = int(layout[slot])
    nll = np.full(length, np.nan, dtype=np.float32)
    nll[1:] = layout_nll[start : start + length - 1]
    nll[~np.asarray(doc.loss_mask, dtype=bool)] = np.nan
    return nll


@dataclass(frozen=True)
class ProbePlan:
    """One micro-batch's probe request, and where each probed document's segments sit
    in the request's segment ids (micro-batch slot -> first id)."""

    request: Any  # model.attention_probe.ProbeRequest
    segment_offsets: dict[int, int]


def probe_plan(
    documents: Sequence[ScoringDocument],
    indices: np.ndarray,
    layout: np.ndarray,
    layers: tuple[int, ...] | None,
) -> ProbePlan | None:
    """The ProbeRequest of a micro-batch in its token layout (CP padding included), or
    None when none of its documents is probed. Segment ids are renumbered so the
    micro-batch's documents use disjoint ranges."""
    if not any(documents[i].probed for i in indices.tolist()):
        return None
    from megatron_longalign.model.attention_probe import ProbeRequest

    total = int(layout[-1])
    query_mask = np.zeros(total, dtype=bool)
    key_segments = np.full(total, -1, dtype=np.int32)
    offsets: dict[int, int] = {}
    next_id = 0
    for slot, index in enumerate(indices.tolist()):
        doc = documents[index]
        if not doc.probed:
            continue
        start, length = int(layout[slot]), int(np.asarray(doc.tokens).size)
        query_mask[start : start + length] = np.asarray(doc.probe_query_mask, dtype=bool)
        segments = np.asarray(doc.probe_segments, dtype=np.int32)
        key_segments[start : start + length] = np.where(segments >= 0, segments + next_id, -1)
        offsets[slot] = next_id
        next_id += doc.num_segments
    request = ProbeRequest(
        query_mask=query_mask, key_segments=key_segments, num_segments=next_id, layers=layers
    )
    return ProbePlan(request, offsets)
