"""Core-attention modules for megatron-core's `SelfAttention` (its `core_attention`
submodule), for packed THD micro-batches with per-document causal masks.

What megatron hands a core-attention module (transformer/attention.py, 0.16.1):
- packed (`packed_seq_params.qkv_format == "thd"`): megatron squeezes the dummy batch
  dimension, so query is [T, heads, dim] and key/value are [T, kv_heads, dim], with RoPE
  already applied. Documents are `cu_seqlens_q` (int32, [D + 1]). The output may be
  [T, heads * dim]: megatron reshapes it to [T, 1, heads * dim].
- not packed (bshd): [S, B, heads, dim]; the output must be [S, B, heads * dim]. Every row
  is one causal sequence (attention_mask is implied by the causal mask type and ignored,
  as in TE with `AttnMaskType.causal`), which is exactly THD with B documents of length
  S, so the same code serves both.

Query heads of group g are heads [g * r, (g + 1) * r) with r = heads / kv_heads, as in
megatron's DotProductAttention (`repeat_interleave`). SDPA repeats KV heads per document;
flex and flash take grouped KV natively with the same head mapping.

Document padding (`cu_seqlens_q_padded`, used by context parallelism): the padded
layout is used as the documents. Pad tokens sit at the end of their document, so the
real tokens' causal attention is unchanged, and pad outputs have zero loss weight.

Context parallelism (`sdpa`, `flex` and `flash`; `te` has its own): each CP rank holds
chunks r and 2*CP-1-r of every padded document (parallel/context_parallel.py). Queries
stay local; K and V are all-gathered over the CP group (an autograd all-gather whose
backward reduce-scatters the K/V gradients back to their owners) and put back in global
order. `sdpa` and `flex` mask document-causally by global position; `flash` makes every
local chunk one varlen sequence whose keys run from its document's start to the chunk's
end, so flash-attn's bottom-right causal alignment puts each query at its global
position (`flash_context_parallel_sequences`). Memory is O(T) for K/V per layer (`flash`
keeps a copy of the key ranges, (2*CP + 1) / (2*CP) x T rows), fine for the CPU tests and
for moderate lengths; `te` (ring attention) is the scalable path on GPUs.

Attention probe (model/attention_probe.py, GATEAU's attention measurement): while
`attach_probe` has set a module's `probe`, the module hands it the post-RoPE q and k
(under CP the gathered K in global order and the local queries' global positions) before
attending. Without a probe the hook is one attribute check.

Not supported here (use `te`): sliding windows, attention dropout, non-vanilla softmax.
The constructors say so instead of computing something else.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from megatron_longalign.megatron_compat import cache_on_packed_seq_params
from megatron_longalign.model.backends import import_flash_attn_varlen, import_flex_attention
from megatron_longalign.parallel.context_parallel import (
    ContextParallelView,
    context_parallel_token_index,
    gather_context_parallel_kv,
    local_document_bounds,
)

if TYPE_CHECKING:
    from megatron_longalign.model.attention_probe import AttentionProbe

FLEX_BLOCK_SIZE = 128


# ---------------------------------------------------------------------------------------
# Pure functions (also used by tests and benchmarks)
# ---------------------------------------------------------------------------------------


def repeat_kv(x: Tensor, num_heads: int) -> Tensor:
    """[T, kv_heads, dim] -> [T, num_heads, dim], each KV head serving its query group."""
    groups = num_heads // x.size(1)
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def sdpa_varlen(q: Tensor, k: Tensor, v: Tensor, bounds: list[int], scale: float) -> Tensor:
    """Causal attention per document with one SDPA call each, so memory is
    O(max L_i^2), never T x T. q: [T, H, D], k/v: [T, Hkv, D]; bounds = cu_seqlens as
    a Python list. Returns [T, H, D]."""
    outputs = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        if end == start:
            continue
        qd = q[start:end].transpose(0, 1)  # [H, L, D]: SDPA's (..., L, D) layout
        kd = repeat_kv(k[start:end], q.size(1)).transpose(0, 1)
        vd = repeat_kv(v[start:end], q.size(1)).transpose(0, 1)
        out = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=scale)
        outputs.append(out.transpose(0, 1))
    return torch.cat(outputs, dim=0)


def document_ids(cu_seqlens: Tensor, total: int | None = None) -> Tensor:
    """Document index of every token: [T] int32 (tokens past cu_seqlens[-1], if `total`
    is larger, get -1 so they match nothing real)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    ids = torch.repeat_interleave(
        torch.arange(lengths.numel(), device=cu_seqlens.device, dtype=torch.int32), lengths
    )
    if total is not None and total > ids.numel():
        pad = torch.full((total - ids.numel(),), -1, dtype=torch.int32, device=ids.device)
        ids = torch.cat([ids, pad])
    return ids


