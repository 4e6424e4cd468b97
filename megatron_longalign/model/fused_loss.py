"""Chunked, vocabulary-parallel fused linear cross entropy: per-token NLL from the last
hidden states and the output weight, without ever holding the logits of the whole
micro-batch.

    nll = chunked_linear_cross_entropy(hidden [N, H], weight [V/TP, H], labels [N], ...)

The output layer's matmul and the cross entropy run together over chunks of
`chunk_tokens` tokens:
- forward: a chunk's logits (h_c W^T, on this TP rank's vocabulary shard), their
  log-sum-exp over the whole vocabulary (max and sum of exp all-reduced over the TP group,
  accumulated in fp32 whatever the logits' dtype), and the target logit from the rank that
  owns the label (summed over TP). Only the per-token LSE [N] (fp32) is kept;
- backward: the chunk's logits are computed again, and the softmax minus the one-hot
  target, times the per-token upstream gradient, gives the gradient of the hidden states
  (this rank's vocabulary share; the caller's TP mapping all-reduces it) and of the weight
  shard (accumulated over chunks in fp32).

Recompute rather than gradients in forward (as Liger does): the model returns per-token
NLL (the loss weights need it), so the upstream gradient of each token is only known in
backward; gradients in forward would need the loss weights inside the model, and would
hold the hidden-state and weight gradients (fp32) from forward to backward. The cost is
one more chunk matmul per chunk: docs/PERFORMANCE.md ("Output layer and loss") has the
measurements.

Padded vocabulary columns (megatron pads to make_vocab_size_divisible_by x TP) are left
out by slicing the weight shard (a view): they are never computed, so they take no part in
the softmax and get a zero gradient, as in the standard path's -inf mask.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

# fp32 logits of one chunk, on one TP rank, that `auto_chunk_tokens` aims for.
AUTO_CHUNK_BYTES = 256 * 2**20
AUTO_CHUNK_MULTIPLE = 256
# Fewest tokens per automatic chunk on a GPU. Each chunk adds its bf16 weight-gradient
# block into the fp32 accumulator, a read and write of V x h fp32 (12 V h bytes) against
# the chunk's 8 c V h GEMM FLOPs: on an H200 (~790 TFLOP/s, ~4.3 TB/s) that costs about
# 275 / c of the chunk's GEMM time, whatever V and h. Measured at T 64k, V 128k, h 4096,
# bf16: 1.97x standard's time with 512-token chunks, 1.33x with 2048 (docs/PERFORMANCE.md).
# CPUs have far less arithmetic per byte of bandwidth, so the byte budget alone decides.
GPU_MIN_CHUNK_TOKENS = 2048

__all__ = ["auto_chunk_tokens", "chunked_linear_cross_entropy"]


def auto_chunk_tokens(
    vocab_per_rank: int,
    budget_bytes: int = AUTO_CHUNK_BYTES,
    min_tokens: int = AUTO_CHUNK_MULTIPLE,
) -> int:
    """Tokens per chunk when `model.loss_chunk_tokens` is null: the most whose fp32 logits
    on one TP rank fit `budget_bytes` (256 MiB), in multiples of 256 tokens, and at least
    `min_tokens` (256 on the CPU; `chunked_linear_cross_entropy` passes
    `GPU_MIN_CHUNK_TOKENS` on a GPU). E.g. on the CPU 2048 tokens for a 32k vocabulary and
    512 for Llama-3's 128k (TP 1); on a GPU 2048 for both.

    Why 256 MiB: the working memory (one chunk) is c/2T of the full-logits path's in fp32,
    so at most 1/8 for any vocabulary from 8k tokens per rank on, and 1/32 at Llama-3's,
    while a chunk's GEMM (c x h x V/TP) stays large enough for the matmul's full rate."""
    tokens = budget_bytes // (4 * max(vocab_per_rank, 1))
    tokens = tokens // AUTO_CHUNK_MULTIPLE * AUTO_CHUNK_MULTIPLE
    return max(AUTO_CHUNK_MULTIPLE, min_tokens, tokens)


def _accumulation_dtype(tensor: Tensor) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 logits (fp64 stays fp64, for exact reference tests)."""
    return torch.promote_types(tensor.dtype, torch.float32)


