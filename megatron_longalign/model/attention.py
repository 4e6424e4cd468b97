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

Not supported here (use `te`): context parallelism, sliding windows, attention dropout,
non-vanilla softmax. The constructors say so instead of computing something else.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from megatron_longalign.model.backends import import_flash_attn_varlen, import_flex_attention

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


def document_causal_block_mask(cu_seqlens: Tensor, block_size: int = FLEX_BLOCK_SIZE) -> Any:
    """flex_attention `BlockMask` for causal attention within documents, built from the
    document boundaries in O((T / block)^2), without evaluating a T x T mask (which is
    what `create_block_mask` does without compile: 4 G entries at 64k).

    For query block i (tokens [i*B, min((i+1)*B, T))) and key block j:
    - some pair attends iff j <= i and block j reaches the start of the document of the
      block's first query (keys before that belong to earlier documents for every query);
    - all pairs attend ("full", mask_mod skipped) iff j < i and block j starts at or after
      the start of the document of the block's last query (then all of both blocks lie in
      one document, and every key precedes every query).
    """
    flex = import_flex_attention()
    total = int(cu_seqlens[-1])
    device = cu_seqlens.device
    num_blocks = -(-total // block_size)
    doc = document_ids(cu_seqlens)
    doc_start = cu_seqlens.long()[doc.long()]  # start token of each token's document
    q_first = torch.arange(num_blocks, device=device) * block_size
    q_last = torch.clamp(q_first + block_size, max=total) - 1
    i = torch.arange(num_blocks, device=device)[:, None]
    j = torch.arange(num_blocks, device=device)[None, :]
    key_start = j * block_size
    key_end = key_start + block_size  # exclusive; may pass T, which only matters for j == i
    any_pair = (j <= i) & (key_end > doc_start[q_first][:, None])
    full = (j < i) & (key_start >= doc_start[q_last][:, None])
    partial = any_pair & ~full

    padded_doc = document_ids(cu_seqlens, num_blocks * block_size)

    def mask_mod(b, h, q_idx, kv_idx):
        return (padded_doc[q_idx] == padded_doc[kv_idx]) & (q_idx >= kv_idx)

    return flex.BlockMask.from_kv_blocks(
        *_blocks_to_indices(partial),
        *_blocks_to_indices(full),
        BLOCK_SIZE=block_size,
        mask_mod=mask_mod,
        seq_lengths=(total, total),
    )


def _blocks_to_indices(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """[nq, nk] bool -> (counts [1, 1, nq], indices [1, 1, nq, nk]) in BlockMask's format:
    each row's selected key blocks first, in increasing order."""
    counts = blocks.sum(dim=-1, dtype=torch.int32)
    # A stable sort of "not selected" puts the selected columns first, in column order.
    order = torch.sort((~blocks).to(torch.int8), dim=-1, stable=True).indices
    return counts[None, None], order.to(torch.int32)[None, None]


# ---------------------------------------------------------------------------------------
# megatron-core core-attention modules
# ---------------------------------------------------------------------------------------


class _PackedCoreAttention(MegatronModule):
    """Shared plumbing: megatron's constructor signature, unsupported-feature checks,
    THD/bshd dispatch. Subclasses implement `_attend(q, k, v, packed)` on THD tensors."""

    backend = ""

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

    def _reject_unsupported(
        self, config: TransformerConfig, mask_type: AttnMaskType, attention_type: str, dropout
    ) -> None:
        name = f"attention backend '{self.backend}'"
        if attention_type != "self":
            raise NotImplementedError(f"{name} supports self-attention only")
        if mask_type != AttnMaskType.causal:
            raise NotImplementedError(f"{name} supports the causal mask type only, not {mask_type}")
        if config.context_parallel_size > 1:
            raise NotImplementedError(f"{name} does not support context parallelism; use 'te'")
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
            check_self_attention_thd(packed_seq_params, query.size(0))
            out = self._attend(query, key, value, packed_seq_params)
            return out.reshape(out.size(0), -1)
        if packed_seq_params is not None:
            raise NotImplementedError(f"qkv_format '{packed_seq_params.qkv_format}'")
        return self._forward_bshd(query, key, value)

    def _forward_bshd(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        """[S, B, H, D] -> [S, B, H * D] through the THD path, one document per row."""
        seq, batch = query.shape[:2]

        def to_thd(x: Tensor) -> Tensor:
            return x.transpose(0, 1).reshape(batch * seq, *x.shape[2:])

        cu = torch.arange(batch + 1, device=query.device, dtype=torch.int32) * seq
        packed = packed_seq_params_from(cu, seq)
        out = self._attend(to_thd(query), to_thd(key), to_thd(value), packed)
        return out.reshape(batch, seq, -1).transpose(0, 1)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, packed: PackedSeqParams) -> Tensor:
        raise NotImplementedError


class SDPACoreAttention(_PackedCoreAttention):
    """One `scaled_dot_product_attention(is_causal=True)` per document. Runs anywhere;
    the CPU training backend and the reference for the others."""

    backend = "sdpa"

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, packed: PackedSeqParams) -> Tensor:
        bounds = _cached(packed, "bounds", lambda: packed.cu_seqlens_q.tolist())
        return sdpa_varlen(q, k, v, bounds, self.softmax_scale)


class FlexCoreAttention(_PackedCoreAttention):
    """torch flex_attention with a document-causal BlockMask (built once per micro-batch
    and shared by all layers). Compiled on CUDA; on CPU it runs eagerly, forward only
    (torch raises NotImplementedError in backward there)."""

    backend = "flex"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        import_flex_attention()  # fail at build time, not in the first step

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, packed: PackedSeqParams) -> Tensor:
        block_mask = _cached(
            packed, "flex_block_mask", lambda: document_causal_block_mask(packed.cu_seqlens_q)
        )
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
    """flash-attn's `flash_attn_varlen_func(causal=True)` over cu_seqlens (CUDA, fp16/bf16)."""

    backend = "flash"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._varlen = import_flash_attn_varlen()

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, packed: PackedSeqParams) -> Tensor:
        max_seqlen = int(packed.max_seqlen_q)
        return self._varlen(
            q,
            k,
            v,
            cu_seqlens_q=packed.cu_seqlens_q,
            cu_seqlens_k=packed.cu_seqlens_kv,
            max_seqlen_q=max_seqlen,
            max_seqlen_k=max_seqlen,
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


def packed_seq_params_from(cu_seqlens: Tensor, max_seqlen: int) -> PackedSeqParams:
    """megatron's PackedSeqParams for self-attention over documents back to back."""
    cu_seqlens = cu_seqlens.to(torch.int32)
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        max_seqlen_q=int(max_seqlen),
        max_seqlen_kv=int(max_seqlen),
    )


