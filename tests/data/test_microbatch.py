"""THD micro-batches built from real preprocessed samples."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_longalign.config.data import DataConfig, DatasetSource, SkipAlignConfig
from megatron_longalign.data.indexed import SFTSample
from megatron_longalign.data.microbatch import MicroBatchBuilder
from megatron_longalign.data.mixture import DatasetMixture
from megatron_longalign.data.planner import GlobalBatchPlanner, MicroBatchPlan


@pytest.fixture(scope="module")
def mixture(sample_prefixes):
    return DatasetMixture(
        [DatasetSource(sample_prefixes["long"]), DatasetSource(sample_prefixes["short"])]
    )


def plan_for(mixture, **overrides):
    config = DataConfig(sources=mixture.sources, seq_length=8192, global_batch_size=4)
    for key, value in overrides.pop("config", {}).items():
        setattr(config, key, value)
    return GlobalBatchPlanner(
        mixture.lengths, mixture.target_counts, mixture.sizes, mixture.weights, config, **overrides
    )


def documents(mb):
    bounds = mb.cu_seqlens.tolist()
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def test_thd_fields_are_consistent(mixture):
    builder = MicroBatchBuilder(mixture.__getitem__, pad_to_multiple_of=8)
    planner = plan_for(mixture, dp_size=2, loss_reduction="sequence")
    batch = planner.global_batch(0, 0)
    for rank in batch.micro_batches:
        for plan in rank:
            mb = builder.build(plan)
            assert mb.num_tokens % 8 == 0 and mb.cu_seqlens[-1] == mb.num_tokens
            assert mb.max_seqlen == max(e - s for s, e in documents(mb))
            for doc, (start, end) in enumerate(documents(mb)):
                np.testing.assert_array_equal(mb.position_ids[start:end], np.arange(end - start))
                assert mb.loss_weights[end - 1] == 0, "no prediction across a document boundary"
                if doc < plan.samples.size:
                    sample = mixture[int(plan.samples[doc])]
                    np.testing.assert_array_equal(mb.tokens[start:end], sample.tokens)
                    np.testing.assert_array_equal(mb.labels[start : end - 1], sample.tokens[1:])
                    targets = sample.loss_mask[1:]
                    weights = mb.loss_weights[start : end - 1]
                    assert (weights[targets] == np.float32(plan.weights[doc])).all()
                    assert (weights[~targets] == 0).all()
                else:
                    assert (mb.loss_weights[start:end] == 0).all(), "pad document"


def test_weighted_loss_equals_mean_of_per_sequence_means(mixture):
    """The full path: plan -> micro-batches -> sum(w * token_nll) over all ranks equals
    LongAlign's target computed directly from each sample's own tokens."""
    rng = np.random.default_rng(0)
    vocab = 4096
    logits_table = rng.normal(size=(vocab, vocab // 64))  # a fixed fake "model"

    def token_nll(tokens, labels):
        # Deterministic per (token, label) loss, independent of batching.
        return np.abs(logits_table[tokens % vocab, labels % (vocab // 64)]) + 0.1

    for dp, mbs in [(1, 1), (2, 2), (4, 1)]:
        planner = plan_for(
            mixture,
            dp_size=dp,
            loss_reduction="sequence",
            config={"micro_batch_size": mbs, "global_batch_size": 8},
        )
        builder = MicroBatchBuilder(mixture.__getitem__, pad_to_multiple_of=4)
        for batch in list(planner.iterate(epochs=1))[:3]:
            total = 0.0
            samples = []
            for rank in batch.micro_batches:
                for plan in rank:
                    mb = builder.build(plan)
                    total += float(
                        (mb.loss_weights.astype(np.float64) * token_nll(mb.tokens, mb.labels)).sum()
                    )
                    samples += plan.samples.tolist()
            means = []
            for sid in samples:
                s = mixture[sid]
                targets = s.loss_mask[1:]
                if targets.any():
                    means.append(token_nll(s.tokens[:-1], s.tokens[1:])[targets].mean())
            assert total == pytest.approx(np.mean(means), rel=1e-5)


def test_naive_padding_and_empty_micro_batches(mixture):
    builder = MicroBatchBuilder(mixture.__getitem__, pad_to_multiple_of=4)
    ids = np.array([0, len(mixture) - 1])
    plan = MicroBatchPlan(ids, np.array([0.5, 0.25]), pad_to=int(mixture.lengths[ids].max()))
    mb = builder.build(plan)
    lengths = [e - s for s, e in documents(mb)]
    assert lengths[:2] == [plan.pad_to, plan.pad_to]
    assert mb.num_real_tokens == int(mixture.lengths[ids].sum())
    empty = builder.build(MicroBatchPlan(np.zeros(0, np.int64), np.zeros(0)))
    assert empty.num_tokens == 4 and empty.loss_weights.sum() == 0 and empty.num_documents == 1


def test_skipalign_positions_in_micro_batches(mixture):
    config = SkipAlignConfig(enabled=True, target_context_length=32768)
    builder = MicroBatchBuilder(mixture.__getitem__, skipalign=config, seed=7)
    sid = int(np.argmax(mixture.lengths))
    plan = MicroBatchPlan(np.array([sid]), np.array([1.0]))
    first, again, later = (
        builder.build(plan, epoch=0),
        builder.build(plan, epoch=0),
        builder.build(plan, epoch=1),
    )
    np.testing.assert_array_equal(first.position_ids, again.position_ids)
    assert not np.array_equal(first.position_ids, later.position_ids)
    positions = first.position_ids
    assert positions.max() < 32768 and (np.diff(positions) >= 1).all()
    assert positions[-1] > mixture.lengths[sid], "skips were inserted"


@st.composite
def fake_samples(draw):
    """Arbitrary samples: random tokens and region tilings with some targets."""
    count = draw(st.integers(1, 6))
    samples = []
    for _ in range(count):
        sizes = draw(st.lists(st.integers(1, 30), min_size=1, max_size=6))
        kinds = draw(
            st.lists(st.sampled_from([0, 1, 2, 3, 4]), min_size=len(sizes), max_size=len(sizes))
        )
        ends = np.cumsum(sizes)
        regions = np.stack([ends - np.asarray(sizes), ends, kinds], axis=1).astype(np.int32)
        tokens = np.asarray(
            draw(st.lists(st.integers(1, 999), min_size=int(ends[-1]), max_size=int(ends[-1])))
        )
        samples.append(SFTSample(tokens, regions))
    return samples


@settings(max_examples=80, deadline=None)
@given(
    samples=fake_samples(),
    align=st.sampled_from([1, 2, 8]),
    naive=st.booleans(),
    skip=st.booleans(),
)
def test_property_thd_micro_batch_is_consistent(samples, align, naive, skip):
    skipalign = SkipAlignConfig(enabled=skip, target_context_length=4096)
    builder = MicroBatchBuilder(lambda i: samples[i], pad_to_multiple_of=align, skipalign=skipalign)
    weights = np.linspace(0.5, 1.5, len(samples))
    pad_to = max(s.tokens.size for s in samples) if naive else 0
    mb = builder.build(MicroBatchPlan(np.arange(len(samples)), weights, pad_to))
    assert mb.num_tokens % align == 0
    assert mb.cu_seqlens[0] == 0 and mb.cu_seqlens[-1] == mb.num_tokens
    assert (np.diff(mb.cu_seqlens) > 0).all()
    assert mb.tokens.size == mb.labels.size == mb.loss_weights.size == mb.position_ids.size
    for doc, (start, end) in enumerate(documents(mb)):
        positions = mb.position_ids[start:end]
        assert positions[0] == 0 and (np.diff(positions) >= 1).all()
        if not skip:
            np.testing.assert_array_equal(positions, np.arange(end - start))
        else:
            assert positions.max() < 4096 or end - start >= 4096
        assert mb.loss_weights[end - 1] == 0
        if doc < len(samples):
            sample = samples[doc]
            length = sample.tokens.size
            assert end - start == (pad_to if naive else length)
            np.testing.assert_array_equal(mb.labels[start : start + length - 1], sample.tokens[1:])
            expected = np.where(sample.loss_mask[1:], np.float32(weights[doc]), 0)
            np.testing.assert_array_equal(mb.loss_weights[start : start + length - 1], expected)
            assert (mb.loss_weights[start + length - 1 : end] == 0).all()
        else:
            assert (mb.loss_weights[start:end] == 0).all()
    assert mb.num_real_tokens == sum(s.tokens.size for s in samples)


def test_naive_padding_with_skipalign_stays_below_the_target():
    """Regression: pad positions after a skipped sample used to pass the target."""
    regions = np.array([[0, 1, 0], [1, 2, 1], [2, 10, 0], [10, 22, 3]], dtype=np.int32)
    sample = SFTSample(np.arange(1, 23), regions)
    builder = MicroBatchBuilder(
        lambda i: sample, skipalign=SkipAlignConfig(enabled=True, target_context_length=4096)
    )
    for seed in range(50):
        builder.seed = seed
        mb = builder.build(MicroBatchPlan(np.array([0]), np.array([1.0]), pad_to=110))
        assert mb.position_ids.max() < 4096 and (np.diff(mb.position_ids) >= 1).all()