def document_causal_block_mask(
    cu_seqlens: Tensor, block_size: int = FLEX_BLOCK_SIZE, query_index: Tensor | None = None
) -> Any:
    """flex_attention `BlockMask` for causal attention within documents, built from the
    document boundaries in O(blocks_q x blocks_kv), without evaluating a Q x KV mask
    (which is what `create_block_mask` does without compile: 4 G entries at 64k).

    Keys are all T = cu_seqlens[-1] tokens. Queries are all of them too, or, with
    `query_index` (increasing global positions: a context-parallel rank's tokens), just
    those. For query block i (queries q_first..q_last, positions increasing) and key
    block j (keys [k0, k1)):
    - some pair may attend iff k0 <= q_last and k1 > start of q_first's document;
    - every pair attends ("full", mask_mod skipped) iff k1 - 1 <= q_first and k0 >= start
      of q_last's document (every key is then at or before every query, and at or after
      the start of its document).
    """
    flex = import_flex_attention()
    total = int(cu_seqlens[-1])
    device = cu_seqlens.device
    if query_index is None:
        query_index = torch.arange(total, device=device)
    query_index = query_index.to(device=device, dtype=torch.long)
    num_queries = query_index.numel()
    q_blocks = -(-num_queries // block_size)
    kv_blocks = -(-total // block_size)
    doc = document_ids(cu_seqlens)
    doc_start = cu_seqlens.long()[doc.long()]  # start token of each token's document
    block_first = torch.arange(q_blocks, device=device) * block_size
    q_first = query_index[block_first]
    q_last = query_index[torch.clamp(block_first + block_size, max=num_queries) - 1]
    key_start = (torch.arange(kv_blocks, device=device) * block_size)[None, :]
    key_end = key_start + block_size  # exclusive; may pass T
    any_pair = (key_start <= q_last[:, None]) & (key_end > doc_start[q_first][:, None])
    full = (key_end - 1 <= q_first[:, None]) & (key_start >= doc_start[q_last][:, None])
    partial = any_pair & ~full

    # Padded to whole blocks; -1 / -2 so padding matches nothing.
    query_pos = torch.full((q_blocks * block_size,), -1, dtype=torch.long, device=device)
    query_pos[:num_queries] = query_index
    query_doc = torch.full_like(query_pos, -1, dtype=torch.int32)
    query_doc[:num_queries] = doc[query_index]
    key_doc = torch.full((kv_blocks * block_size,), -2, dtype=torch.int32, device=device)
    key_doc[:total] = doc

    def mask_mod(b, h, q_idx, kv_idx):
        return (query_doc[q_idx] == key_doc[kv_idx]) & (query_pos[q_idx] >= kv_idx)

    return flex.BlockMask.from_kv_blocks(
        *_blocks_to_indices(partial),
        *_blocks_to_indices(full),
        BLOCK_SIZE=block_size,
        mask_mod=mask_mod,
        seq_lengths=(num_queries, total),
    )


def _blocks_to_indices(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """[nq, nk] bool -> (counts [1, 1, nq], indices [1, 1, nq, nk]) in BlockMask's format:
    each row's selected key blocks first, in increasing order."""
    counts = blocks.sum(dim=-1, dtype=torch.int32)
    # A stable sort of "not selected" puts the selected columns first, in column order.
    order = torch.sort((~blocks).to(torch.int8), dim=-1, stable=True).indices
    return counts[None, None], order.to(torch.int32)[None, None]


def sdpa_varlen_context_parallel(
    q: Tensor, k: Tensor, v: Tensor, view: ContextParallelView, scale: float
) -> Tensor:
    """Document-causal attention of local queries q [T_local, H, D] over all keys and
    values k/v [T, Hkv, D], one SDPA call per document: the document's local queries
    (two chunks) against its keys up to the last local query, masked by global
    position. Memory O(max L_i^2 / CP). Returns [T_local, H, D]."""
    outputs = []
    for doc in range(len(view.layout) - 1):
        lo, hi = view.local_bounds[doc], view.local_bounds[doc + 1]
        if hi == lo:
            continue
        start = view.layout[doc]
        positions = view.query_index[lo:hi] - start  # within the document
        num_keys = view.last_query_position[doc] - start + 1
        allowed = torch.arange(num_keys, device=q.device)[None, :] <= positions[:, None]
        qd = q[lo:hi].transpose(0, 1)
        kd = repeat_kv(k[start : start + num_keys], q.size(1)).transpose(0, 1)
        vd = repeat_kv(v[start : start + num_keys], q.size(1)).transpose(0, 1)
        out = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=allowed, scale=scale)
        outputs.append(out.transpose(0, 1))
    return torch.cat(outputs, dim=0)


@dataclass(frozen=True)
class FlashChunkSequences:
    """flash-attn varlen arguments for one CP rank's local queries: every local chunk
    (two per document) is one sequence, its keys the document's from its start up to the
    chunk's end."""

    cu_seqlens_q: Tensor  # [2D + 1] int32, over the local tokens (chunk after chunk)
    cu_seqlens_k: Tensor  # [2D + 1] int32, over the key rows `key_index` selects
    key_index: Tensor  # int64 global positions of each sequence's keys, back to back
    max_seqlen_q: int
    max_seqlen_k: int


def flash_context_parallel_sequences(
    layout: list[int], cp_size: int, cp_rank: int, device: torch.device
) -> FlashChunkSequences:
    """The varlen sequences for `cp_rank`'s chunks of the (padded) documents `layout`.

    A chunk of c queries ending at document position e (exclusive) gets keys [0, e) of
    its document: Lq = c, Lk = e, and flash-attn's bottom-right causal alignment lets
    query i see keys j <= i + e - c, which is exactly its own document position. Built
    on the host, once per micro-batch."""
    bounds = np.asarray(layout, dtype=np.int64)
    held = context_parallel_token_index(bounds, cp_size, cp_rank)  # global positions
    chunk = np.diff(local_document_bounds(bounds, cp_size)) // 2
    q_lengths = np.repeat(chunk, 2)  # chunk r, then chunk 2 * CP - 1 - r, per document
    cu_q = np.concatenate([[0], np.cumsum(q_lengths)])
    key_starts = np.repeat(bounds[:-1], 2)
    last = held[np.maximum(cu_q[1:] - 1, 0)] if held.size else np.zeros_like(q_lengths)
    k_lengths = np.where(q_lengths > 0, last + 1 - key_starts, 0)
    cu_k = np.concatenate([[0], np.cumsum(k_lengths)])
    offsets = np.arange(int(cu_k[-1])) - np.repeat(cu_k[:-1], k_lengths)
    key_index = np.repeat(key_starts, k_lengths) + offsets

    def int32(array: np.ndarray) -> Tensor:
        return torch.as_tensor(array, dtype=torch.int32, device=device)

    return FlashChunkSequences(
        cu_seqlens_q=int32(cu_q),
        cu_seqlens_k=int32(cu_k),
        key_index=torch.as_tensor(key_index, dtype=torch.long, device=device),
        max_seqlen_q=int(q_lengths.max(initial=0)),
        max_seqlen_k=int(k_lengths.max(initial=0)),
    )


# ---------------------------------------------------------------------------------------
# megatron-core core-attention modules
# ---------------------------------------------------------------------------------------


class _PackedCoreAttention(MegatronModule):
    """Shared plumbing: megatron's constructor signature, unsupported-feature checks,
    THD/bshd dispatch. Subclasses implement `_attend(q, k, v, packed)` on THD tensors."""

    backend = ""
    supports_context_parallel = True
    # Set by attention_probe.attach_probe (GATEAU's attention measurement); None in
    # training, where the hook costs one attribute check per layer.
    probe: AttentionProbe | None = None

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: Any = None,
    ) -> None:
        super().__init__(config=config)
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1 / math.sqrt(head_dim)
        self._reject_unsupported(config, attn_mask_type, attention_type, dropout)
        self.cp_size = config.context_parallel_size
        self.cp_group = _context_parallel_group(pg_collection) if self.cp_size > 1 else None

    def _reject_unsupported(
        self, config: TransformerConfig, mask_type: AttnMaskType, attention_type: str, dropout
    ) -> None:
        name = f"attention backend '{self.backend}'"
        if attention_type != "self":
            raise NotImplementedError(f"{name} supports self-attention only")
        if mask_type != AttnMaskType.causal:
            raise NotImplementedError(f"{name} supports the causal mask type only, not {mask_type}")
        if config.context_parallel_size > 1 and not self.supports_context_parallel:
            raise NotImplementedError(
                f"{name} does not support context parallelism; use 'te', 'flash', 'flex' or 'sdpa'"
            )
        if dropout:
            raise NotImplementedError(f"{name} has no attention dropout; set it to 0")
        if config.window_size is not None:
            raise NotImplementedError(f"{name} has no sliding-window attention")
        if config.softmax_type != "vanilla":
            raise NotImplementedError(f"{name} supports softmax_type 'vanilla' only")

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> Tensor:
        if attention_bias is not None:
            raise NotImplementedError(f"attention backend '{self.backend}' has no attention bias")
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            check_self_attention_thd(packed_seq_params, query.size(0), self.cp_size)
            if self.cp_size > 1:
                out = self._attend_context_parallel(query, key, value, packed_seq_params)
            else:
                if self.probe is not None:
                    bounds = layout_bounds(packed_seq_params)
                    self.probe.observe(self.layer_number, query, key, self.softmax_scale, bounds)
                out = self._attend(query, key, value, packed_seq_params)
            return out.reshape(out.size(0), -1)
        if packed_seq_params is not None:
            raise NotImplementedError(f"qkv_format '{packed_seq_params.qkv_format}'")
        if self.cp_size > 1:
            raise NotImplementedError(
                f"attention backend '{self.backend}' supports context parallelism for packed "
                "(THD) micro-batches only"
            )
        return self._forward_bshd(query, key, value)

    def _forward_bshd(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        """[S, B, H, D] -> [S, B, H * D] through the THD path, one document per row."""
        seq, batch = query.shape[:2]

        def to_thd(x: Tensor) -> Tensor:
            return x.transpose(0, 1).reshape(batch * seq, *x.shape[2:])

        cu = torch.arange(batch + 1, device=query.device, dtype=torch.int32) * seq
        packed = packed_seq_params_from(cu, seq)
        query, key, value = to_thd(query), to_thd(key), to_thd(value)
        if self.probe is not None:
            self.probe.observe(self.layer_number, query, key, self.softmax_scale, cu.tolist())
        out = self._attend(query, key, value, packed)
        return out.reshape(batch, seq, -1).transpose(0, 1)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, packed: PackedSeqParams) -> Tensor:
        raise NotImplementedError

    def _attend_context_parallel(
        self, q: Tensor, k: Tensor, v: Tensor, packed: PackedSeqParams
    ) -> Tensor:
        """Local queries against the CP group's gathered keys and values."""
        view = cache_on_packed_seq_params(
            packed,
            "cp_view",
            lambda: ContextParallelView.build(
                layout_cu_seqlens(packed), self.cp_size, self.cp_group.rank(), q.device
            ),
        )
        k_full, v_full = gather_context_parallel_kv(k, v, self.cp_group, view.gather_order)
        if self.probe is not None:
            self.probe.observe(
                self.layer_number, q, k_full, self.softmax_scale, view.layout, view.query_index
            )
        return self._attend_gathered(q, k_full, v_full, view, packed)

    def _attend_gathered(
        self, q: Tensor, k: Tensor, v: Tensor, view: ContextParallelView, packed: PackedSeqParams
    ) -> Tensor:
        raise NotImplementedError


class SDPACoreAttention(_PackedCoreAttention):
    """One `scaled_dot_product_attention(is_causal=True)` per document. Runs anywhere;
    the CPU training backend and the reference for the others."""

    backend = "sdpa"

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, packed: PackedSeqParams) -> Tensor:
        return sdpa_varlen(q, k, v, layout_bounds(packed), self.softmax_scale)

    def _attend_gathered(
        self, q: Tensor, k: Tensor, v: Tensor, view: ContextParallelView, packed: PackedSeqParams
    ) -> Tensor:
        return sdpa_varlen_context_parallel(q, k, v, view, self.softmax_scale)


