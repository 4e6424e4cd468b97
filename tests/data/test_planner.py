"""Global batch planner: exactness per epoch, resume, balancing and loss weights that do
not depend on the parallel layout."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_longalign.config.data import DataConfig, DatasetSource, PackingConfig
from megatron_longalign.data.planner import GlobalBatchPlanner, PlanPosition
from megatron_longalign.data.weights import per_token_weights


def make_planner(lengths, targets=None, dp=1, weights=(1.0,), sizes=None, **overrides):
    lengths = np.asarray(lengths)
    targets = np.maximum(lengths // 3, 1) if targets is None else np.asarray(targets)
    sizes = sizes or [lengths.size]
    config = DataConfig(sources=[DatasetSource(f"d{i}") for i in range(len(sizes))])
    for key, value in overrides.items():
        setattr(config, key, value)
    return GlobalBatchPlanner(
        lengths,
        targets,
        sizes,
        list(weights),
        config,
        dp_size=dp,
        loss_reduction=overrides.get("_reduction", "sequence"),
    )


def epoch_samples(planner, epoch=0) -> np.ndarray:
    out = []
    for step in range(planner.num_steps(epoch)):
        batch = planner.global_batch(epoch, step)
        for rank in batch.micro_batches:
            for plan in rank:
                out.append(plan.samples)
    return np.concatenate(out) if out else np.zeros(0, np.int64)


modes = st.sampled_from(["packed", "sorted", "naive"])
algorithms = st.sampled_from(["next_fit", "first_fit_decreasing", "best_fit_decreasing"])


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 256), min_size=1, max_size=120),
    mode=modes,
    algorithm=algorithms,
    dp=st.sampled_from([1, 2, 4]),
    mbs=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**16),
)
def test_every_sample_exactly_once_per_epoch(lengths, mode, algorithm, dp, mbs, seed):
    planner = make_planner(
        lengths,
        dp=dp,
        seq_length=256,
        batching=mode,
        packing=PackingConfig(algorithm),
        micro_batch_size=mbs,
        global_batch_size=2 * mbs * dp,
        seed=seed,
    )
    for epoch in (0, 1):
        samples = epoch_samples(planner, epoch)
        assert sorted(samples.tolist()) == list(range(len(lengths)))
        units = planner.epoch_units(epoch)
        unit_tokens = np.add.reduceat(np.asarray(lengths)[units.members], units.unit_offsets[:-1])
        assert (unit_tokens <= 256).all(), "a pack exceeds seq_length"
        for step in range(planner.num_steps(epoch)):
            batch = planner.global_batch(epoch, step)
            assert all(len(r) == planner.micro_batches_per_rank for r in batch.micro_batches)


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 300), min_size=5, max_size=80),
    mode=modes,
    cut=st.integers(0, 1000),
    seed=st.integers(0, 100),
)
def test_resume_from_any_consumed_point_gives_the_same_stream(lengths, mode, cut, seed):
    kwargs = dict(seq_length=300, batching=mode, global_batch_size=4, seed=seed, dp=2)
    full = list(make_planner(lengths, **kwargs).iterate(epochs=3))
    cut = cut % len(full)
    consumed = sum(b.num_samples for b in full[:cut])
    # A fresh planner (a restarted job) from the checkpoint's consumed-samples counter.
    restarted = make_planner(lengths, **kwargs)
    resumed = list(restarted.iterate(restarted.position_after(consumed), epochs=3))
    assert len(resumed) == len(full) - cut
    for a, b in zip(full[cut:], resumed, strict=True):
        assert (a.epoch, a.step) == (b.epoch, b.step)
        for ra, rb in zip(a.micro_batches, b.micro_batches, strict=True):
            for pa, pb in zip(ra, rb, strict=True):
                np.testing.assert_array_equal(pa.samples, pb.samples)
                np.testing.assert_array_equal(pa.weights, pb.weights)


def test_consumed_samples_off_a_batch_boundary_is_an_error():
    planner = make_planner([10] * 8, seq_length=100, batching="naive", global_batch_size=4)
    assert planner.position_after(4) == PlanPosition(0, 1)
    assert planner.position_after(8) == PlanPosition(1, 0)
    with pytest.raises(ValueError, match="not on a global batch boundary"):
        planner.position_after(3)


def test_epochs_reshuffle_and_seeds_differ():
    lengths = np.arange(1, 200)
    a = make_planner(lengths, seq_length=400, global_batch_size=2)
    b = make_planner(lengths, seq_length=400, global_batch_size=2, seed=99)
    assert not np.array_equal(epoch_samples(a, 0), epoch_samples(a, 1))
    assert not np.array_equal(epoch_samples(a, 0), epoch_samples(b, 0))
    np.testing.assert_array_equal(
        epoch_samples(a, 0),
        epoch_samples(make_planner(lengths, seq_length=400, global_batch_size=2), 0),
    )


def token_losses_for(planner, seed=0):
    """Arbitrary per-token losses for every sample's predicted target tokens."""
    rng = np.random.default_rng(seed)
    return [rng.gamma(2.0, 1.5, size=int(n)) for n in planner.target_counts]


