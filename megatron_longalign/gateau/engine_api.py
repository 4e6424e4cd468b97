"""What GATEAU needs from a scoring engine, as the shared contract
(/work/wt/GATEAU_CONTRACT.md, section 2) defines it.

`ScoringDocument` and `DocumentResult` are defined here, field for field as the contract
says, only until the scoring package lands: at the merge this module re-exports them
from `megatron_longalign.scoring` instead. `Engine` is the structural type the GATEAU
code is written against, so any object with `score(documents)` (the real
`ScoringEngine`, or a test's fake) will do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class ScoringDocument:
    key: int  # the caller's id (unique within one score() call)
    tokens: np.ndarray  # int [L]
    loss_mask: np.ndarray  # bool [L]: token t is a target
    position_ids: np.ndarray | None = None  # default arange(L)
    probe_query_mask: np.ndarray | None = None  # bool [L]: measured query rows (None: no probe)
    probe_segments: np.ndarray | None = None  # int32 [L]: segment per key, -1 none
    num_segments: int = 0


@dataclass
class DocumentResult:
    key: int
    token_nll: np.ndarray  # float32 [L]: NaN where not loss_mask or t == 0
    attention_mass: np.ndarray | None  # float64 [num_segments] when probed

    @property
    def mean_nll(self) -> float:
        """Mean over the finite (loss-mask, t >= 1) entries; NaN if none."""
        values = np.asarray(self.token_nll, dtype=np.float64)
        finite = values[~np.isnan(values)]
        return float(finite.mean()) if finite.size else float("nan")

    @property
    def ppl(self) -> float:
        return float(np.exp(self.mean_nll))


@runtime_checkable
class Engine(Protocol):
    """A model that scores documents: every rank of one model replica passes the same
    documents and gets one result per document, in input order."""

    def score(self, documents: Sequence[ScoringDocument]) -> list[DocumentResult]: ...


__all__ = ["DocumentResult", "Engine", "ScoringDocument"]