class FlexCoreAttention(_PackedCoreAttention):
    """torch flex_attention with a document-causal BlockMask (built once per micro-batch
    and shared by all layers). Compiled on CUDA; on CPU it runs eagerly, forward only
    (torch raises NotImplementedError in backward there)."""

    backend = "flex"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        import_flex_attention()  # fail at build time, not in the first step

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, packed: PackedSeqParams) -> Tensor:
        block_mask = cache_on_packed_seq_params(
            packed, "flex_block_mask", lambda: document_causal_block_mask(layout_cu_seqlens(packed))
        )
        return self._flex(q, k, v, block_mask)

    def _attend_gathered(
        self, q: Tensor, k: Tensor, v: Tensor, view: ContextParallelView, packed: PackedSeqParams
    ) -> Tensor:
        block_mask = cache_on_packed_seq_params(
            packed,
            "cp_flex_block_mask",
            lambda: document_causal_block_mask(
                layout_cu_seqlens(packed).to(q.device), query_index=view.query_index
            ),
        )
        return self._flex(q, k, v, block_mask)

    def _flex(self, q: Tensor, k: Tensor, v: Tensor, block_mask: Any) -> Tensor:
        out = _flex_fn(q.is_cuda)(
            q.transpose(0, 1)[None],  # [1, H, T, D]
            k.transpose(0, 1)[None],
            v.transpose(0, 1)[None],
            block_mask=block_mask,
            scale=self.softmax_scale,
            enable_gqa=q.size(1) != k.size(1),
        )
        return out[0].transpose(0, 1)


