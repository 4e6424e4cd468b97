"""LongBench scores from the generated predictions: per task, per language, overall, and
(LongBench-E) per length bucket; as JSON and as a markdown table.

Scores are recomputed from the stored predictions and the dataset's answers every time,
so a summary always reflects the current metric code and data, never stale per-case
numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import fmean
from typing import Any

from megatron_longalign.eval.longbench_data import TaskData, case_key
from megatron_longalign.eval.longbench_metrics import sample_score
from megatron_longalign.eval.longbench_tasks import LANGUAGES

# LongBench-E's length buckets (eval.py scorer_e): `length` counts words for English and
# code, characters for Chinese.
LENGTH_BUCKETS: tuple[tuple[str, int | None], ...] = (
    ("0-4k", 4000),
    ("4-8k", 8000),
    ("8k+", None),
)
CHAT_TEMPLATE_NOTE = (
    "as LongBench's pred.py: trec, triviaqa, samsum, lsht, lcc and repobench-p are "
    "prompted without the chat template (BOS + text), every other task inside it"
)


def length_bucket(length: int) -> str:
    for name, below in LENGTH_BUCKETS:
        if below is None or length < below:
            return name
    raise AssertionError("the last bucket is open")


def _percent(scores: Sequence[float]) -> float | None:
    return 100 * fmean(scores) if scores else None


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return fmean(present) if present else None


def score_task(data: TaskData, records: dict[str, dict[str, Any]], longbench_e: bool) -> dict:
    """One task's entry of the summary; every sample must have a record."""
    task = data.task
    per_bucket: dict[str, list[float]] = {name: [] for name, _ in LENGTH_BUCKETS}
    scores, truncated = [], 0
    for sample in data.samples:
        record = records[case_key(data.dataset, sample)]
        score = sample_score(
            task.metric,
            record["prediction"],
            sample["answers"],
            all_classes=sample["all_classes"],
            first_line_only=task.first_line_only,
        )
        scores.append(score)
        per_bucket[length_bucket(sample["length"])].append(score)
        truncated += int(record.get("truncated_tokens", 0) > 0)
    entry: dict[str, Any] = {
        "dataset": data.dataset,
        "metric": task.metric,
        "language": task.language,
        "category": task.category,
        "samples": len(scores),
        "score": _percent(scores),
        "truncated_prompts": truncated,
    }
    if longbench_e:
        entry["length_buckets"] = {
            name: {"score": _percent(values), "samples": len(values)}
            for name, values in per_bucket.items()
        }
    return entry


def summarize(
    tasks: Sequence[TaskData], records: dict[str, dict[str, Any]], longbench_e: bool
) -> dict[str, Any]:
    """The whole summary. Averages are plain means of task scores (each task counts once);
    a language with no evaluated task has average null."""
    entries = {data.task.name: score_task(data, records, longbench_e) for data in tasks}
    averages = {
        language: _mean([e["score"] for e in entries.values() if e["language"] == language])
        for language in LANGUAGES
    }
    averages["overall"] = _mean([e["score"] for e in entries.values()])
    summary: dict[str, Any] = {
        "benchmark": "LongBench-E" if longbench_e else "LongBench",
        "tasks": entries,
        "averages": averages,
        "chat_template": CHAT_TEMPLATE_NOTE,
    }
    if longbench_e:
        summary["length_bucket_averages"] = {
            name: _mean([e["length_buckets"][name]["score"] for e in entries.values()])
            for name, _ in LENGTH_BUCKETS
        }
    return summary


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def render_markdown(summary: dict[str, Any]) -> str:
    """The summary as a markdown table (scores in percent, two decimals)."""
    buckets = [name for name, _ in LENGTH_BUCKETS] if "length_bucket_averages" in summary else []
    header = ["task", "language", "category", "metric", "samples", "score", *buckets]
    lines = [f"# {summary['benchmark']}", "", "| " + " | ".join(header) + " |"]
    lines.append("|" + "---|" * len(header))
    for name, e in summary["tasks"].items():
        row = [name, e["language"], e["category"], e["metric"], str(e["samples"])]
        row.append(_cell(e["score"]))
        row += [_cell(e["length_buckets"][b]["score"]) for b in buckets]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "| average | score |", "|---|---|"]
    for name, value in summary["averages"].items():
        lines.append(f"| {name} | {_cell(value)} |")
    for name, value in summary.get("length_bucket_averages", {}).items():
        lines.append(f"| length {name} | {_cell(value)} |")
    lines += ["", f"Chat template: {summary['chat_template']}.", ""]
    return "\n".join(lines)
