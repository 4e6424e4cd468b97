"""A CPU stand-in for flash-attn's `flash_attn_varlen_func`, for tests only.

flash-attn needs CUDA and is not installed on the CPU test machines, so without this the
`flash` backend's plumbing (cu_seqlens, max_seqlen, GQA, scale, the context-parallel
chunk sequences) would never run in CI. This is a plain reference of the documented
semantics (flash-attn 2.x docstring of `flash_attn_varlen_func`), written for being
obviously right, not fast: one explicit masked softmax per sequence, in fp32.

- q [total_q, H, D], k/v [total_k, Hkv, D]; sequence b is q[cu_seqlens_q[b]:
  cu_seqlens_q[b + 1]] against k/v[cu_seqlens_k[b]:cu_seqlens_k[b + 1]] (int32, [B + 1]).
- GQA/MQA: query head h uses K/V head h // (H / Hkv).
- softmax_scale defaults to 1 / sqrt(D).
- causal=True aligns the mask to the BOTTOM-RIGHT corner: with Lq queries and Lk keys,
  query i sees keys j <= i + Lk - Lq. A query row that sees no key outputs 0.
- dropout_p drops attention probabilities (scaled by 1 / (1 - p)), as flash-attn does.

Where the real kernel would silently compute something else, the stand-in raises
instead: a sequence longer than max_seqlen_q / max_seqlen_k (the kernel sizes its grid
and key loop by them, so longer sequences are cut short), cu_seqlens that are not int32,
do not start at 0, decrease, or run past the tokens given. Query rows past
cu_seqlens_q[-1], which the kernel leaves unwritten (torch.empty), come back as NaN so
that reading them shows.

One deliberate difference: flash-attn accepts fp16/bf16 only; the stand-in also takes
fp32, so that CPU tests can compare backends at fp32 precision.

`installed()` puts it behind the same import seam as the real package
(`megatron_longalign.model.backends`): a module named `flash_attn` in sys.modules, the
import cache cleared, and flash's CUDA requirement lifted, all undone on exit. The
`flash_standin` fixture (tests/model/conftest.py) and the torchrun worker
tests/parallel/workers/context_parallel.py (`--backend flash`) use it.
"""

from __future__ import annotations

import contextlib
import math
import sys
import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def flash_attn_varlen_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: Tensor | None = None,
) -> Tensor:
    """flash-attn's varlen attention, computed per sequence in fp32. Returns
    [total_q, H, D] in q's dtype."""
    if window_size != (-1, -1) or softcap or alibi_slopes is not None:
        raise NotImplementedError("stand-in: no sliding window, softcap or ALiBi")
    if return_attn_probs or block_table is not None:
        raise NotImplementedError("stand-in: no return_attn_probs or paged KV (block_table)")
    _check_tensors(q, k, v)
    bounds_q = _bounds(cu_seqlens_q, "cu_seqlens_q", q)
    bounds_k = _bounds(cu_seqlens_k, "cu_seqlens_k", k)
    if len(bounds_q) != len(bounds_k):
        raise ValueError("cu_seqlens_q and cu_seqlens_k must describe the same batch size")
    _check_max_seqlen(bounds_q, max_seqlen_q, "max_seqlen_q")
    _check_max_seqlen(bounds_k, max_seqlen_k, "max_seqlen_k")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    scale = 1.0 / math.sqrt(q.size(-1)) if softmax_scale is None else softmax_scale
    # Query head h reads K/V head h // group.
    kv_head = torch.arange(q.size(1), device=q.device) // (q.size(1) // k.size(1))
    pieces = []
    for b in range(len(bounds_q) - 1):
        (qs, qe), (ks, ke) = bounds_q[b : b + 2], bounds_k[b : b + 2]
        if qe > qs:
            pieces.append(
                _one_sequence(
                    q[qs:qe], k[ks:ke, kv_head], v[ks:ke, kv_head], scale, causal, dropout_p
                )
            )
    unwritten = q.size(0) - bounds_q[-1]
    pieces.append(q.new_full((unwritten, *q.shape[1:]), float("nan")))
    return torch.cat(pieces, dim=0)


