"""GATEAU's score arithmetic (pure numpy, no model).

Per sample i (NaN marks a value that does not exist):
- PPL_A,i and PPL_B,i: exp(mean NLL of the response tokens) under models A and B.
- HMG_i = norm(PPL_A)_i - norm(PPL_B)_i, `norm` being min-max over the dataset.
- CAS_i = cosine(importance_i, attention_i) over the sample's context segments:
  importance from each segment's short-document response NLL (lower PPL = more
  important), attention = the response's attention mass on each segment under B,
  divided by its sum. The public code never computes CAS (its ranking script reads a
  score nothing writes); our choice is `importance="softmax"`:
  importance_j = softmax(-log PPL_j / T) with temperature T = 1 by default, which at
  T = 1 is exactly (1 / PPL_j) / sum_k (1 / PPL_k): a segment's share of the summed
  inverse perplexities. A lower T sharpens it. `importance="minmax"` instead maps the
  segments' log PPL linearly onto [1, 0] (best segment 1, worst 0; all equal: all 1),
  which ignores the absolute scale of the differences. Both are configurable.
- CAM_i = 1 - CAS_i.
- score_i = alpha * norm(HMG)_i + (1 - alpha) * norm(CAM)_i, alpha = 0.8 by default,
  CAM normalised over the samples that have one. A sample without CAM (no context
  region, or an all-zero attention vector) is scored by norm(HMG)_i alone: the same
  [0, 1] scale, neither rewarded nor punished for the missing term, and never given
  another sample's value.

min-max normalisation: (x - min) / (max - min) over the finite values; NaN stays NaN; a
constant column (max == min, including a single sample) maps to 0, since no sample
stands out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

ImportanceNorm = Literal["softmax", "minmax"]
IMPORTANCE_NORMS = ("softmax", "minmax")


@dataclass(frozen=True)
class ScoreConfig:
    alpha: float = 0.8
    importance: ImportanceNorm = "softmax"
    importance_temperature: float = 1.0

    def validate(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.importance not in IMPORTANCE_NORMS:
            raise ValueError(
                f"importance must be one of {IMPORTANCE_NORMS}, got {self.importance!r}"
            )
        if not self.importance_temperature > 0:
            raise ValueError(
                f"importance_temperature must be > 0, got {self.importance_temperature}"
            )

    def to_dict(self) -> dict:
        return {
            "alpha": self.alpha,
            "importance": self.importance,
            "importance_temperature": self.importance_temperature,
        }


def minmax(values: np.ndarray) -> np.ndarray:
    """Min-max over the finite entries (see the module docstring)."""
    values = np.asarray(values, dtype=np.float64)
    out = np.full(values.shape, np.nan)
    finite = np.isfinite(values)
    if not finite.any():
        return out
    low, high = values[finite].min(), values[finite].max()
    out[finite] = 0.0 if high == low else (values[finite] - low) / (high - low)
    return out


def segment_importance(segment_nll: np.ndarray, config: ScoreConfig) -> np.ndarray:
    """Importance distribution (sums to 1) from the segments' mean response NLL
    (= log PPL): lower perplexity, more important."""
    nll = np.asarray(segment_nll, dtype=np.float64)
    if nll.size == 0 or not np.isfinite(nll).all():
        raise ValueError(f"segment NLLs must be finite and non-empty, got {nll.tolist()}")
    if config.importance == "softmax":
        logits = -nll / config.importance_temperature
        weights = np.exp(logits - logits.max())  # shifted: no overflow
    else:
        low, high = nll.min(), nll.max()
        weights = np.ones_like(nll) if high == low else (high - nll) / (high - low)
    return weights / weights.sum()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity; NaN when either vector is zero."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    norms = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / norms) if norms > 0 else float("nan")


def contextual_awareness(
    segment_nll: np.ndarray, attention: np.ndarray, config: ScoreConfig
) -> float:
    """CAS of one sample: cosine(importance, attention / sum(attention)); NaN for a
    sample without segments or with no attention on them."""
    attention = np.asarray(attention, dtype=np.float64)
    if attention.size == 0:
        return float("nan")
    if attention.size != np.asarray(segment_nll).size or not np.isfinite(attention).all():
        raise ValueError(
            f"{attention.size} attention values for {np.asarray(segment_nll).size} segments "
            f"(values {attention.tolist()[:8]}...): they must match and be finite"
        )
    total = attention.sum()
    if total <= 0:
        return float("nan")
    return cosine(segment_importance(segment_nll, config), attention / total)


@dataclass
class DatasetScores:
    """Per-sample columns, index-aligned (NaN: does not exist)."""

    ppl_a: np.ndarray
    ppl_b: np.ndarray
    hmg: np.ndarray
    cas: np.ndarray
    cam: np.ndarray
    score: np.ndarray

    @property
    def without_cam(self) -> int:
        """Scored samples that have no CAM (scored by HMG alone)."""
        return int((np.isfinite(self.score) & ~np.isfinite(self.cam)).sum())


def dataset_scores(
    nll_a: np.ndarray, nll_b: np.ndarray, cas: np.ndarray, config: ScoreConfig
) -> DatasetScores:
    """All columns from the per-sample response NLLs under A and B and the CAS values."""
    config.validate()
    ppl_a = np.exp(np.asarray(nll_a, dtype=np.float64))
    ppl_b = np.exp(np.asarray(nll_b, dtype=np.float64))
    hmg = minmax(ppl_a) - minmax(ppl_b)
    cas = np.asarray(cas, dtype=np.float64)
    cam = 1.0 - cas
    norm_hmg, norm_cam = minmax(hmg), minmax(cam)
    combined = config.alpha * norm_hmg + (1.0 - config.alpha) * norm_cam
    score = np.where(np.isfinite(cam), combined, norm_hmg)
    return DatasetScores(ppl_a, ppl_b, hmg, cas, cam, score)
