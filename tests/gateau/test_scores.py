"""GATEAU's arithmetic on hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from megatron_longalign.gateau.scores import (
    ScoreConfig,
    contextual_awareness,
    dataset_scores,
    minmax,
    segment_importance,
)

NAN = float("nan")


def test_minmax_constant_column_is_zero_and_nan_stays():
    np.testing.assert_allclose(minmax([1.0, 2.0, 3.0]), [0.0, 0.5, 1.0])
    np.testing.assert_allclose(minmax([4.0, NAN, 2.0]), [1.0, NAN, 0.0])
    np.testing.assert_allclose(minmax([5.0, 5.0]), [0.0, 0.0])
    np.testing.assert_allclose(minmax([7.0]), [0.0])
    assert np.isnan(minmax([NAN, NAN])).all()


def test_importance_softmax_is_normalised_inverse_ppl_and_temperature_sharpens():
    nll = np.log([1.0, 2.0, 4.0])  # PPL 1, 2, 4
    np.testing.assert_allclose(segment_importance(nll, ScoreConfig()), [4 / 7, 2 / 7, 1 / 7])
    sharp = segment_importance(nll, ScoreConfig(importance_temperature=0.5))
    np.testing.assert_allclose(sharp, np.array([1, 0.25, 0.0625]) / 1.3125)
    minmax_config = ScoreConfig(importance="minmax")
    np.testing.assert_allclose(segment_importance(nll, minmax_config), [2 / 3, 1 / 3, 0])
    np.testing.assert_allclose(segment_importance([0.3, 0.3], minmax_config), [0.5, 0.5])
    # Huge NLLs do not overflow.
    np.testing.assert_allclose(segment_importance([1000.0, 1000.0], ScoreConfig()), [0.5, 0.5])


def test_cas_is_the_cosine_of_importance_and_attention():
    nll = np.log([1.0, 2.0, 4.0])
    assert contextual_awareness(nll, [4.0, 2.0, 1.0], ScoreConfig()) == pytest.approx(1.0)
    assert contextual_awareness(nll, [1.0, 0.0, 0.0], ScoreConfig()) == pytest.approx(
        4 / math.sqrt(21)
    )
    assert math.isnan(contextual_awareness([], [], ScoreConfig()))
    assert math.isnan(contextual_awareness(nll, [0.0, 0.0, 0.0], ScoreConfig()))
    with pytest.raises(ValueError, match="2 attention values for 3 segments"):
        contextual_awareness(nll, [1.0, 1.0], ScoreConfig())


def test_dataset_scores_by_hand():
    # PPL_A 2, 4, 6 -> 0, .5, 1; PPL_B 3, 3, 9 -> 0, 0, 1; HMG 0, .5, 0 -> norm 0, 1, 0.
    # CAS .5, none, 1 -> CAM .5, none, 0 -> norm 1, none, 0.
    out = dataset_scores(np.log([2, 4, 6]), np.log([3, 3, 9]), [0.5, NAN, 1.0], ScoreConfig())
    np.testing.assert_allclose(out.hmg, [0.0, 0.5, 0.0], atol=1e-12)
    np.testing.assert_allclose(out.cam, [0.5, NAN, 0.0])
    # sample 1 has no CAM: scored by norm(HMG) alone (1.0), not by alpha x norm(HMG).
    np.testing.assert_allclose(out.score, [0.2, 1.0, 0.0], atol=1e-12)
    assert out.without_cam == 1
    half = dataset_scores(np.log([2, 4, 6]), np.log([3, 3, 9]), [0.5, NAN, 1.0], ScoreConfig(0.5))
    np.testing.assert_allclose(half.score, [0.5, 1.0, 0.0], atol=1e-12)
    # A sample without response has no score at all.
    none = dataset_scores([NAN, 0.0, 1.0], [NAN, 0.0, 0.5], [NAN, NAN, NAN], ScoreConfig())
    assert np.isnan(none.score[0]) and none.without_cam == 2


def test_config_is_checked():
    with pytest.raises(ValueError, match="alpha"):
        ScoreConfig(alpha=1.5).validate()
    with pytest.raises(ValueError, match="importance"):
        ScoreConfig(importance="rank").validate()
