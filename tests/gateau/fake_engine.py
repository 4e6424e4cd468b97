"""A model-free stand-in for the scoring engine (the contract's `score(documents)`):
NLL is a deterministic function of each token, its predecessor and the document length
(a longer document lowers it, `scale` sets how much, so a "short-window" and a
"long-window" engine disagree on long samples); the attention mass on a segment is a
fixed function of its tokens. Every document is scored alone, so results do not depend
on how documents are batched, like the real engine's per-document attention."""

from __future__ import annotations

import numpy as np

from megatron_longalign.gateau.engine_api import DocumentResult


class FakeEngine:
    def __init__(
        self,
        scale: float,
        tokenizer_fingerprint: str | None = None,
        vocab_size: int = 640,
        fail_after_documents: int | None = None,
    ) -> None:
        self.scale = scale
        self.tokenizer_fingerprint = tokenizer_fingerprint
        self.vocab_size = vocab_size
        self.fail_after_documents = fail_after_documents
        self.documents = 0
        self.calls: list[int] = []  # documents per call

    def score(self, documents):
        if (
            self.fail_after_documents is not None
            and self.documents + len(documents) > self.fail_after_documents
        ):
            raise RuntimeError("killed (simulated)")
        self.documents += len(documents)
        self.calls.append(len(documents))
        return [self._one(doc) for doc in documents]

    def _one(self, doc) -> DocumentResult:
        tokens = np.asarray(doc.tokens, dtype=np.int64)
        previous = np.concatenate([[0], tokens[:-1]])
        raw = ((tokens * 31 + previous * 17) % 89) / 30.0 + self.scale * 200.0 / (tokens.size + 50)
        nll = np.full(tokens.size, np.nan, dtype=np.float32)
        nll[doc.loss_mask] = raw[doc.loss_mask]
        nll[0] = np.nan
        mass = None
        if doc.probe_query_mask is not None:
            mass = np.array(
                [
                    ((tokens[doc.probe_segments == s] % 7) + 1).sum() / (1000.0 + tokens.size)
                    for s in range(doc.num_segments)
                ]
            )
        return DocumentResult(doc.key, nll, mass)
