"""The context-parallel layout is computed once (parallel/context_parallel.py) and every
consumer agrees with TE's rule, written out by hand here: for each document [s, s + L),
with c = L / (2 * CP), rank r holds [s + r*c, s + (r+1)*c) then [s + L - (r+1)*c, s + L - r*c).

Consumers: the numpy index (data sharding), the torch index, the RoPE table of
model/gpt.py, the attention's ContextParallelView and the MicroBatch sharding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_longalign.data.microbatch import MicroBatch, shard_for_context_parallel
from megatron_longalign.model.gpt import _place_for_context_parallel
from megatron_longalign.parallel.context_parallel import (
    ContextParallelView,
    context_parallel_token_index,
    document_multiple,
    local_document_bounds,
)


def reference_index(bounds: list[int], cp: int, rank: int) -> list[int]:
    index = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        length = end - start
        chunk = length // (2 * cp)
        index += range(start + rank * chunk, start + (rank + 1) * chunk)
        index += range(start + length - (rank + 1) * chunk, start + length - rank * chunk)
    return index


def random_layouts(cp: int, count: int = 20) -> list[list[int]]:
    rng = np.random.default_rng(cp)
    layouts = []
    for _ in range(count):
        num_docs = int(rng.integers(1, 8))
        # Padded lengths: multiples of 2 * CP, sometimes the minimum, sometimes long.
        lengths = 2 * cp * rng.integers(1, 12, size=num_docs)
        layouts.append([0, *np.cumsum(lengths).tolist()])
    return layouts


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_numpy_and_torch_index_equal_the_hand_written_rule(cp):
    for layout in random_layouts(cp):
        for rank in range(cp):
            expected = reference_index(layout, cp, rank)
            from_numpy = context_parallel_token_index(np.array(layout, np.int32), cp, rank)
            from_torch = context_parallel_token_index(
                torch.tensor(layout, dtype=torch.int32), cp, rank
            )
            assert isinstance(from_numpy, np.ndarray) and from_numpy.dtype == np.int64
            assert isinstance(from_torch, torch.Tensor) and from_torch.dtype == torch.int64
            assert from_numpy.tolist() == expected
            assert from_torch.tolist() == expected


@pytest.mark.parametrize("cp", [2, 3, 4])
def test_every_consumer_uses_the_same_layout(cp):
    for layout in random_layouts(cp, count=8):
        total = layout[-1]
        cu = torch.tensor(layout, dtype=torch.int32)
        np_layout = np.array(layout, np.int32)
        whole = MicroBatch(
            tokens=np.arange(total, dtype=np.int64),
            labels=np.arange(total, dtype=np.int64),
            loss_weights=np.ones(total, np.float32),
            position_ids=np.arange(total, dtype=np.int64),
            cu_seqlens=np_layout,
            max_seqlen=int(np.diff(np_layout).max()),
            sample_ids=np.arange(len(layout) - 1),
            num_real_tokens=total,
            cu_seqlens_padded=np_layout,
        )
        for rank in range(cp):
            expected = reference_index(layout, cp, rank)
            # data: the shard holds those tokens.
            shard = shard_for_context_parallel(whole, cp, rank)
            assert shard.tokens.tolist() == expected
            assert shard.local_document_bounds.tolist() == [b // cp for b in layout]
            # model/gpt.py: local row i of the RoPE table lands at global row expected[i].
            local = torch.arange(1, len(expected) + 1, dtype=torch.float32)[:, None]
            table = _place_for_context_parallel(local, cu, cp, rank)[:, 0]
            assert torch.nonzero(table)[:, 0].tolist() == expected
            assert table[expected].tolist() == local[:, 0].tolist()
            # model/attention.py: the view's queries and the all-gather order.
            view = ContextParallelView.build(cu, cp, rank, torch.device("cpu"))
            assert view.query_index.tolist() == expected
            assert view.local_bounds == local_document_bounds(np_layout, cp).tolist()
            gathered = sum((reference_index(layout, cp, r) for r in range(cp)), [])
            assert torch.tensor(gathered)[view.gather_order].tolist() == list(range(total))


def test_rope_table_rejects_what_the_layout_rejects():
    with pytest.raises(ValueError, match="not a multiple of 2 x CP = 4"):
        _place_for_context_parallel(torch.zeros(5, 1), torch.tensor([0, 4, 10]), 2, 0)
    with pytest.raises(ValueError, match="3 local position ids, but cu_seqlens / CP 2 give 4"):
        _place_for_context_parallel(torch.zeros(3, 1), torch.tensor([0, 8]), 2, 1)


@pytest.mark.parametrize(
    ("pad_documents_to", "cp", "expected"),
    [(1, 1, 1), (8, 1, 8), (1, 2, 4), (3, 2, 12), (8, 2, 8), (6, 4, 24)],
)
def test_document_multiple(pad_documents_to, cp, expected):
    assert document_multiple(pad_documents_to, cp) == expected
