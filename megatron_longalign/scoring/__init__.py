"""Forward-only scoring of documents under a checkpoint (GATEAU's engine): per-token NLL
and, for probed documents, attention mass per key segment, at any TP / PP / CP layout.

- documents: ScoringDocument / DocumentResult, packing into THD micro-batches, the NLL
  shift, the attention probe's request
- engine: ScoringEngine (the model, the schedule, the CP gather and PP broadcast)
"""

from megatron_longalign.scoring.documents import DocumentResult, ScoringDocument
from megatron_longalign.scoring.engine import ScoringEngine, ScoringError

__all__ = ["DocumentResult", "ScoringDocument", "ScoringEngine", "ScoringError"]
