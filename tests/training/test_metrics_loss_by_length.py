"""Per-document mean loss by length bucket, and the per-step metric dict."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_longalign.data.microbatch import MicroBatch
from megatron_longalign.training.metrics import (
    METRIC_KEYS,
    LossByLength,
    Throughput,
    bucket_labels,
    step_metrics,
)

LABELS = ["0-512", "512-1k", "1k-2k", "2k-4k", "4k-8k", "8k-16k", "16k-32k", "32k-64k"]
LABELS += ["64k-128k", "128k+"]


def test_bucket_labels_follow_the_preprocessing_histogram():
    assert bucket_labels() == LABELS


@pytest.mark.parametrize(
    ("length", "label"),
    [(0, "0-512"), (511, "0-512"), (512, "512-1k"), (1023, "512-1k"), (1024, "1k-2k")]
    + [(65_535, "32k-64k"), (65_536, "64k-128k"), (131_071, "64k-128k")]
    + [(131_072, "128k+"), (10**6, "128k+")],
)
def test_bucket_assignment(length, label):
    meter = LossByLength()
    assert meter.labels[int(meter.bucket_of([length])[0])] == label


def document(length: int, target_losses: list[float], fill: float = 99.0):
    """(losses, weights) of a document: its first positions are targets with these
    losses; every other position has weight 0 and a loss that must be ignored."""
    losses = np.full(length, fill, dtype=np.float32)
    weights = np.zeros(length, dtype=np.float32)
    losses[: len(target_losses)] = target_losses
    weights[: len(target_losses)] = 0.25
    return losses, weights


def micro_batch(*docs):
    losses = np.concatenate([d[0] for d in docs])
    weights = np.concatenate([d[1] for d in docs])
    cu = np.concatenate([[0], np.cumsum([d[0].size for d in docs])]).astype(np.int32)
    return losses, weights, cu


def test_means_per_bucket_on_a_hand_made_micro_batch():
    losses, weights, cu = micro_batch(
        document(300, [2.0] * 10),  # 0-512: mean 2
        document(600, [1.0, 1.0, 1.0, 9.0]),  # 512-1k: mean 3
        document(5, [6.0]),  # 0-512: mean 6 (one target token)
        document(4, []),  # pad document: no targets, ignored
    )
    meter = LossByLength()
    meter.add(torch.from_numpy(losses), torch.from_numpy(weights), cu)
    # Mean over documents, each document's own mean: (2 + 6) / 2 = 4, not the token mean
    # (10 * 2 + 6) / 11.
    assert meter.means() == {"loss_by_len/0-512": 4.0, "loss_by_len/512-1k": 3.0}
    # A second micro-batch accumulates; an empty bucket never appears.
    losses, weights, cu = micro_batch(document(70_000, [1.5, 2.5]), document(200, [7.0]))
    meter.add(losses, weights, cu)
    assert meter.means() == {
        "loss_by_len/0-512": pytest.approx((2 + 6 + 7) / 3),
        "loss_by_len/512-1k": 3.0,
        "loss_by_len/64k-128k": 2.0,
    }
    meter.reset()
    assert meter.means() == {}


def test_merge_adds_the_documents_of_another_meter():
    window, step = LossByLength(), LossByLength()
    window.add(*micro_batch(document(300, [2.0]), document(600, [3.0])))
    step.add(*micro_batch(document(200, [6.0]), document(70_000, [1.0])))
    window.merge(step)
    assert window.means() == {
        "loss_by_len/0-512": 4.0,
        "loss_by_len/512-1k": 3.0,
        "loss_by_len/64k-128k": 1.0,
    }
    assert step.means() == {"loss_by_len/0-512": 6.0, "loss_by_len/64k-128k": 1.0}
    with pytest.raises(ValueError, match="buckets differ"):
        window.merge(LossByLength(edges=[0, 100]))


def test_real_lengths_override_naively_padded_spans():
    # Naive batching: a 400-token sample padded to 600 belongs in 0-512.
    losses, weights, cu = micro_batch(document(600, [1.0]), document(600, [3.0]))
    meter = LossByLength()
    meter.add(losses, weights, cu, document_lengths=[400, 600])
    assert meter.means() == {"loss_by_len/0-512": 1.0, "loss_by_len/512-1k": 3.0}


def test_add_microbatch_uses_real_document_lengths():
    losses, weights, cu = micro_batch(document(500, [1.0]), document(520, [2.0]), document(4, []))
    mb = MicroBatch(
        tokens=np.zeros(cu[-1], np.int64),
        labels=np.zeros(cu[-1], np.int64),
        loss_weights=weights,
        position_ids=np.zeros(cu[-1], np.int64),
        cu_seqlens=cu,
        max_seqlen=520,
        sample_ids=np.array([7, 8]),
        num_real_tokens=1020,
    )
    meter = LossByLength()
    meter.add_microbatch(mb, torch.from_numpy(losses))
    assert meter.means() == {"loss_by_len/0-512": 1.0, "loss_by_len/512-1k": 2.0}


def test_mismatched_shapes_are_rejected():
    with pytest.raises(ValueError, match="disagree"):
        LossByLength().add(np.ones(4), np.ones(3), np.array([0, 4]))


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 3000), st.integers(0, 5), st.floats(0.0, 20.0)),
        min_size=1,
        max_size=8,
    )
)
def test_matches_a_plain_loop(docs):
    rng = np.random.default_rng(len(docs))
    parts, expected = [], {}
    for length, targets, scale in docs:
        targets = min(targets, length)
        values = list(rng.random(targets) * scale)
        parts.append(document(length, values))
        if targets:
            label = LABELS[
                int(np.searchsorted([0, *[2**k for k in range(9, 18)]], length, "right")) - 1
            ]
            expected.setdefault(label, []).append(float(np.mean(np.float32(values))))
    meter = LossByLength()
    meter.add(*micro_batch(*parts))
    got = meter.means()
    assert got.keys() == {f"loss_by_len/{k}" for k in expected}
    for label, means in expected.items():
        assert got[f"loss_by_len/{label}"] == pytest.approx(np.mean(means), rel=1e-6)


# ---- the metric dict ------------------------------------------------------------------


def throughput(mfu):
    return Throughput(
        steps=10,
        seconds=12.5,
        tokens=154_320,
        flops=1e15,
        tokens_per_sec=12_345.6,
        tflops_per_gpu=123.4,
        mfu=mfu,
        step_time_s=1.25,
    )


def test_step_metric_keys_are_exactly_the_documented_names():
    metrics = step_metrics(
        loss=torch.tensor(2.5),
        lr=1e-5,
        grad_norm=1.5,
        throughput=throughput(0.41),
        packing_efficiency=0.97,
        rank_imbalance=1.02,
        peak_memory_gb=12.3,
        loss_by_len={"loss_by_len/0-512": 2.0, "loss_by_len/64k-128k": 1.0},
    )
    assert list(metrics) == [
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "perf/tokens_per_sec",
        "perf/tflops_per_gpu",
        "perf/mfu",
        "perf/step_time_s",
        "data/packing_efficiency",
        "data/rank_imbalance",
        "mem/peak_gb",
        "loss_by_len/0-512",
        "loss_by_len/64k-128k",
    ]
    assert tuple(metrics)[: len(METRIC_KEYS)] == METRIC_KEYS
    assert metrics["train/loss"] == 2.5 and isinstance(metrics["train/loss"], float)
    assert metrics["perf/mfu"] == 0.41
    assert metrics["perf/step_time_s"] == 1.25


def test_mfu_is_omitted_when_the_peak_is_unknown():
    metrics = step_metrics(
        loss=2.5,
        lr=1e-5,
        grad_norm=1.5,
        throughput=throughput(None),
        packing_efficiency=0.97,
        rank_imbalance=1.02,
        peak_memory_gb=0.4,
    )
    assert list(metrics) == [k for k in METRIC_KEYS if k != "perf/mfu"]


def test_loss_by_len_keys_need_their_prefix():
    with pytest.raises(ValueError, match="loss_by_len/"):
        step_metrics(
            loss=1,
            lr=1,
            grad_norm=1,
            throughput=throughput(None),
            packing_efficiency=1,
            rank_imbalance=1,
            peak_memory_gb=1,
            loss_by_len={"0-512": 1.0},
        )