class FlashCoreAttention(_PackedCoreAttention):
    """flash-attn's `flash_attn_varlen_func(causal=True)` over cu_seqlens (CUDA, fp16/bf16).
    With context parallelism, each local chunk is one varlen sequence over its
    document's gathered keys (`flash_context_parallel_sequences`)."""

    backend = "flash"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._varlen = import_flash_attn_varlen()

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, packed: PackedSeqParams) -> Tensor:
        # max_seqlen_q is of the layout (padded) documents, as megatron and TE expect.
        max_seqlen = int(packed.max_seqlen_q)
        documents = layout_cu_seqlens(packed)
        return self._varlen(
            q,
            k,
            v,
            cu_seqlens_q=documents,
            cu_seqlens_k=documents,
            max_seqlen_q=max_seqlen,
            max_seqlen_k=max_seqlen,
            dropout_p=0.0,
            softmax_scale=self.softmax_scale,
            causal=True,
        )

    def _attend_gathered(
        self, q: Tensor, k: Tensor, v: Tensor, view: ContextParallelView, packed: PackedSeqParams
    ) -> Tensor:
        sequences = cache_on_packed_seq_params(
            packed,
            "cp_flash_sequences",
            lambda: flash_context_parallel_sequences(
                view.layout, self.cp_size, self.cp_group.rank(), q.device
            ),
        )
        # Memory: flash-attn reads each sequence's keys as one contiguous run, and a
        # document's two chunks need overlapping prefixes of its keys, so the ranges are
        # copied. Chunks r and 2*CP-1-r take (r + 1) + (2*CP - r) chunks of keys, i.e.
        # (2*CP + 1) / (2*CP) of every document: 1.25 T rows of K and of V at CP 2 (1.125 T
        # at CP 4), next to the gathered T rows while the copy is made. Only the copies are
        # kept for the backward (index_select's backward needs just the index), so the
        # saved K/V is 1.25x sdpa's at CP 2 and the transient peak 2.25x.
        return self._varlen(
            q,
            k.index_select(0, sequences.key_index),
            v.index_select(0, sequences.key_index),
            cu_seqlens_q=sequences.cu_seqlens_q,
            cu_seqlens_k=sequences.cu_seqlens_k,
            max_seqlen_q=sequences.max_seqlen_q,
            max_seqlen_k=sequences.max_seqlen_k,
            dropout_p=0.0,
            softmax_scale=self.softmax_scale,
            causal=True,
        )


