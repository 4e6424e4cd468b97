"""Context-parallel layout: document padding and each CP rank's share of a micro-batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_longalign.config.data import SkipAlignConfig
from megatron_longalign.data.microbatch import MicroBatchBuilder, shard_for_context_parallel
from megatron_longalign.data.planner import MicroBatchPlan
from megatron_longalign.parallel.context_parallel import context_parallel_token_index
from tests.data.test_microbatch import fake_samples
from tests.helpers.fake_group import FakeGroup


def _build(samples, cp, align=None, skip=False, naive=False):
    builder = MicroBatchBuilder(
        lambda i: samples[i],
        pad_to_multiple_of=align or 2 * cp,
        document_multiple=2 * cp if cp > 1 else 1,
        skipalign=SkipAlignConfig(enabled=skip, target_context_length=4096),
    )
    weights = np.linspace(0.5, 1.5, len(samples))
    pad_to = max(s.tokens.size for s in samples) if naive else 0
    return builder.build(MicroBatchPlan(np.arange(len(samples)), weights, pad_to))


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_single_document_matches_megatrons_load_balanced_split(cp, monkeypatch):
    """For one document, megatron's own (bshd) get_batch_on_this_cp_rank is the
    reference: 2*CP chunks, rank r keeps chunks r and 2*CP-1-r."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    # megatron reads the group's size only when torch.distributed looks initialised.
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)

    length = 8 * cp
    sequence = torch.arange(length)[None]
    for rank in range(cp):
        expected = get_batch_on_this_cp_rank(
            {"tokens": sequence.clone()}, cp_group=FakeGroup(cp, rank)
        )
        index = context_parallel_token_index(np.array([0, length]), cp, rank)
        np.testing.assert_array_equal(index, expected["tokens"][0].numpy())


def test_matches_transformer_engine_partitioned_indices():
    tex = pytest.importorskip(
        "transformer_engine_torch", reason="Transformer Engine is not installed here"
    )
    if not torch.cuda.is_available():
        pytest.skip("TE's thd_get_partitioned_indices runs on CUDA")
    layout = np.array([0, 8, 12, 40, 48])
    for cp in (2,):
        for rank in range(cp):
            te_index = tex.thd_get_partitioned_indices(
                torch.as_tensor(layout, dtype=torch.int32, device="cuda"), 48, cp, rank
            )
            np.testing.assert_array_equal(
                context_parallel_token_index(layout, cp, rank), te_index.cpu().numpy()
            )


def test_rejects_documents_not_padded_to_two_cp():
    with pytest.raises(
        ValueError, match="document 1 has padded length 6, not a multiple of 2 x CP = 4"
    ):
        context_parallel_token_index(np.array([0, 4, 10]), 2, 0)


@settings(max_examples=60, deadline=None)
@given(
    samples=fake_samples(),
    cp=st.sampled_from([2, 3, 4]),
    extra_align=st.sampled_from([1, 2]),
    skip=st.booleans(),
    naive=st.booleans(),
)
def test_property_ranks_partition_every_token_exactly_once(samples, cp, extra_align, skip, naive):
    padded = _build(samples, cp, align=2 * cp * extra_align, skip=skip, naive=naive)
    unpadded = _build(samples, 1, align=1, skip=skip, naive=naive)
    layout = padded.layout_cu_seqlens
    lengths = np.diff(layout)
    assert (lengths % (2 * cp) == 0).all() and padded.num_tokens % (2 * cp * extra_align) == 0
    real = np.diff(padded.cu_seqlens)
    assert (real <= lengths).all()
    # Real tokens, labels, weights and positions are those of the unpadded build.
    for doc in range(len(samples)):
        a, n = int(layout[doc]), int(real[doc])
        b = int(unpadded.cu_seqlens[doc])
        for field in ("tokens", "labels", "loss_weights", "position_ids"):
            np.testing.assert_array_equal(
                getattr(padded, field)[a : a + n], getattr(unpadded, field)[b : b + n]
            )
        assert (padded.loss_weights[a + n : int(layout[doc + 1])] == 0).all()
    # The shards cover every token once, in order within each rank, with their fields.
    shards = [shard_for_context_parallel(padded, cp, r) for r in range(cp)]
    seen = np.concatenate([context_parallel_token_index(layout, cp, r) for r in range(cp)])
    np.testing.assert_array_equal(np.sort(seen), np.arange(padded.num_tokens))
    assert sum(s.loss_weights.sum() for s in shards) == pytest.approx(padded.loss_weights.sum())
    for rank, shard in enumerate(shards):
        index = context_parallel_token_index(layout, cp, rank)
        assert (np.diff(index) > 0).all()
        assert shard.num_tokens == padded.num_tokens // cp
        np.testing.assert_array_equal(shard.position_ids, padded.position_ids[index])
        np.testing.assert_array_equal(shard.labels, padded.labels[index])
        np.testing.assert_array_equal(shard.local_document_bounds, layout // cp)
        np.testing.assert_array_equal(shard.cu_seqlens, padded.cu_seqlens)  # still global
        assert (shard.cp_size, shard.cp_rank) == (cp, rank)


def test_a_short_document_gives_some_ranks_no_target():
    """A 2-token document split over CP=2 (4 chunks of 1 after padding): its only
    target sits on one rank; the others hold zero-weight tokens only."""
    from megatron_longalign.data.indexed import SFTSample

    regions = np.array([[0, 1, 2], [1, 2, 3]], dtype=np.int32)  # user token, assistant token
    sample = SFTSample(np.array([5, 6]), regions)
    mb = _build([sample], cp=2)
    np.testing.assert_array_equal(mb.layout_cu_seqlens, [0, 4])
    np.testing.assert_array_equal(mb.cu_seqlens, [0, 2])
    weights = [shard_for_context_parallel(mb, 2, r).loss_weights for r in range(2)]
    assert [int((w > 0).sum()) for w in weights] == [1, 0]
