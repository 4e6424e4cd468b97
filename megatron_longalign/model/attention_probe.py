"""Attention probe for GATEAU's Contextual Awareness Measurement: how much attention the
measured query rows (a sample's response tokens) put on each key segment (e.g. a context
passage), averaged over layers, heads and query rows.

    request = ProbeRequest(query_mask, key_segments, num_segments, layers=(3, 4))
    probe = AttentionProbe(request)
    with torch.no_grad(), attach_probe(model_chunks, probe):
        model(**inputs)                      # one micro-batch
    mass = probe.result(groups=[tp, cp, pp])  # float64 [num_segments]

How it hooks in: the core-attention modules of model/attention.py (sdpa, flex, flash)
hold a `probe` attribute, None unless `attach_probe` set it; when set, they hand it the
post-RoPE q [T_local, H_local, D] and k [T, Hkv_local, D] they already have, with the
(padded) document layout and, under context parallelism, the gathered K in global order
and the local queries' global positions. Training without a probe pays one attribute
check per layer. TE's DotProductAttention does not expose q and k, so `te` models are
refused at attach time.

Memory: only the measured query rows are scored, in blocks of `query_chunk` rows against
keys in chunks of `key_chunk` (`chunk_scores`, the one place scores are built): never an
L x L matrix, at most query_chunk x H x key_chunk floats at a time. Two passes per row
block: the row's log-sum-exp over its document's causal keys, then the softmax mass of
the chunks that hold segment keys (chunks without any are skipped in the second pass).
Scores are fp32 (q and k upcast, like the fp32 softmax of the attention kernels); the
per-segment sums are accumulated in float64.

Sums are partial per rank: heads split over TP, query rows over CP, layers over PP.
`result(groups)` all-reduces numerators and counts over the groups given, then divides.

Not re-entrant across activation recompute: a recomputed forward reports again. Scoring
runs under torch.no_grad(), where nothing is recomputed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from megatron_longalign.model.attention import _PackedCoreAttention


@dataclass(frozen=True)
class ProbeRequest:
    """What to measure in ONE micro-batch, indexed in the whole micro-batch's token
    LAYOUT (MicroBatch.layout_cu_seqlens: with CP, documents are padded and positions
    count the padded layout).

    query_mask: bool [T_layout], the measured query rows.
    key_segments: int [T_layout], segment id of each key token, -1 = in no segment; ids
        are 0..num_segments-1 over the micro-batch and a segment lies in one document.
    layers: megatron layer numbers (1-based, global over pipeline stages); None = all.
    """

    query_mask: np.ndarray
    key_segments: np.ndarray
    num_segments: int
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        mask, segments = np.asarray(self.query_mask), np.asarray(self.key_segments)
        if mask.ndim != 1 or mask.dtype != np.bool_:
            raise ValueError(
                f"ProbeRequest.query_mask must be a 1-D bool array, got {mask.dtype} {mask.shape}"
            )
        if segments.ndim != 1 or not np.issubdtype(segments.dtype, np.integer):
            raise ValueError(
                "ProbeRequest.key_segments must be a 1-D integer array, got "
                f"{segments.dtype} {segments.shape}"
            )
        if mask.size != segments.size:
            raise ValueError(
                f"ProbeRequest.query_mask has {mask.size} entries but key_segments has "
                f"{segments.size}: both index the micro-batch's token layout"
            )
        if self.num_segments < 0:
            raise ValueError(f"ProbeRequest.num_segments is {self.num_segments}, must be >= 0")
        if segments.size and (segments.min() < -1 or segments.max() >= self.num_segments):
            raise ValueError(
                f"ProbeRequest.key_segments holds ids in [{segments.min()}, {segments.max()}]; "
                f"allowed: -1 (no segment) and 0..{self.num_segments - 1}"
            )
        if self.layers is not None and any(int(n) < 1 for n in self.layers):
            raise ValueError(f"ProbeRequest.layers are 1-based layer numbers, got {self.layers}")
        object.__setattr__(self, "query_mask", mask)
        object.__setattr__(self, "key_segments", segments.astype(np.int64))


@dataclass(frozen=True)
class _RowBlock:
    """Measured rows of one document, at most query_chunk of them, and the keys they see."""

    rows: Tensor  # [R] local row index into q
    positions: Tensor  # [R] global (layout) position of each row
    key_start: int  # the document's first token
    key_end: int  # one past the block's last query position (causal limit of the block)


@dataclass(frozen=True)
class _MicroBatchPlan:
    """Host-side work list for one micro-batch (the same for every layer)."""

    blocks: list[_RowBlock]
    key_bins: Tensor  # [T] segment id per key, -1 mapped to num_segments (a discard bin)
    segment_prefix: np.ndarray  # [T + 1] count of segment keys before each position
    rows_per_segment: np.ndarray  # float64 [S]: measured local rows of the segment's document


def chunk_scores(
    q: Tensor, k: Tensor, positions: Tensor, key_start: int, key_end: int, scale: float
) -> Tensor:
    """Scaled scores of rows q [R, Hkv, G, D] (fp32, query head h = kv head h // G, head
    h % G in its group) against keys k [key_start, key_end) of k [T, Hkv, D]:
    [R, Hkv, G, C], -inf where the key comes after the row's position (causal)."""
    keys = k[key_start:key_end].float()
    scores = torch.einsum("rkgd,ckd->rkgc", q, keys) * scale
    key_positions = torch.arange(key_start, key_end, device=q.device)
    future = key_positions[None, :] > positions[:, None]  # [R, C]
    return scores.masked_fill(future[:, None, None, :], float("-inf"))


