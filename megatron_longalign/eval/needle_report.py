"""The outputs of a needle run built from its results.jsonl: scores.csv, heatmap.png,
summary.json (each replaced atomically), and the heatmap logged to wandb when a run is
active or a project is given."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from megatron_longalign.eval.heatmap import write_heatmap
from megatron_longalign.eval.needle_grid import case_key
from megatron_longalign.utils.atomic_files import replace_text_atomically

SCORE_SCALES = {
    "recall": ((0.0, 1.0), "key-phrase recall (0-1)"),
    "judge": ((1.0, 10.0), "judge score (1-10)"),
}
CSV_COLUMNS = ("length", "depth", "score", "status", "context_tokens", "needle_depth")


def score_table(records: dict[str, dict], lengths: Sequence[int], depths: Sequence[float]):
    """scores[depth_index, length_index]; NaN where a case has no score."""
    table = np.full((len(depths), len(lengths)), np.nan)
    for row, depth in enumerate(depths):
        for col, length in enumerate(lengths):
            record = records.get(case_key(length, depth))
            if record is not None and record.get("score") is not None:
                table[row, col] = record["score"]
    return table


def write_scores_csv(path: Path, records: dict[str, dict], lengths, depths) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for length in lengths:
        for depth in depths:
            record = records.get(case_key(length, depth))
            if record is None:
                writer.writerow([length, f"{depth:g}", "", "missing", "", ""])
                continue
            score = record.get("score")
            writer.writerow(
                [
                    length,
                    f"{depth:g}",
                    "" if score is None else f"{score:g}",
                    record["status"],
                    record["context_tokens"],
                    f"{record['needle_depth']:.2f}",
                ]
            )
    replace_text_atomically(path, buffer.getvalue())


def summarize(
    records: dict[str, dict], lengths, depths, *, model: str, scorer: str
) -> dict[str, Any]:
    """Mean score over scored cases, counts per status, and where the misses are."""
    grid = [records.get(case_key(length, depth)) for length in lengths for depth in depths]
    present = [r for r in grid if r is not None]
    scored = [r["score"] for r in present if r.get("score") is not None]
    statuses = Counter(r["status"] for r in present)
    statuses["missing"] = len(grid) - len(present)
    table = score_table(records, lengths, depths)
    with warnings.catch_warnings():  # an all-NaN row or column is reported as null
        warnings.simplefilter("ignore", RuntimeWarning)
        by_length = np.nanmean(table, axis=0) if scored else np.full(len(lengths), np.nan)
        by_depth = np.nanmean(table, axis=1) if scored else np.full(len(depths), np.nan)
    return {
        "model": model,
        "scorer": scorer,
        "score_range": list(SCORE_SCALES[scorer][0]),
        "mean_score": float(np.mean(scored)) if scored else None,
        "cases": len(grid),
        "status_counts": {k: v for k, v in sorted(statuses.items()) if v},
        "truncated_cases": sum(1 for r in present if r.get("truncated_tokens", 0) > 0),
        "unscored_keys": [r["key"] for r in present if r.get("score") is None],
        "lengths": list(lengths),
        "depths": list(depths),
        "mean_by_length": {str(k): _nullable(v) for k, v in zip(lengths, by_length, strict=True)},
        "mean_by_depth": {f"{k:g}": _nullable(v) for k, v in zip(depths, by_depth, strict=True)},
    }


def _nullable(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def write_report(
    output: Path, records: dict[str, dict], lengths, depths, *, model: str, scorer: str
):
    """scores.csv, heatmap.png and summary.json in `output`; returns the summary."""
    summary = summarize(records, lengths, depths, model=model, scorer=scorer)
    write_scores_csv(output / "scores.csv", records, lengths, depths)
    score_range, label = SCORE_SCALES[scorer]
    mean = summary["mean_score"]
    mean_text = "n/a" if mean is None else f"{mean:.2f}"
    temporary = output / "heatmap.tmp.png"
    write_heatmap(
        temporary,
        lengths,
        depths,
        score_table(records, lengths, depths),
        title=f"Needle in a haystack: {model}\nmean {scorer} score {mean_text}",
        score_label=label,
        score_range=score_range,
    )
    os.replace(temporary, output / "heatmap.png")
    replace_text_atomically(output / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def log_to_wandb(
    png: Path, summary: dict, project: str | None, run_name: str, directory: Path
) -> bool:
    """Log the heatmap and mean score to the active wandb run, or to a new run of
    `project` (mode from WANDB_MODE / WANDB_API_KEY, see training/logger); False when
    neither exists."""
    import wandb

    from megatron_longalign.training.logger import resolve_wandb_mode

    active = wandb.run
    if active is None and project is None:
        return False
    run = active or wandb.init(
        project=project, name=run_name, job_type="eval", dir=str(directory),
        mode=resolve_wandb_mode("auto"), config={"task": "needle"},
    )  # fmt: skip
    values: dict[str, Any] = {"needle/heatmap": wandb.Image(str(png))}
    if summary["mean_score"] is not None:
        values["needle/mean_score"] = summary["mean_score"]
    run.log(values)
    if active is None:
        run.finish()
    return True