def weighted_loss_per_batch(planner, losses):
    """What the trainer computes: sum over ranks and micro-batches of weight * loss."""
    totals = []
    for batch in planner.iterate(epochs=1):
        total = 0.0
        for rank in batch.micro_batches:
            for plan in rank:
                for sample, weight in zip(plan.samples, plan.weights, strict=True):
                    total += weight * losses[sample].sum()
        totals.append(total)
    return np.array(totals)


def reference_per_batch(planner, losses, reduction):
    """Independent reference, from each global batch's sample set alone."""
    out = []
    for batch in planner.iterate(epochs=1):
        samples = np.concatenate([p.samples for r in batch.micro_batches for p in r])
        with_targets = [losses[s] for s in samples if losses[s].size]
        if not with_targets:  # nothing to average: the trainer's sum is 0 (checked by callers)
            out.append(np.nan)
            continue
        if reduction == "sequence":
            out.append(np.mean([x.mean() for x in with_targets]))
        elif reduction == "token":
            out.append(np.concatenate(with_targets).mean())
        else:
            roots = np.array([np.sqrt(x.size) for x in with_targets])
            out.append(
                sum(x.sum() / r for x, r in zip(with_targets, roots, strict=True)) / roots.sum()
            )
    return np.array(out)


@pytest.mark.parametrize("reduction", ["sequence", "token", "sqrt"])
@pytest.mark.parametrize("mode", ["packed", "sorted", "naive"])
def test_loss_is_independent_of_dp_and_micro_batching(reduction, mode):
    rng = np.random.default_rng(1)
    lengths = rng.integers(5, 500, size=300)
    targets = rng.integers(0, 60, size=300)  # some samples have no target at all
    results = []
    for dp, mbs in [(1, 1), (1, 8), (2, 2), (4, 1), (4, 2)]:
        planner = make_planner(
            lengths,
            targets,
            dp=dp,
            seq_length=1024,
            batching=mode,
            micro_batch_size=mbs,
            global_batch_size=8,
            _reduction=reduction,
        )
        losses = token_losses_for(planner)
        got = weighted_loss_per_batch(planner, losses)
        np.testing.assert_allclose(got, reference_per_batch(planner, losses, reduction), rtol=1e-12)
        results.append(got)
    for other in results[1:]:
        np.testing.assert_allclose(other, results[0], rtol=1e-12)


@given(
    st.lists(st.integers(0, 5000), min_size=1, max_size=50),
    st.sampled_from(["token", "sequence", "sqrt"]),
)
def test_weights_of_all_target_tokens_sum_to_one(counts, reduction):
    counts = np.asarray(counts)
    weights = per_token_weights(counts, reduction)
    total = float((weights * counts).sum())
    assert total == pytest.approx(1.0 if counts.sum() else 0.0, abs=1e-12)
    assert (weights[counts == 0] == 0).all()
    if reduction == "sequence" and (counts > 0).any():
        per_sequence = weights[counts > 0] * counts[counts > 0]
        np.testing.assert_allclose(per_sequence, 1.0 / (counts > 0).sum())


def test_mixture_weights_repeat_and_subsample():
    sizes = [10, 40]
    lengths = np.full(50, 7)
    planner = make_planner(
        lengths,
        sizes=sizes,
        weights=(2.0, 0.25),
        seq_length=64,
        batching="naive",
        global_batch_size=5,
    )
    for epoch in (0, 1):
        samples = epoch_samples(planner, epoch)
        first, second = samples[samples < 10], samples[samples >= 10]
        assert sorted(first.tolist()) == sorted(list(range(10)) * 2)
        assert second.size == 10 and np.unique(second).size == 10
    assert set(epoch_samples(planner, 0)[epoch_samples(planner, 0) >= 10]) != set(
        epoch_samples(planner, 1)[epoch_samples(planner, 1) >= 10]
    )


