"""GATEAU (Si et al., EMNLP 2025): rank long instruction samples by Homologous Models'
Guidance (HMG) and Contextual Awareness Measurement (CAM), and select the top ones.

documents.py builds what is scored, scores.py is the arithmetic, shards.py/merge.py the
resumable scores files, runner.py ties them to two engines, select.py writes the
selected samples as a new preprocessed set. The engine is anything with
`score(documents)` (engine_api.py).
"""

from megatron_longalign.gateau.documents import DocumentConfig, SampleDocuments, sample_documents
from megatron_longalign.gateau.engine_api import DocumentResult, Engine, ScoringDocument
from megatron_longalign.gateau.merge import MergeSummary, merge_scores
from megatron_longalign.gateau.runner import (
    GateauError,
    RunOptions,
    check_inputs,
    score_prefix,
    score_shard,
)
from megatron_longalign.gateau.scores import ScoreConfig, dataset_scores
from megatron_longalign.gateau.select import Selection, select

__all__ = [
    "DocumentConfig",
    "DocumentResult",
    "Engine",
    "GateauError",
    "MergeSummary",
    "RunOptions",
    "SampleDocuments",
    "ScoreConfig",
    "ScoringDocument",
    "Selection",
    "check_inputs",
    "dataset_scores",
    "merge_scores",
    "sample_documents",
    "score_prefix",
    "score_shard",
    "select",
]
