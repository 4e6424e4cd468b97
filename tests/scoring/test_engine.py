"""TP = PP = CP = 1, in this process: the engine's per-token and response-mean NLL equal
transformers' on packed micro-batches (several documents of unequal lengths, one longer
than seq_length, explicit position ids on one), in input order; errors name the
checkpoint or the document; the attention-probe plumbing against a stand-in probe."""

from __future__ import annotations

import contextlib
import sys
import types
from dataclasses import dataclass

import numpy as np
import pytest

from megatron_longalign.scoring import ScoringDocument, ScoringEngine, ScoringError
from megatron_longalign.scoring.documents import padded_length, plan_microbatches
from tests.scoring.conftest import KEYS, LENGTHS, SEQ_LENGTH, assert_matches, scoring_config


@pytest.fixture(scope="module")
def engine(imported) -> ScoringEngine:
    return ScoringEngine(scoring_config(imported.model_config), imported.output)


def test_packed_nll_equals_transformers(engine, documents, references):
    groups = plan_microbatches(LENGTHS, SEQ_LENGTH, 1, "best_fit_decreasing")
    assert len(groups) >= 3 and any(len(g) > 1 for g in groups)  # really packed
    results = engine.score(documents)
    assert [r.key for r in results] == list(KEYS)
    for result, doc, reference in zip(results, documents, references, strict=True):
        assert result.token_nll.dtype == np.float32 and result.token_nll.shape == doc.tokens.shape
        assert result.attention_mass is None
        assert_matches(result.token_nll, reference, doc.key)
        assert result.mean_nll == pytest.approx(np.nanmean(reference), abs=2e-4)
        assert result.ppl == pytest.approx(np.exp(result.mean_nll))


def test_order_and_overlong_document(engine, documents, references):
    """Reversed input, and the document longer than seq_length alone: same per-document
    NLL, returned in the order given."""
    assert max(LENGTHS) > SEQ_LENGTH
    reverse = documents[::-1]
    results = engine.score(reverse)
    assert [r.key for r in results] == [d.key for d in reverse]
    for result, reference in zip(results, references[::-1], strict=True):
        assert_matches(result.token_nll, reference, result.key)
    longest = int(np.argmax(LENGTHS))
    (alone,) = engine.score([documents[longest]])
    assert_matches(alone.token_nll, references[longest], alone.key)


def test_document_without_targets(engine, documents):
    doc = documents[0]
    (result,) = engine.score([ScoringDocument(5, doc.tokens, np.zeros_like(doc.loss_mask))])
    assert np.isnan(result.token_nll).all() and np.isnan(result.mean_nll)


def test_out_of_vocabulary_token_names_the_key(engine, documents):
    doc = documents[1]
    tokens = doc.tokens.copy()
    tokens[3] = engine.vocab_size
    with pytest.raises(ValueError, match=r"document key 3\b.*outside the model's vocabulary"):
        engine.score([documents[0], ScoringDocument(doc.key, tokens, doc.loss_mask)])


def test_duplicate_keys_rejected(engine, documents):
    with pytest.raises(ValueError, match="key 17 appears twice"):
        engine.score([documents[0], documents[0]])


def test_checkpoint_that_does_not_load_names_the_path(imported, tmp_path):
    missing = tmp_path / "no_such_checkpoint"
    with pytest.raises(ScoringError, match="no_such_checkpoint"):
        ScoringEngine(scoring_config(imported.model_config), missing)


def test_tokenizer_fingerprint(engine):
    fingerprint = engine.tokenizer_fingerprint
    assert isinstance(fingerprint, str) and len(fingerprint) == 64
    assert engine.vocab_size == 300


# ---- attention-probe plumbing (a stand-in for model/attention_probe.py) ---------------------


@dataclass(frozen=True)
class _Request:
    query_mask: np.ndarray
    key_segments: np.ndarray
    num_segments: int
    layers: tuple[int, ...] | None = None


class _Probe:
    made: list = []

    def __init__(self, request: _Request, key_chunk: int = 4096) -> None:
        self.request, self.attached = request, 0
        _Probe.made.append(self)

    def result(self, groups=()) -> np.ndarray:
        # Segment s's "mass" = 1000 * (number of its keys) + s: tells documents apart.
        ids = self.request.key_segments
        counts = np.bincount(ids[ids >= 0], minlength=self.request.num_segments)
        return 1000.0 * counts + np.arange(self.request.num_segments)


@contextlib.contextmanager
def _attach(chunks, probe):
    probe.attached += 1
    yield probe


def test_probe_plumbing(engine, documents, references, monkeypatch):
    fake = types.ModuleType("megatron_longalign.model.attention_probe")
    fake.ProbeRequest, fake.AttentionProbe, fake.attach_probe = _Request, _Probe, _attach
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    monkeypatch.setattr(engine, "probe_layers", (2,))
    _Probe.made = []
    probed = {}
    docs = list(documents)
    groups = [g.tolist() for g in plan_microbatches(LENGTHS, SEQ_LENGTH, 1, "best_fit_decreasing")]
    # Documents 0 and 3 share a micro-batch: their segment ids must be renumbered apart.
    assert any(0 in g and 3 in g for g in groups)
    for i in (0, 2, 3):
        doc = docs[i]
        segments = np.full(doc.tokens.size, -1, dtype=np.int32)
        segments[:4], segments[4:6] = 0, 1
        segments[6 : 6 + i] = 2
        query = doc.loss_mask.copy()
        docs[i] = ScoringDocument(
            doc.key, doc.tokens, doc.loss_mask, doc.position_ids, query, segments, 3
        )
        probed[doc.key] = np.array([4000.0, 2000.0, 1000.0 * i])
    results = engine.score(docs)
    assert _Probe.made and all(p.attached == 1 for p in _Probe.made)
    assert all(p.request.layers == (2,) for p in _Probe.made)
    for result, doc, reference in zip(results, docs, references, strict=True):
        assert_matches(result.token_nll, reference, doc.key)  # the probe leaves NLL alone
        if doc.key not in probed:
            assert result.attention_mass is None
            continue
        mass = result.attention_mass
        # 1000 x the segment's key count identifies the document's own segments; the
        # remainder is its renumbered id: three consecutive ids.
        assert np.array_equal(mass // 1000 * 1000, probed[doc.key]), (doc.key, mass)
        assert np.array_equal(np.diff(mass % 1000), [1, 1]), (doc.key, mass)
    # Every probed document's query rows and segments went into exactly one request.
    requests = [p.request for p in _Probe.made]
    assert sum(r.num_segments for r in requests) == 9
    assert sum(int(r.query_mask.sum()) for r in requests) == sum(
        int(docs[i].loss_mask.sum()) for i in (0, 2, 3)
    )
    assert all(r.query_mask.size == r.key_segments.size for r in requests)


def test_plan_microbatches_respects_budget():
    lengths = [5, 9, 13, 50, 1, 7]
    groups = plan_microbatches(lengths, 16, 4, "best_fit_decreasing")
    assert sorted(np.concatenate(groups).tolist()) == list(range(len(lengths)))
    for g in groups:
        sizes = [padded_length(lengths[i], 4) for i in g]
        assert sum(sizes) <= 16 or len(g) == 1
    assert [3] in [g.tolist() for g in groups]