def test_sorted_batches_group_similar_lengths():
    lengths = np.random.default_rng(3).integers(1, 1000, size=400)
    planner = make_planner(
        lengths, seq_length=1000, batching="sorted", global_batch_size=20, dp=2, micro_batch_size=2
    )
    ranges = []
    for batch in planner.iterate(epochs=1):
        samples = np.concatenate([p.samples for r in batch.micro_batches for p in r])
        ranges.append((lengths[samples].min(), lengths[samples].max()))
    ranges.sort()
    for (_, hi), (lo, _) in zip(ranges[:-1], ranges[1:], strict=True):
        assert hi <= lo, "sorted batches must not interleave in length"
    order = [planner.global_batch(0, s) for s in range(planner.num_steps(0))]
    assert [b.step for b in order] == list(range(len(order)))
    firsts = [lengths[b.micro_batches[0][0].samples].min() for b in order]
    assert firsts != sorted(firsts), "batch order is shuffled, not by length"


def test_ranks_are_cost_balanced():
    rng = np.random.default_rng(5)
    lengths = np.concatenate([rng.integers(100, 8000, 700), rng.integers(8000, 65536, 300)])
    planner = make_planner(lengths, dp=4, seq_length=65536, global_batch_size=16, batching="packed")
    imbalance = np.mean([b.imbalance for b in planner.iterate(epochs=1)][:-1])
    naive_order = make_planner(
        lengths, dp=4, seq_length=65536, global_batch_size=16, batching="naive"
    )
    assert imbalance < 1.10
    assert imbalance < np.mean([b.imbalance for b in naive_order.iterate(epochs=1)][:-1])


def test_overlength_samples_error_or_are_dropped_and_counted():
    lengths = [10, 500, 20, 900]
    with pytest.raises(
        ValueError, match="2 sample.*longer than data.seq_length=100.*--max-length 100"
    ):
        make_planner(lengths, seq_length=100)
    planner = make_planner(lengths, seq_length=100, on_overlength="drop", global_batch_size=1)
    assert planner.report.dropped_overlength == 2 and planner.report.dropped_examples == [1, 3]
    assert sorted(epoch_samples(planner).tolist()) == [0, 2]


def test_config_validation_messages():
    with pytest.raises(ValueError, match="divisible by micro_batch_size"):
        make_planner([5, 5], dp=2, global_batch_size=3)
    with pytest.raises(ValueError, match="data.batching='padded'"):
        make_planner([5], batching="padded")


@settings(max_examples=30, deadline=None)
@given(
    data=st.lists(st.tuples(st.integers(1, 400), st.integers(0, 80)), min_size=1, max_size=90),
    mode=modes,
    reduction=st.sampled_from(["sequence", "token", "sqrt"]),
    gbs_factor=st.sampled_from([1, 2]),
    seed=st.integers(0, 1000),
)
def test_property_loss_equals_reference_for_dp_1_2_4_and_any_accumulation(
    data, mode, reduction, gbs_factor, seed
):
    lengths = np.array([d[0] for d in data])
    targets = np.minimum([d[1] for d in data], lengths - 1)
    gbs = 8 * gbs_factor
    results = []
    for dp in (1, 2, 4):
        for mbs in (1, 2):  # gradient accumulation = gbs / (mbs * dp) micro-batches
            planner = make_planner(
                lengths,
                targets,
                dp=dp,
                seq_length=512,
                batching=mode,
                micro_batch_size=mbs,
                global_batch_size=gbs,
                seed=seed,
                _reduction=reduction,
            )
            losses = token_losses_for(planner, seed)
            got = weighted_loss_per_batch(planner, losses)
            expected = reference_per_batch(planner, losses, reduction)
            finite = ~np.isnan(expected)  # a batch without any target has nothing to average
            np.testing.assert_allclose(got[finite], expected[finite], rtol=1e-12)
            assert (got[~finite] == 0).all()
            results.append(got)
    for other in results[1:]:
        np.testing.assert_allclose(other, results[0], rtol=1e-12)


def test_empty_plan_and_bad_reduction_fail_clearly():
    planner = make_planner([500, 900], seq_length=100, on_overlength="drop", global_batch_size=1)
    with pytest.raises(ValueError, match="data plan is empty"):
        next(planner.iterate())
    with pytest.raises(ValueError, match="loss reduction 'mean'"):
        make_planner([5], _reduction="mean")
