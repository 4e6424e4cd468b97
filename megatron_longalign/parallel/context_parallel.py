"""Context-parallel (CP) layout: which tokens of a packed micro-batch each CP rank holds.
The one home of that rule; data/ (sharding a MicroBatch) and model/ (RoPE table,
attention) call it.

Transformer Engine's load-balanced THD layout (docs/CONTEXT_PARALLEL.md): every document's
padded length L_p is a multiple of 2 * CP (`document_multiple`); it is cut into 2 * CP
chunks of c = L_p / (2 * CP) tokens, and CP rank r holds chunks r and 2 * CP - 1 - r,
document after document. Causal attention cost grows along a document, so pairing an
early chunk with a late one gives every rank the same work.

The MicroBatchBuilder pads the documents (`document_multiple`);
`data.microbatch.shard_for_context_parallel` then keeps this rank's tokens
(`context_parallel_token_index`). Labels are shifted before sharding, so a chunk
boundary never separates a token from its label, and loss weights, position ids and
labels move with their tokens. Document boundaries stay global (`cu_seqlens`,
`cu_seqlens_padded`), as megatron-core and TE expect: attention needs them, every
layer's RoPE needs them.

Also here, for the attention backends other than `te` (model/attention.py): where this
rank's tokens sit in the whole micro-batch (`ContextParallelView`), and the K/V
all-gather over the CP group (`gather_context_parallel_kv`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

Index = TypeVar("Index", np.ndarray, Tensor)


def document_multiple(pad_documents_to_multiple_of: int, cp_size: int) -> int:
    """What every document is padded to a multiple of: data.pad_documents_to_multiple_of,
    and 2 x CP for context parallelism (each document is cut into 2 x CP chunks)."""
    return math.lcm(pad_documents_to_multiple_of, 2 * cp_size if cp_size > 1 else 1)


def context_parallel_token_index(cu_seqlens_padded: Index, cp_size: int, cp_rank: int) -> Index:
    """Global token indices held by `cp_rank`, in its local order (increasing).

    The same as Transformer Engine's `thd_get_partitioned_indices`: for each document
    [s, s + L), tokens [s + r*c, s + (r+1)*c) then [s + L - (r+1)*c, s + L - r*c) with
    c = L / (2 * cp_size).

    A numpy array in gives an int64 numpy array; a torch tensor in gives an int64 tensor
    on the same device (computed once, on the host, from the document boundaries)."""
    if isinstance(cu_seqlens_padded, Tensor):
        bounds = cu_seqlens_padded.detach().cpu().numpy()
        index = _token_index(bounds, cp_size, cp_rank)
        return torch.as_tensor(index, device=cu_seqlens_padded.device)
    return _token_index(cu_seqlens_padded, cp_size, cp_rank)


def local_document_bounds(layout_cu_seqlens: Index, cp_size: int) -> Index:
    """Document boundaries in one CP rank's local tokens: each rank holds 1 / CP of
    every (padded) document, its two chunks back to back."""
    return layout_cu_seqlens // cp_size


def _token_index(cu_seqlens_padded: np.ndarray, cp_size: int, cp_rank: int) -> np.ndarray:
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank {cp_rank} outside a context-parallel group of {cp_size}")
    bounds = np.asarray(cu_seqlens_padded, dtype=np.int64)
    lengths = np.diff(bounds)
    if np.any(lengths % (2 * cp_size)):
        bad = int(np.flatnonzero(lengths % (2 * cp_size))[0])
        raise ValueError(
            f"document {bad} has padded length {int(lengths[bad])}, not a multiple of "
            f"2 x CP = {2 * cp_size}; build micro-batches with document_multiple={2 * cp_size}"
        )
    chunk = lengths // (2 * cp_size)
    starts = bounds[:-1]
    first = starts + cp_rank * chunk
    second = starts + lengths - (cp_rank + 1) * chunk
    # Two runs of `chunk` tokens per document, interleaved: [first_0, second_0, first_1, ...].
    run_starts = np.stack([first, second], axis=1).reshape(-1)
    run_lengths = np.repeat(chunk, 2)
    offsets_in_run = np.arange(int(run_lengths.sum())) - np.repeat(
        np.cumsum(run_lengths) - run_lengths, run_lengths
    )
    return np.repeat(run_starts, run_lengths) + offsets_in_run


@dataclass(frozen=True)
class ContextParallelView:
    """Where this CP rank's tokens sit in the whole micro-batch, computed once per
    micro-batch from the layout (padded) document boundaries."""

    layout: list[int]  # document boundaries of the whole (padded) micro-batch
    local_bounds: list[int]  # the same boundaries in this rank's local tokens
    query_index: Tensor  # [T_local] global position of each local token, increasing
    gather_order: Tensor  # [T] for global position g, its row in the rank-ordered all-gather
    last_query_position: list[int]  # per document: global position of its last local token

    @classmethod
    def build(
        cls, layout_cu_seqlens: Tensor, cp_size: int, cp_rank: int, device: torch.device
    ) -> ContextParallelView:
        layout = layout_cu_seqlens.detach().cpu().numpy().astype(np.int64)
        per_rank = [context_parallel_token_index(layout, cp_size, r) for r in range(cp_size)]
        gathered_positions = np.concatenate(per_rank)
        local_bounds = local_document_bounds(layout, cp_size)
        # Documents hold >= 2 * CP tokens, so every rank has >= 2 of each.
        last = per_rank[cp_rank][np.maximum(local_bounds[1:] - 1, 0)]
        return cls(
            layout=layout.tolist(),
            local_bounds=local_bounds.tolist(),
            query_index=torch.as_tensor(per_rank[cp_rank], device=device),
            gather_order=torch.as_tensor(np.argsort(gathered_positions), device=device),
            last_query_position=last.tolist(),
        )


class _AllGatherFirstDim(torch.autograd.Function):
    """All-gather along dim 0 in group-rank order; backward sums every rank's gradient
    and returns this rank's rows (a reduce-scatter).

    Not torch.distributed.nn.functional.all_gather: its gloo backward (an all-to-all
    built from scatter calls) passes group ranks where global ranks are expected, so it
    fails on any subgroup not starting at global rank 0, e.g. the CP groups of TP2xCP2.
    """

    @staticmethod
    def forward(ctx, tensor: Tensor, group: Any) -> Tensor:
        ctx.group = group
        parts = [torch.empty_like(tensor) for _ in range(group.size())]
        torch.distributed.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        group = ctx.group
        rows = grad.size(0) // group.size()
        grad = grad.contiguous()
        if torch.distributed.get_backend(group) == "nccl":
            out = grad.new_empty(rows, *grad.shape[1:])
            torch.distributed.reduce_scatter_tensor(out, grad, group=group)
            return out, None
        # gloo has no reduce-scatter: all-reduce, keep this rank's rows.
        torch.distributed.all_reduce(grad, group=group)
        rank = group.rank()
        return grad[rank * rows : (rank + 1) * rows].clone(), None


def gather_context_parallel_kv(
    k: Tensor, v: Tensor, group: Any, gather_order: Tensor
) -> tuple[Tensor, Tensor]:
    """All CP ranks' keys and values, [T, kv_heads, dim] each, in global token order.
    The backward reduce-scatters the K/V gradients to their owners, so each rank's K/V
    receive every rank's queries' contributions."""
    if k.shape != v.shape:
        raise NotImplementedError("context-parallel K/V gather needs equal K and V shapes")
    kv = torch.cat([k, v], dim=-1)  # one collective for both
    full = _AllGatherFirstDim.apply(kv, group).index_select(0, gather_order)
    return full.split(k.size(-1), dim=-1)
