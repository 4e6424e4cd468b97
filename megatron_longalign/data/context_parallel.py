"""Context-parallel (CP) layout of a packed micro-batch: which tokens each CP rank holds.

Transformer Engine's load-balanced THD layout (DESIGN.md "Context parallel with
packing"): every document's padded length L_p is a multiple of 2 * CP; it is cut into
2 * CP chunks of c = L_p / (2 * CP) tokens, and CP rank r holds chunks r and
2 * CP - 1 - r, document after document. Causal attention cost grows along a document,
so pairing an early chunk with a late one gives every rank the same work.

The MicroBatchBuilder pads the documents (`document_multiple`); `shard_for_context_parallel`
then keeps this rank's tokens. Labels are shifted before sharding, so a chunk boundary
never separates a token from its label, and loss weights, position ids and labels move
with their tokens. Document boundaries stay global (`cu_seqlens`, `cu_seqlens_padded`),
as megatron-core and TE expect: attention needs them, every layer's RoPE needs them.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from megatron_longalign.data.microbatch import MicroBatch


def context_parallel_token_index(
    cu_seqlens_padded: np.ndarray, cp_size: int, cp_rank: int
) -> np.ndarray:
    """Global token indices held by `cp_rank`, in its local order (increasing).

    The same as Transformer Engine's `thd_get_partitioned_indices`: for each document
    [s, s + L), tokens [s + r*c, s + (r+1)*c) then [s + L - (r+1)*c, s + L - r*c) with
    c = L / (2 * cp_size)."""
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