def _one_sequence(
    q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool, dropout_p: float
) -> Tensor:
    """q [Lq, H, D], k/v [Lk, H, D] (KV heads already mapped to query heads)."""
    num_q, num_k = q.size(0), k.size(0)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    i = torch.arange(num_q, device=q.device)[:, None]
    j = torch.arange(num_k, device=q.device)[None, :]
    # Bottom-right: the last query sits at the last key, whatever Lq and Lk are.
    if causal:
        allowed = j <= i + (num_k - num_q)
    else:
        allowed = torch.ones(num_q, num_k, dtype=torch.bool, device=q.device)
    sees_a_key = allowed.any(dim=-1, keepdim=True)  # [Lq, 1]
    scores = scores.masked_fill(~allowed, float("-inf"))
    # Rows without any key would be softmax(all -inf) = NaN: give them finite scores,
    # then zero their probabilities, so their output (and gradient) is exactly 0.
    scores = scores.masked_fill(~sees_a_key, 0.0)
    probs = scores.softmax(dim=-1) * sees_a_key
    if dropout_p:
        probs = F.dropout(probs, p=dropout_p, training=True)
    return torch.einsum("hqk,khd->qhd", probs, v.float()).to(q.dtype)


def _check_tensors(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape:
        raise ValueError(
            f"expected q [total_q, H, D] and k, v [total_k, Hkv, D]; got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.size(-1) != k.size(-1):
        raise ValueError("q and k must have the same head dimension")
    if q.size(1) % k.size(1):
        raise ValueError(
            f"number of query heads ({q.size(1)}) must be divisible by K/V heads ({k.size(1)})"
        )
    if q.dtype not in _DTYPES or not q.dtype == k.dtype == v.dtype:
        raise ValueError(
            f"q, k, v must share one of {_DTYPES}; got {q.dtype}, {k.dtype}, {v.dtype}"
        )


def _bounds(cu_seqlens: Tensor, name: str, tokens: Tensor) -> list[int]:
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{name} must be a 1-D int32 tensor [B + 1], got {cu_seqlens!r}")
    if cu_seqlens.device != tokens.device:
        raise ValueError(f"{name} is on {cu_seqlens.device}, the tokens on {tokens.device}")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or any(b > a for a, b in zip(bounds[1:], bounds[:-1], strict=True)):
        raise ValueError(f"{name} must start at 0 and never decrease: {bounds}")
    if bounds[-1] > tokens.size(0):
        raise ValueError(f"{name} ends at {bounds[-1]} but only {tokens.size(0)} tokens are given")
    return bounds


def _check_max_seqlen(bounds: list[int], max_seqlen: int, name: str) -> None:
    longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True))
    if int(max_seqlen) < longest:
        raise ValueError(
            f"{name}={max_seqlen} but a sequence has {longest} tokens: flash-attn would "
            "silently skip the tokens past max_seqlen"
        )


@contextlib.contextmanager
def installed() -> Iterator[types.ModuleType]:
    """The stand-in as the importable package `flash_attn`, usable without CUDA, for the
    duration of the block; everything is restored (and the import cache cleared) after."""
    from megatron_longalign.model import backends

    module = types.ModuleType("flash_attn")
    module.__doc__ = "CPU stand-in (tests/helpers/flash_standin.py)"
    module.flash_attn_varlen_func = flash_attn_varlen_func
    missing = object()
    previous_module = sys.modules.get("flash_attn", missing)
    previous_needs_cuda = backends._NEEDS_CUDA
    sys.modules["flash_attn"] = module
    backends._NEEDS_CUDA = tuple(name for name in previous_needs_cuda if name != "flash")
    backends._try_import.cache_clear()
    try:
        yield module
    finally:
        backends._NEEDS_CUDA = previous_needs_cuda
        if previous_module is missing:
            sys.modules.pop("flash_attn", None)
        else:
            sys.modules["flash_attn"] = previous_module
        backends._try_import.cache_clear()
