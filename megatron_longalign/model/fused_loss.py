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
- gradients: (softmax - onehot(target)) times each token's upstream gradient gives the
  gradient of the hidden states (this rank's vocabulary share; the caller's TP mapping
  all-reduces it) and of the weight shard (accumulated over chunks in fp32).

When are the gradients made? The model returns per-token NLL, and the upstream gradient
of each token is known only when the schedule calls backward. But the trainer's loss is
sum_t w_t nll_t with weights it already has, and megatron's schedule scales it by one
scalar at most, so the upstream gradient is s * w. Given the weights (`grad_hint`, the
model's `loss_mask`), the forward makes the gradients for w in the same pass as the LSE,
as Liger does: three matmuls per chunk (logits, hidden and weight gradients). Backward
checks that the upstream gradient really is s * w and scales the stored gradients by s;
if it is not (some other loss on the NLL), it discards them and recomputes each chunk's
logits from the saved LSE (the path without a hint: four matmuls). The peak is the same
either way: the gradients that backward would allocate exist from the end of the forward
instead (docs/PERFORMANCE.md, "Output layer and loss").

Padded vocabulary columns (megatron pads to make_vocab_size_divisible_by x TP) are left
out by slicing the weight shard (a view): they are never computed, so they take no part in
the softmax and get a zero gradient, as in the standard path's -inf mask.
"""

from __future__ import annotations

import warnings
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
        grad_hint: Tensor | None,
        vocab_start: int,
        valid_columns: int,
        chunk_tokens: int,
        group: Any,
    ) -> Tensor:
        # This rank's real columns only: padded vocabulary is never computed (a view).
        local_labels = labels - vocab_start
        owned = (local_labels >= 0) & (local_labels < valid_columns)
        local_labels = torch.where(owned, local_labels, torch.zeros_like(local_labels))
        ctx.valid_columns, ctx.chunk_tokens = valid_columns, chunk_tokens
        ctx.precomputed = grad_hint is not None
        if grad_hint is None:
            lse, target = _lse_and_target(
                hidden, weight[:valid_columns], local_labels, owned, chunk_tokens, group
            )
            ctx.save_for_backward(hidden, weight, local_labels, owned, lse)
        else:
            lse, target, grad_hidden, grad_weight = _forward_with_gradients(
                hidden, weight, local_labels, owned, grad_hint, valid_columns, chunk_tokens, group
            )
            ctx.save_for_backward(
                hidden, weight, local_labels, owned, lse, grad_hint, grad_hidden, grad_weight
            )
        _all_reduce(target, torch.distributed.ReduceOp.SUM, group)
        return lse - target

    @staticmethod
    def backward(ctx: Any, grad_nll: Tensor) -> tuple[Tensor | None, ...]:
        hidden, weight, local_labels, owned, lse = ctx.saved_tensors[:5]
        none = (None,) * 6
        if ctx.precomputed:
            grad_hint, grad_hidden, grad_weight = ctx.saved_tensors[5:]
            scale = proportional_scale(grad_nll, grad_hint)
            if scale is not None:  # the usual case: the gradients are ready
                if scale != 1.0:
                    grad_hidden, grad_weight = grad_hidden * scale, grad_weight * scale
                return grad_hidden, grad_weight, *none
            _warn_recompute_once()
        grad_hidden, grad_weight = _gradients(
            hidden, weight, local_labels, owned, lse, grad_nll, ctx.valid_columns, ctx.chunk_tokens
        )
        return grad_hidden, grad_weight, *none


def proportional_scale(grad_nll: Tensor, hint: Tensor) -> float | None:
    """s with grad_nll = s * hint (to fp32 rounding), or None when there is none. The
    schedule's scaling (micro-batch count, fp16 loss scale) is one scalar, so a loss of
    sum_t w_t nll_t always gives a proportional upstream gradient; anything else (another
    loss on the NLL) falls back to the recompute."""
    dtype = torch.promote_types(hint.dtype, torch.float32)  # fp64 stays fp64 (tests)
    grad_nll, hint = grad_nll.to(dtype), hint.to(dtype)
    reference = int(hint.abs().argmax())
    if hint[reference] == 0:
        return 0.0 if not bool(grad_nll.any()) else None
    scale = float(grad_nll[reference] / hint[reference])
    error = float((grad_nll - scale * hint).abs().max())
    return scale if error <= 1e-6 * float(grad_nll.abs().max()) else None


_warned: list[bool] = []


def _warn_recompute_once() -> None:
    if not _warned:
        _warned.append(True)
        warnings.warn(
            "chunked loss: the upstream gradient is not proportional to the loss weights "
            "given to the model, so the gradients computed in forward are discarded and "
            "recomputed (one more output-layer matmul per step)",
            stacklevel=3,
        )


def _chunk_log_normaliser(logits: Tensor, group: Any) -> tuple[Tensor, Tensor]:
    """For one chunk of fp32 logits (this rank's columns), turned IN PLACE into
    exp(logits - global max): the global max and the sum of exp over every TP rank."""
    row_max = (
        logits.max(dim=-1).values
        if logits.size(1)
        else logits.new_full(logits.shape[:1], float("-inf"))
    )
    _all_reduce(row_max, torch.distributed.ReduceOp.MAX, group)
    sum_exp = logits.sub_(row_max[:, None]).exp_().sum(dim=-1)
    _all_reduce(sum_exp, torch.distributed.ReduceOp.SUM, group)
    return row_max, sum_exp


def _lse_and_target(
    hidden: Tensor, shard: Tensor, local_labels: Tensor, owned: Tensor, chunk_tokens: int, group
) -> tuple[Tensor, Tensor]:
    """Per-token fp32 LSE over the whole vocabulary, and this rank's target logits (0
    where another rank owns the label): one matmul per chunk, and only this rank's max and
    sum of exp per chunk; the global ones come from two all-reduces at the end."""
    num_tokens = hidden.size(0)
    acc = _accumulation_dtype(hidden)
    local_max = torch.full((num_tokens,), float("-inf"), dtype=acc, device=hidden.device)
    local_sum = torch.zeros(num_tokens, dtype=acc, device=hidden.device)
    target = torch.zeros(num_tokens, dtype=acc, device=hidden.device)
    if shard.size(0):  # else the whole shard is padding: it adds nothing
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
    return global_max + torch.log(sum_exp), target


class _GradientSink:
    """Where the chunks' gradients go: grad_hidden rows (each chunk owns its rows) and the
    weight gradient, summed over every chunk in fp32 (into the gradient itself when the
    weight is fp32), never rounded to bf16 chunk by chunk."""

    def __init__(self, hidden: Tensor, weight: Tensor, valid: int) -> None:
        acc = _accumulation_dtype(hidden)
        self.hidden, self.shard = hidden, weight[:valid]
        self.grad_hidden = torch.zeros_like(hidden) if not valid else torch.empty_like(hidden)
        self.grad_weight = torch.zeros_like(weight)
        self.in_place = weight.dtype == acc and hidden.dtype == acc
        self.acc = (
            self.grad_weight[:valid] if self.in_place else torch.zeros_like(self.shard, dtype=acc)
        )

    def add_chunk(self, start: int, end: int, grad_logits: Tensor) -> None:
        """grad_logits [c, valid]: d(loss)/d(logits) of tokens start:end, already in the
        hidden states' dtype. The caller casts and drops its fp32 chunk first, so the two
        never coexist with the GEMM outputs (the planner's memory model, docs/PLANNING.md)."""
        h = self.hidden[start:end]
        torch.mm(grad_logits, self.shard, out=self.grad_hidden[start:end])  # no [c, h] temporary
        if self.in_place:
            self.acc.addmm_(grad_logits.t(), h)
        else:
            _add_low_precision_product(self.acc, grad_logits, h)

    def result(self) -> tuple[Tensor, Tensor]:
        if not self.in_place:
            self.grad_weight[: self.shard.size(0)].copy_(self.acc)
        return self.grad_hidden, self.grad_weight


def _subtract_target(grad_logits: Tensor, local_labels: Tensor, owned: Tensor, g: Tensor) -> None:
    """softmax * g  ->  (softmax - onehot(target)) * g, for the labels this rank owns."""
    rows = torch.arange(grad_logits.size(0), device=grad_logits.device)
    grad_logits[rows, local_labels] -= torch.where(owned, g, 0.0)


def _gradients(
    hidden: Tensor,
    weight: Tensor,
    local_labels: Tensor,
    owned: Tensor,
    lse: Tensor,
    grad_nll: Tensor,
    valid: int,
    chunk_tokens: int,
) -> tuple[Tensor, Tensor]:
    """The recompute path: each chunk's logits again, from the saved LSE."""
    sink = _GradientSink(hidden, weight, valid)
    if not valid:  # a shard of padding only: no logit of it depends on anything
        return sink.result()
    grad_nll = grad_nll.to(_accumulation_dtype(hidden))
    for start in range(0, hidden.size(0), chunk_tokens):
        end = min(start + chunk_tokens, hidden.size(0))
        grad_logits = (hidden[start:end] @ sink.shard.t()).to(grad_nll.dtype)
        grad_logits.sub_(lse[start:end, None]).exp_().mul_(grad_nll[start:end, None])
        _subtract_target(
            grad_logits, local_labels[start:end], owned[start:end], grad_nll[start:end]
        )
        grad_logits = grad_logits.to(hidden.dtype)  # the fp32 chunk is freed here
        sink.add_chunk(start, end, grad_logits)
        del grad_logits  # before the next chunk's logits exist: one chunk at a time
    return sink.result()


def _forward_with_gradients(
    hidden: Tensor,
    weight: Tensor,
    local_labels: Tensor,
    owned: Tensor,
    grad_hint: Tensor,
    valid: int,
    chunk_tokens: int,
    group: Any,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """LSE, this rank's target logits and the gradients for the upstream gradient
    `grad_hint`, from one matmul of logits per chunk (three with the gradients, against
    the recompute path's four). Each chunk's max and sum of exp are all-reduced over TP
    at once, since its softmax is needed before the next chunk."""
    sink = _GradientSink(hidden, weight, valid)
    acc = _accumulation_dtype(hidden)
    num_tokens = hidden.size(0)
    lse = torch.empty(num_tokens, dtype=acc, device=hidden.device)
    target = torch.zeros(num_tokens, dtype=acc, device=hidden.device)
    g_all = grad_hint.to(acc)
    for start in range(0, num_tokens, chunk_tokens):
        end = min(start + chunk_tokens, num_tokens)
        logits = (hidden[start:end] @ sink.shard.t()).to(acc)
        labels, mine, g = local_labels[start:end], owned[start:end], g_all[start:end]
        if valid:
            picked = logits.gather(1, labels[:, None]).squeeze(1)
            target[start:end] = torch.where(mine, picked, 0.0)
        row_max, sum_exp = _chunk_log_normaliser(logits, group)  # logits -> exp, in place
        lse[start:end] = row_max + torch.log(sum_exp)
        if valid:
            logits.mul_((g / sum_exp)[:, None])  # softmax * g
            _subtract_target(logits, labels, mine, g)
            logits = logits.to(hidden.dtype)  # the fp32 chunk is freed here
            sink.add_chunk(start, end, logits)
        del logits  # before the next chunk's logits exist: one chunk at a time
    grad_hidden, grad_weight = sink.result()
    return lse, target, grad_hidden, grad_weight


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
    grad_hint: Tensor | None = None,
) -> Tensor:
    """Per-token NLL [N] (fp32) of `labels` [N] (global vocabulary ids) under the logits
    `hidden` [N, H] @ `weight`[:valid_columns].T, where `weight` [V_local, H] is this TP
    rank's vocabulary shard starting at global id `vocab_start`, and the softmax runs over
    every rank of `group` (None: no tensor parallelism). `valid_columns` (default: all)
    leaves out the shard's padded columns. `hidden` must be the full token set of the TP
    group (gathered under sequence parallelism); its gradient is this rank's vocabulary
    share, to be all-reduced over TP by the caller's mapping (megatron's
    `copy_to_tensor_model_parallel_region` or the sequence-parallel gather).

    `grad_hint` [N] (the loss weights, when the loss is sum_t w_t nll_t) lets the forward
    compute the gradients too, for an upstream gradient proportional to it, which saves
    backward's recompute of the logits; backward checks the proportionality and recomputes
    when it does not hold. Ignored when no gradient is needed (no_grad, frozen inputs)."""
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
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if grad_hint is not None and grad_hint.shape != labels.shape:
        raise ValueError(f"grad_hint must be [N] like labels, got {tuple(grad_hint.shape)}")
    hint = grad_hint.detach() if grad_hint is not None and needs_grad else None
    return _ChunkedLinearCrossEntropy.apply(
        hidden, weight, labels.long(), hint, vocab_start, valid, chunk, group
    )