CORE_ATTENTION_MODULES: dict[str, type[_PackedCoreAttention]] = {
    "sdpa": SDPACoreAttention,
    "flex": FlexCoreAttention,
    "flash": FlashCoreAttention,
}


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def packed_seq_params_from(
    cu_seqlens: Tensor, max_seqlen: int, cu_seqlens_padded: Tensor | None = None
) -> PackedSeqParams:
    """megatron's PackedSeqParams for self-attention over documents back to back.
    With `cu_seqlens_padded` (context parallelism), `cu_seqlens` counts real lengths and
    the padded boundaries give the token layout, as megatron-core and TE expect."""
    cu_seqlens = cu_seqlens.to(torch.int32)
    if cu_seqlens_padded is not None:
        cu_seqlens_padded = cu_seqlens_padded.to(torch.int32)
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        cu_seqlens_q_padded=cu_seqlens_padded,
        cu_seqlens_kv_padded=cu_seqlens_padded,
        max_seqlen_q=int(max_seqlen),
        max_seqlen_kv=int(max_seqlen),
    )


def layout_cu_seqlens(packed: PackedSeqParams) -> Tensor:
    """The documents as laid out in the tokens: the padded boundaries when given. Pad
    tokens follow their document's real tokens, so attending within padded documents
    leaves the real tokens' causal attention unchanged."""
    padded = packed.cu_seqlens_q_padded
    return packed.cu_seqlens_q if padded is None else padded


