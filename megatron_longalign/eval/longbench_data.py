"""LongBench's local data: <dir>/<task>.jsonl (LongBench-E: <dir>/<task>_e.jsonl), one
sample per line, checked in full before anything is generated.

A sample has LongBench's fields: input, context, answers, length, dataset, language,
all_classes, _id. Every problem is a `LongBenchInputError` naming the file and line, so a
broken file costs seconds, not the hours of generation before the scoring would trip on it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_longalign.eval.longbench_metrics import gold_paragraph
from megatron_longalign.eval.longbench_tasks import (
    LONGBENCH_E_TASK_NAMES,
    TASK_NAMES,
    TASKS,
    LongBenchTask,
)

_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "input": (str,),
    "context": (str,),
    "answers": (list,),
    "length": (int,),
    "dataset": (str,),
    "language": (str,),
    "all_classes": (list, type(None)),
    "_id": (str,),
}
_INTEGER = re.compile(r"\d+")


class LongBenchInputError(ValueError):
    """A LongBench data file, task name or option is wrong; the message says where."""


@dataclass(frozen=True)
class TaskData:
    """The samples of one task, as read from `path`.

    `dataset` is the file's stem ("qasper" or, for LongBench-E, "qasper_e"): it prefixes
    the case keys, so LongBench and LongBench-E results never mix in one results file."""

    task: LongBenchTask
    dataset: str
    path: Path
    samples: list[dict[str, Any]]


def parse_task_names(values: Sequence[str] | None) -> list[str] | None:
    """Task names from the command line: space- or comma-separated; None: all found."""
    if not values:
        return None
    return [name for value in values for name in value.split(",") if name.strip()]


def _task_files(
    data_dir: Path, names: list[str] | None, longbench_e: bool
) -> list[tuple[LongBenchTask, Path]]:
    known = LONGBENCH_E_TASK_NAMES if longbench_e else TASK_NAMES
    suffix = "_e.jsonl" if longbench_e else ".jsonl"
    if names is None:
        found = [(TASKS[n], data_dir / f"{n}{suffix}") for n in known]
        found = [(task, path) for task, path in found if path.is_file()]
        if not found:
            raise LongBenchInputError(
                f"{data_dir}: no LongBench{'-E' if longbench_e else ''} file "
                f"(<task>{suffix}) for any of the tasks {', '.join(known)}"
            )
        return found
    unknown = [n for n in names if n not in known]
    if unknown:
        which = "LongBench-E" if longbench_e else "LongBench"
        raise LongBenchInputError(
            f"--tasks: unknown {which} task(s) {', '.join(unknown)}; known: {', '.join(known)}"
        )
    selected = [(TASKS[n], data_dir / f"{n}{suffix}") for n in dict.fromkeys(names)]
    missing = [str(path) for _, path in selected if not path.is_file()]
    if missing:
        raise LongBenchInputError(f"--tasks: missing data file(s): {', '.join(missing)}")
    return selected


def _check_answers(sample: dict[str, Any], task: LongBenchTask) -> str | None:
    """What is wrong with the gold answers / classes for this task's metric, or None."""
    answers = sample["answers"]
    if not answers or not all(isinstance(a, str) for a in answers):
        return "'answers' must be a non-empty list of strings"
    classes = sample["all_classes"]
    if classes is not None and not all(isinstance(c, str) for c in classes):
        return "'all_classes' must be null or a list of strings"
    if task.metric == "classification" and not classes:
        return f"{task.name} is a classification task: 'all_classes' must list the classes"
    if task.metric == "count" and not all(_INTEGER.fullmatch(a) for a in answers):
        return f"{task.name} answers must be whole numbers, got {answers!r}"
    if task.metric in ("retrieval", "retrieval_zh"):
        try:
            for answer in answers:
                gold_paragraph(answer, task.metric)
        except ValueError as err:
            return str(err)
    return None


def check_sample(sample: Any, task: LongBenchTask, dataset: str) -> str | None:
    """What is wrong with one parsed line, or None when it is a usable sample."""
    if not isinstance(sample, dict):
        return "a sample must be a JSON object"
    missing = [name for name in _FIELD_TYPES if name not in sample]
    if missing:
        return f"missing field(s) {', '.join(missing)}"
    for name, types in _FIELD_TYPES.items():
        value = sample[name]
        if not isinstance(value, types) or isinstance(value, bool):
            return f"field {name!r} has type {type(value).__name__}"
    if not sample["_id"]:
        return "'_id' is empty"
    if sample["dataset"] not in (task.name, dataset):
        return f"'dataset' is {sample['dataset']!r}, expected {dataset!r} (wrong file?)"
    return _check_answers(sample, task)


def load_task_file(path: Path, task: LongBenchTask, dataset: str) -> list[dict[str, Any]]:
    """Every sample of one file, checked; blank lines are skipped."""
    samples: list[dict[str, Any]] = []
    first_line_of: dict[str, int] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise LongBenchInputError(f"{path}: cannot read: {err}") from err
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            sample = json.loads(line)
        except json.JSONDecodeError as err:
            raise LongBenchInputError(f"{path}:{number}: not valid JSON ({err})") from err
        problem = check_sample(sample, task, dataset)
        if problem:
            raise LongBenchInputError(f"{path}:{number}: {problem}")
        if sample["_id"] in first_line_of:
            raise LongBenchInputError(
                f"{path}:{number}: _id {sample['_id']!r} already used on line "
                f"{first_line_of[sample['_id']]} (results are resumed by _id)"
            )
        first_line_of[sample["_id"]] = number
        samples.append(sample)
    if not samples:
        raise LongBenchInputError(f"{path}: no samples")
    return samples


def load_tasks(
    data_dir: str | Path, names: Sequence[str] | None = None, longbench_e: bool = False
) -> list[TaskData]:
    """The requested tasks' samples (None: every task with a file in `data_dir`), in
    LongBench's task order when found, in the requested order otherwise."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise LongBenchInputError(f"--data-dir {data_dir}: not a directory")
    selected = _task_files(data_dir, list(names) if names is not None else None, longbench_e)
    tasks = []
    for task, path in selected:
        dataset = path.name.removesuffix(".jsonl")
        tasks.append(TaskData(task, dataset, path, load_task_file(path, task, dataset)))
    return tasks


def case_key(dataset: str, sample: dict[str, Any]) -> str:
    """The results key of one case: unique across tasks and LongBench / LongBench-E."""
    return f"{dataset}/{sample['_id']}"
