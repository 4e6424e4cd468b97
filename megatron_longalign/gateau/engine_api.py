"""What GATEAU needs from a scoring engine.

`ScoringDocument` and `DocumentResult` are the scoring package's own
(megatron_longalign/scoring/documents.py). `Engine` is the structural type the GATEAU
code is written against, so any object with `score(documents)` will do: the real
`ScoringEngine`, or a test's fake.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from megatron_longalign.scoring.documents import DocumentResult, ScoringDocument


@runtime_checkable
class Engine(Protocol):
    """A model that scores documents: every rank of one model replica passes the same
    documents and gets one result per document, in input order."""

    def score(self, documents: Sequence[ScoringDocument]) -> list[DocumentResult]: ...


__all__ = ["DocumentResult", "Engine", "ScoringDocument"]
