"""The engine's attention-to-segment mass (model/attention_probe.py through the scoring
engine) equals transformers' eager attention probabilities on the same HF model, for
packed documents (GQA 4:2, two documents probed in one micro-batch, one longer than
seq_length), over every layer and over a subset; CP1 in this process (CP2, TP2 and PP2:
test_layouts.py)."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_longalign.scoring import ScoringEngine
from tests.scoring.conftest import (
    PROBED,
    assert_mass_matches,
    assert_matches,
    reference_mass,
    scoring_config,
    with_segments,
)


@pytest.fixture(scope="module")
def engine(imported) -> ScoringEngine:
    return ScoringEngine(scoring_config(imported.model_config), imported.output)


@pytest.fixture(scope="module")
def probed(documents):
    return with_segments(documents)


@pytest.mark.parametrize("layers", [None, (2,)], ids=["all_layers", "layer2"])
def test_mass_equals_eager_attention(engine, hf_model, probed, references, layers, monkeypatch):
    monkeypatch.setattr(engine, "probe_layers", layers)
    results = engine.score(probed)
    expected = {}
    for i, (result, doc, reference) in enumerate(zip(results, probed, references, strict=True)):
        assert_matches(result.token_nll, reference, doc.key)  # the probe leaves NLL alone
        if i not in PROBED:
            assert result.attention_mass is None
            continue
        expected[i] = reference_mass(hf_model, doc, layers)
        assert_mass_matches(result.attention_mass, expected[i], (layers, doc.key))
    # Not a vacuous match: masses differ between segments and documents, well above the
    # tolerance (a probe that averaged wrongly or mixed up documents would show).
    values = np.concatenate(list(expected.values()))
    assert values.min() > 1e-3 and values.max() - values.min() > 0.05, values


def test_mass_does_not_depend_on_packing(engine, probed):
    """A probed document scored alone gets the masses it got packed with others."""
    packed = engine.score(probed)
    for i in PROBED:
        (alone,) = engine.score([probed[i]])
        np.testing.assert_allclose(alone.attention_mass, packed[i].attention_mass, atol=1e-9)