def layout_bounds(packed: PackedSeqParams) -> list[int]:
    """`layout_cu_seqlens` as a Python list, synced to the host once per micro-batch."""
    return cache_on_packed_seq_params(packed, "bounds", lambda: layout_cu_seqlens(packed).tolist())


def check_self_attention_thd(packed: PackedSeqParams, num_tokens: int, cp_size: int = 1) -> None:
    """The custom backends are self-attention: KV documents must equal the query
    documents, and the layout must cover exactly the tokens given (x CP, each rank
    holding 1 / CP). Checked once per micro-batch."""

    def check() -> bool:
        pairs = [
            (packed.cu_seqlens_kv, packed.cu_seqlens_q),
            (packed.cu_seqlens_kv_padded, packed.cu_seqlens_q_padded),
        ]
        for kv, q in pairs:
            if kv is not None and kv is not q and (q is None or not torch.equal(kv, q)):
                raise NotImplementedError(
                    "cu_seqlens_kv differing from cu_seqlens_q (cross-attention) needs the "
                    "'te' backend"
                )
        layout = layout_cu_seqlens(packed)
        if int(layout[-1]) != num_tokens * cp_size:
            held = f"{num_tokens} tokens x CP {cp_size}" if cp_size > 1 else f"{num_tokens} tokens"
            raise ValueError(f"the documents end at {int(layout[-1])} but {held} are given")
        padded = packed.cu_seqlens_q_padded
        if padded is not None:
            real = packed.cu_seqlens_q
            if padded.numel() != real.numel() or bool(
                ((padded[1:] - padded[:-1]) < (real[1:] - real[:-1])).any()
            ):
                raise ValueError("cu_seqlens_q_padded must pad each document of cu_seqlens_q")
        return True

    cache_on_packed_seq_params(packed, "checked", check)


def _context_parallel_group(pg_collection: Any) -> Any:
    group = getattr(pg_collection, "cp", None)
    if group is None:
        from megatron.core import parallel_state

        group = parallel_state.get_context_parallel_group()
    return group


_COMPILED_FLEX: Callable | None = None


def _flex_fn(on_cuda: bool) -> Callable:
    """Compiled flex_attention on CUDA (the eager version materialises T x T scores);
    eager on CPU, where it only serves forward tests."""
    global _COMPILED_FLEX
    flex = import_flex_attention().flex_attention
    if not on_cuda:
        return flex
    if _COMPILED_FLEX is None:
        # dynamic=None: recompiles once, then treats the varying pack length as dynamic.
        _COMPILED_FLEX = torch.compile(flex)
    return _COMPILED_FLEX