class AttentionProbe:
    """Accumulates, over the forward passes it is attached to, the attention mass of the
    request's query rows on each key segment. See the module docstring."""

    def __init__(self, request: ProbeRequest, key_chunk: int = 4096, query_chunk: int = 256):
        if key_chunk < 1 or query_chunk < 1:
            raise ValueError(
                f"key_chunk ({key_chunk}) and query_chunk ({query_chunk}) must be >= 1"
            )
        self.request = request
        self.key_chunk = key_chunk
        self.query_chunk = query_chunk
        self._layers = None if request.layers is None else frozenset(int(n) for n in request.layers)
        self._numerators: Tensor | None = None  # float64 [S + 1], on the attention's device
        self._counts = np.zeros(request.num_segments, dtype=np.float64)
        self._plan_key: tuple | None = None
        self._plan_queries: Tensor | None = None
        self._plan: _MicroBatchPlan | None = None

    def observe(
        self,
        layer_number: int,
        q: Tensor,
        k: Tensor,
        softmax_scale: float,
        layout: Sequence[int],
        query_index: Tensor | None = None,
    ) -> None:
        """Called by a core-attention module: post-RoPE q [T_local, H, D], k [T, Hkv, D]
        in global order, its layer number and softmax scale, the (padded) document
        boundaries, and the local queries' global positions (None: all, in order)."""
        if self._layers is not None and layer_number not in self._layers:
            return
        heads, kv_heads = q.size(1), k.size(1)
        if heads % kv_heads:
            raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} KV heads")
        plan = self._plan_for(layout, q.size(0), query_index, q.device)
        if self._numerators is None:
            self._numerators = torch.zeros(
                self.request.num_segments + 1, dtype=torch.float64, device=q.device
            )
        with torch.no_grad():
            for block in plan.blocks:
                rows = q.index_select(0, block.rows).float()
                grouped = rows.reshape(rows.size(0), kv_heads, heads // kv_heads, rows.size(-1))
                self._accumulate(grouped, k, block, plan, softmax_scale)
        self._counts += plan.rows_per_segment * heads

    def _accumulate(
        self, q: Tensor, k: Tensor, block: _RowBlock, plan: _MicroBatchPlan, scale: float
    ) -> None:
        """Both passes for one row block: log-sum-exp over every visible key, then the
        softmax mass of the chunks holding segment keys, summed per segment."""
        chunks = [
            (start, min(start + self.key_chunk, block.key_end))
            for start in range(block.key_start, block.key_end, self.key_chunk)
        ]
        lse = q.new_full(q.shape[:-1], float("-inf"))
        for start, end in chunks:
            scores = chunk_scores(q, k, block.positions, start, end, scale)
            lse = torch.logaddexp(lse, torch.logsumexp(scores, dim=-1))
        for start, end in chunks:
            if plan.segment_prefix[end] == plan.segment_prefix[start]:
                continue  # no segment key here: nothing to add
            scores = chunk_scores(q, k, block.positions, start, end, scale)
            mass = torch.exp(scores - lse[..., None]).sum(dim=(0, 1, 2), dtype=torch.float64)
            self._numerators.index_add_(0, plan.key_bins[start:end], mass)

    def _plan_for(
        self, layout: Sequence[int], num_local: int, query_index: Tensor | None, device
    ) -> _MicroBatchPlan:
        """The micro-batch's plan, built on the first layer and reused by the others."""
        # Under CP the view's query_index is one tensor per micro-batch, shared by all
        # layers: compared by identity (the key holds it, so its id is not reused).
        key = (tuple(int(b) for b in layout), num_local, str(device))
        if key != self._plan_key or query_index is not self._plan_queries:
            positions = (
                np.arange(num_local)
                if query_index is None
                else query_index.detach().cpu().numpy().astype(np.int64)
            )
            self._plan = _build_plan(
                self.request,
                np.asarray(key[0], dtype=np.int64),
                positions,
                device,
                self.query_chunk,
            )
            self._plan_key, self._plan_queries = key, query_index
        return self._plan

    def result(self, groups: Sequence[Any] = ()) -> np.ndarray:
        """float64 [num_segments]: for segment s of document d, the mean over (measured
        layers, all heads, measured query rows of d) of the softmax mass on s's keys at
        or before the row (0 for keys after it). NaN for a segment whose document has no
        measured row, or that holds no key token. `groups`: process groups over which
        numerators and counts are summed first (TP, CP, PP); same result on every rank."""
        size = self.request.num_segments
        device = self._numerators.device if self._numerators is not None else _group_device(groups)
        totals = torch.zeros(2, size, dtype=torch.float64, device=device)
        if self._numerators is not None:
            totals[0] = self._numerators[:size]
        totals[1] = torch.as_tensor(self._counts, device=device)
        for group in groups:
            torch.distributed.all_reduce(totals, group=group)
        numerators, counts = totals.cpu().numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(counts > 0, numerators / np.where(counts > 0, counts, 1), np.nan)


def _build_plan(
    request: ProbeRequest, layout: np.ndarray, positions: np.ndarray, device, query_chunk: int
) -> _MicroBatchPlan:
    total = int(layout[-1])
    if request.query_mask.size != total:
        raise ValueError(
            f"ProbeRequest.query_mask and key_segments have {request.query_mask.size} entries "
            f"but the micro-batch's token layout has {total} tokens (layout_cu_seqlens[-1])"
        )
    document_of = np.repeat(np.arange(layout.size - 1), np.diff(layout))
    segment_document = _segment_documents(request, document_of)
    rows = np.flatnonzero(request.query_mask[positions])  # measured local rows, increasing
    row_documents = document_of[positions[rows]]
    rows_per_document = np.bincount(row_documents, minlength=layout.size - 1)
    rows_per_segment = np.where(
        segment_document >= 0, rows_per_document[np.maximum(segment_document, 0)], 0
    ).astype(np.float64)
    with_segments = set(segment_document[segment_document >= 0].tolist())
    blocks = []
    for document in sorted(set(row_documents.tolist()) & with_segments):
        doc_rows = rows[row_documents == document]
        for lo in range(0, doc_rows.size, query_chunk):
            chunk = doc_rows[lo : lo + query_chunk]
            blocks.append(
                _RowBlock(
                    rows=torch.as_tensor(chunk, device=device),
                    positions=torch.as_tensor(positions[chunk], device=device),
                    key_start=int(layout[document]),
                    key_end=int(positions[chunk[-1]]) + 1,  # positions increase within a rank
                )
            )
    segments = request.key_segments
    bins = np.where(segments >= 0, segments, request.num_segments)
    prefix = np.concatenate([[0], np.cumsum(segments >= 0)])
    return _MicroBatchPlan(blocks, torch.as_tensor(bins, device=device), prefix, rows_per_segment)


def _segment_documents(request: ProbeRequest, document_of: np.ndarray) -> np.ndarray:
    """[S] document of each segment (-1: the segment has no key); raises if one spans two."""
    segments = request.key_segments
    inside = segments >= 0
    ids, documents = segments[inside], document_of[inside]
    first = np.full(request.num_segments, np.iinfo(np.int64).max)
    last = np.full(request.num_segments, -1)
    np.minimum.at(first, ids, documents)
    np.maximum.at(last, ids, documents)
    spanning = np.flatnonzero((last >= 0) & (first != last))
    if spanning.size:
        s = int(spanning[0])
        raise ValueError(
            f"ProbeRequest.key_segments: segment {s} spans documents {int(first[s])} to "
            f"{int(last[s])}; a segment must lie in one document"
        )
    return last


def _group_device(groups: Sequence[Any]) -> torch.device:
    """Where to all-reduce when this rank observed nothing: NCCL needs a CUDA tensor."""
    for group in groups:
        if torch.distributed.get_backend(group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextmanager
def attach_probe(
    model_chunks: list[torch.nn.Module], probe: AttentionProbe
) -> Iterator[AttentionProbe]:
    """Make every core-attention module of these chunks (sdpa, flex, flash) report to
    `probe` during the forward passes inside the block. Raises for a model whose core
    attention cannot report q and k (the `te` backend). Detached on exit, even on error."""
    modules = _core_attention_modules(model_chunks)
    attached: list[_PackedCoreAttention] = []
    try:
        for module in modules:
            if module.probe is not None:
                raise RuntimeError(
                    f"layer {module.layer_number}'s core attention already reports to a probe"
                )
            module.probe = probe
            attached.append(module)
        yield probe
    finally:
        for module in attached:
            module.probe = None


def _core_attention_modules(model_chunks: list[torch.nn.Module]) -> list[_PackedCoreAttention]:
    """Our core-attention modules in the chunks (or given bare); raises for a megatron
    attention layer whose core attention is another class (TE's)."""
    from megatron.core.transformer.attention import Attention

    found = []
    for chunk in model_chunks:
        for module in chunk.modules():
            if isinstance(module, _PackedCoreAttention):
                found.append(module)
            elif isinstance(module, Attention) and not isinstance(
                module.core_attention, _PackedCoreAttention
            ):
                raise TypeError(
                    f"attach_probe: layer {module.layer_number}'s core attention is "
                    f"{type(module.core_attention).__name__}, which does not hand over q and k; "
                    "the attention probe needs model.attention_backend sdpa, flex or flash "
                    "(the 'te' backend's attention is not supported)"
                )
    if not found:
        raise ValueError("attach_probe: no attention layer in the model chunks given")
    return found