def _all_reduce(tensor: Tensor, op: Any, group: Any) -> Tensor:
    if group is not None and torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(tensor, op=op, group=group)
    return tensor


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        labels: Tensor,
        vocab_start: int,
        valid_columns: int,
        chunk_tokens: int,
        group: Any,
    ) -> Tensor:
        # This rank's real columns only: padded vocabulary is never computed (a view).
        shard = weight[:valid_columns]
        local_labels = labels - vocab_start
        owned = (local_labels >= 0) & (local_labels < valid_columns)
        local_labels = torch.where(owned, local_labels, torch.zeros_like(local_labels))
        num_tokens = hidden.size(0)
        acc = _accumulation_dtype(hidden)
        # Per token: this rank's max and sum of exp against it (one pass over the chunks),
        # then the global max and the rescaled sums over TP: one matmul per chunk.
        local_max = torch.full((num_tokens,), float("-inf"), dtype=acc, device=hidden.device)
        local_sum = torch.zeros(num_tokens, dtype=acc, device=hidden.device)
        target = torch.zeros(num_tokens, dtype=acc, device=hidden.device)
        if valid_columns:  # else the whole shard is padding: it adds nothing
            for start in range(0, num_tokens, chunk_tokens):
                end = min(start + chunk_tokens, num_tokens)
                logits = (hidden[start:end] @ shard.t()).to(acc)
                picked = logits.gather(1, local_labels[start:end, None]).squeeze(1)
                target[start:end] = torch.where(owned[start:end], picked, 0.0)
                row_max = logits.max(dim=-1).values
                local_max[start:end] = row_max
                # In place: one chunk-sized buffer (two when the logits are not fp32).
                local_sum[start:end] = logits.sub_(row_max[:, None]).exp_().sum(dim=-1)
                del logits  # before the next chunk's logits exist: one chunk at a time
        global_max = _all_reduce(local_max.clone(), torch.distributed.ReduceOp.MAX, group)
        sum_exp = local_sum * torch.exp(local_max - global_max)
        _all_reduce(sum_exp, torch.distributed.ReduceOp.SUM, group)
        _all_reduce(target, torch.distributed.ReduceOp.SUM, group)
        lse = global_max + torch.log(sum_exp)
        ctx.save_for_backward(hidden, weight, local_labels, owned, lse)
        ctx.valid_columns, ctx.chunk_tokens = valid_columns, chunk_tokens
        return lse - target

    @staticmethod
    def backward(ctx: Any, grad_nll: Tensor) -> tuple[Tensor | None, ...]:
        hidden, weight, local_labels, owned, lse = ctx.saved_tensors
        valid, chunk_tokens = ctx.valid_columns, ctx.chunk_tokens
        grad_weight = torch.zeros_like(weight)
        if not valid:  # a shard of padding only: no logit of it depends on anything
            return torch.zeros_like(hidden), grad_weight, *([None] * 5)
        shard = weight[:valid]
        acc = _accumulation_dtype(hidden)
        grad_nll = grad_nll.to(acc)
        grad_hidden = torch.empty_like(hidden)
        # The weight gradient sums over every chunk: in fp32 (into the gradient itself
        # when the weight is fp32), never rounded to bf16 chunk by chunk.
        in_place = weight.dtype == acc and hidden.dtype == acc
        grad_shard = grad_weight[:valid] if in_place else torch.zeros_like(shard, dtype=acc)
        rows = torch.arange(min(chunk_tokens, hidden.size(0)), device=hidden.device)
        for start in range(0, hidden.size(0), chunk_tokens):
            end = min(start + chunk_tokens, hidden.size(0))
            h = hidden[start:end]
            # softmax(logits) * g - onehot(target) * g, for this rank's columns.
            grad_logits = (h @ shard.t()).to(acc).sub_(lse[start:end, None]).exp_()
            grad_logits.mul_(grad_nll[start:end, None])
            g_owned = torch.where(owned[start:end], grad_nll[start:end], 0.0)
            grad_logits[rows[: end - start], local_labels[start:end]] -= g_owned
            grad_logits = grad_logits.to(hidden.dtype)
            torch.mm(grad_logits, shard, out=grad_hidden[start:end])  # no [c, h] temporary
            if in_place:
                grad_shard.addmm_(grad_logits.t(), h)
            else:
                _add_low_precision_product(grad_shard, grad_logits, h)
            del grad_logits  # before the next chunk's logits exist: one chunk at a time
        if not in_place:
            grad_weight[:valid].copy_(grad_shard)
        return grad_hidden, grad_weight, None, None, None, None, None


def _add_low_precision_product(accumulator: Tensor, grad_logits: Tensor, hidden: Tensor) -> None:
    """accumulator [V, H] (fp32) += grad_logits[n, V].T @ hidden[n, H], with the GEMM in
    the inputs' (bf16) precision, in blocks of vocabulary rows: the bf16 product and its
    fp32 copy are block-sized, at most a chunk's fp32 logits, never [V, H]."""
    vocab, width = accumulator.shape
    rows = max(1, 2 * grad_logits.size(0) * vocab // (3 * width))
    for first in range(0, vocab, rows):
        last = min(first + rows, vocab)
        accumulator[first:last] += (grad_logits[:, first:last].t() @ hidden).to(accumulator.dtype)


def chunked_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    vocab_start: int = 0,
    valid_columns: int | None = None,
    chunk_tokens: int | None = None,
    group: Any = None,
) -> Tensor:
    """Per-token NLL [N] (fp32) of `labels` [N] (global vocabulary ids) under the logits
    `hidden` [N, H] @ `weight`[:valid_columns].T, where `weight` [V_local, H] is this TP
    rank's vocabulary shard starting at global id `vocab_start`, and the softmax runs over
    every rank of `group` (None: no tensor parallelism). `valid_columns` (default: all)
    leaves out the shard's padded columns. `hidden` must be the full token set of the TP
    group (gathered under sequence parallelism); its gradient is this rank's vocabulary
    share, to be all-reduced over TP by the caller's mapping (megatron's
    `copy_to_tensor_model_parallel_region` or the sequence-parallel gather)."""
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(
            f"hidden must be [N, H] and labels [N]; got {tuple(hidden.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if weight.dim() != 2 or weight.size(1) != hidden.size(1):
        raise ValueError(f"weight must be [V_local, {hidden.size(1)}], got {tuple(weight.shape)}")
    valid = weight.size(0) if valid_columns is None else valid_columns
    if not 0 <= valid <= weight.size(0):
        raise ValueError(f"valid_columns={valid} outside the shard's {weight.size(0)} columns")
    if chunk_tokens is None:
        minimum = GPU_MIN_CHUNK_TOKENS if weight.is_cuda else AUTO_CHUNK_MULTIPLE
        chunk = auto_chunk_tokens(weight.size(0), min_tokens=minimum)
    else:
        chunk = chunk_tokens
    if chunk < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk}")
    return _ChunkedLinearCrossEntropy.apply(
        hidden, weight, labels.long(), vocab_start, valid, chunk, group
    )
