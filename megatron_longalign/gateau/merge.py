"""Raw shard records -> the final scores file (see shards.py for the layout)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from megatron_longalign.gateau.scores import (
    DatasetScores,
    ScoreConfig,
    contextual_awareness,
    dataset_scores,
)
from megatron_longalign.gateau.shards import (
    SCORES_FILE,
    SUMMARY_FILE,
    ScoresFileError,
    format_float,
    read_records,
)
from megatron_longalign.utils.atomic_files import replace_text_atomically


@dataclass
class MergeSummary:
    path: Path
    samples: int
    scored: int  # samples with a score
    without_cam: int  # scored by HMG alone (no context region, or no attention on it)
    without_context: int  # no CONTEXT region at all
    without_response: int  # no predicted response token: no score, never selected

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


def _nan(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def columns(records: list[dict[str, Any]], config: ScoreConfig) -> DatasetScores:
    """The score columns of index-ordered raw records."""
    nll_a = np.array([_nan(r["nll_a"]) for r in records])
    nll_b = np.array([_nan(r["nll_b"]) for r in records])
    cas = np.array(
        [contextual_awareness(r["segment_nll"], r["attention"], config) for r in records]
    )
    return dataset_scores(nll_a, nll_b, cas, config)


def _final_record(raw: dict[str, Any], scores: DatasetScores, i: int, source) -> dict:
    return {
        "index": int(raw["index"]),
        "source_file": None if source is None else source[0],
        "source_line": None if source is None else source[1],
        "tokens": int(raw["tokens"]),
        "segments": len(raw["segment_nll"]),
        **{
            name: format_float(float(getattr(scores, name)[i]))
            for name in ("ppl_a", "ppl_b", "hmg", "cas", "cam", "score")
        },
    }


def merge_scores(
    directory: str | os.PathLike,
    num_samples: int,
    config: ScoreConfig,
    sources: list[tuple[str, int]] | None = None,
) -> MergeSummary:
    """Write D/scores.jsonl (sorted by index) and D/summary.json from every shard of D;
    every sample 0..num_samples-1 must have a record."""
    directory = Path(directory)
    found = read_records(directory)
    missing = [i for i in range(num_samples) if i not in found]
    if missing or len(found) != num_samples:
        raise ScoresFileError(
            f"{directory}: {len(missing)} of {num_samples} samples have no score yet (first: "
            f"{missing[:5]}) or records name samples outside the set; run the scoring "
            "(it resumes) before merging"
        )
    records = [found[i] for i in range(num_samples)]
    scores = columns(records, config)
    lines = [
        json.dumps(_final_record(r, scores, i, None if sources is None else sources[i]))
        for i, r in enumerate(records)
    ]
    path = directory / SCORES_FILE
    replace_text_atomically(path, "".join(line + "\n" for line in lines))
    no_response = sum(r["nll_b"] is None for r in records)
    summary = MergeSummary(
        path=path,
        samples=num_samples,
        scored=int(np.isfinite(scores.score).sum()),
        without_cam=scores.without_cam,
        without_context=sum(not r["segment_nll"] for r in records) - no_response,
        without_response=no_response,
    )
    text = json.dumps({**summary.to_dict(), "config": config.to_dict()}, indent=2) + "\n"
    replace_text_atomically(directory / SUMMARY_FILE, text)
    return summary