def check_self_attention_thd(packed: PackedSeqParams, num_tokens: int) -> None:
    """The custom backends read cu_seqlens_q only: KV documents must be the same, with
    no CP padding, and cover exactly the tokens given. Checked once per micro-batch."""

    def check() -> bool:
        cu_q = packed.cu_seqlens_q
        same = [packed.cu_seqlens_kv, packed.cu_seqlens_q_padded, packed.cu_seqlens_kv_padded]
        for other in same:
            if other is not None and other is not cu_q and not torch.equal(other, cu_q):
                raise NotImplementedError(
                    "cu_seqlens_kv / *_padded differing from cu_seqlens_q (cross-attention "
                    "or context-parallel padding) need the 'te' backend"
                )
        if int(cu_q[-1]) != num_tokens:
            raise ValueError(f"cu_seqlens_q[-1] = {int(cu_q[-1])} but {num_tokens} tokens given")
        return True

    _cached(packed, "checked", check)


def _cached(packed: PackedSeqParams, key: str, build: Callable[[], Any]) -> Any:
    """Memoise per-micro-batch data on the PackedSeqParams object itself: every layer
    gets the same object, so host syncs and block masks happen once, not per layer."""
    name = f"_longalign_{key}"
    value = packed.__dict__.get(name)
    if value is None:
        value = build()
        packed.__dict__[name] = value
    return value


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
