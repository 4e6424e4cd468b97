"""LongBench (v1) runner: the `longbench` subcommand of tools/evaluate.py.

    data files (checked in full) -> pending cases (resume by key) -> Generator ->
    results.jsonl (one durable line per case) -> summary.json + summary.md

Every case is appended as soon as the generator yields it, so a killed run loses at most
the cases in flight and a rerun generates only what is missing; the summary is written
only when every selected case has a prediction. The model is loaded only when something
is left to generate, and only after every data file has been checked.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from megatron_longalign.eval.generation import (
    GenerationRequest,
    Generator,
    build_generator,
    generation_options_from_args,
)
from megatron_longalign.eval.longbench_data import (
    LongBenchInputError,
    TaskData,
    case_key,
    load_tasks,
    parse_task_names,
)
from megatron_longalign.eval.longbench_metrics import sample_score
from megatron_longalign.eval.longbench_summary import render_markdown, summarize
from megatron_longalign.eval.longbench_tasks import LONGBENCH_E_TASK_NAMES, TASK_NAMES
from megatron_longalign.utils.atomic_files import replace_text_atomically
from megatron_longalign.utils.jsonl_records import RecordAppender, RecordsFileError, read_records

RESULTS_FILE = "results.jsonl"
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"


class LongBenchIncompleteError(RuntimeError):
    """The generator finished without a prediction for some cases (a rerun resumes them)."""


def read_results(path: Path) -> dict[str, dict[str, Any]]:
    """The finished cases of a results file by key (a torn last line is ignored)."""
    records: dict[str, dict[str, Any]] = {}
    for number, record in enumerate(read_records(path), 1):
        if not isinstance(record.get("key"), str) or not isinstance(record.get("prediction"), str):
            raise RecordsFileError(f"{path}: record {number} lacks a string 'key'/'prediction'")
        records[record["key"]] = record
    return records


def pending_requests(
    tasks: Sequence[TaskData], done: dict[str, dict[str, Any]]
) -> dict[str, tuple[TaskData, dict[str, Any], GenerationRequest]]:
    """The cases without a result, by key, with the request that generates each."""
    pending = {}
    for data in tasks:
        for sample in data.samples:
            key = case_key(data.dataset, sample)
            if key not in done:
                prompt = data.task.format_prompt(sample)
                pending[key] = (
                    data,
                    sample,
                    GenerationRequest(
                        key=key,
                        prompt=prompt,
                        max_new_tokens=data.task.max_new_tokens,
                        # LongBench prompts its few-shot and code tasks without the
                        # chat template
                        raw=data.task.raw_prompt,
                    ),
                )
    return pending


def generate_cases(
    pending: dict[str, tuple[TaskData, dict[str, Any], GenerationRequest]],
    generator: Generator,
    results_path: Path,
    done: dict[str, dict[str, Any]],
) -> None:
    """Generates the pending cases, appending each result as it arrives (and to `done`)."""
    requests = [request for _, _, request in pending.values()]
    with RecordAppender(results_path) as appender:
        for generation in generator.generate(requests, desc="LongBench"):
            if generation.key not in pending or generation.key in done:
                raise RuntimeError(f"generator returned an unexpected case {generation.key!r}")
            data, sample, _ = pending[generation.key]
            record = {
                "key": generation.key,
                "dataset": data.dataset,
                "_id": sample["_id"],
                "prediction": generation.text,
                "answers": sample["answers"],
                # Per-case score for reading the file; the summary recomputes it.
                "score": sample_score(
                    data.task.metric,
                    generation.text,
                    sample["answers"],
                    all_classes=sample["all_classes"],
                    first_line_only=data.task.first_line_only,
                ),
                "prompt_tokens": generation.prompt_tokens,
                "completion_tokens": generation.completion_tokens,
                "truncated_tokens": generation.truncated_tokens,
            }
            appender.append(record)
            done[generation.key] = record


def run_longbench(
    data_dir: str | Path,
    output_dir: str | Path,
    make_generator: Callable[[], Generator],
    tasks: Sequence[str] | None = None,
    longbench_e: bool = False,
) -> dict[str, Any]:
    """Runs (or resumes) LongBench and returns the summary it wrote.

    `make_generator` is called only when cases are left to generate; the runner closes
    the generator it gets."""
    selected = load_tasks(data_dir, tasks, longbench_e)
    output_dir = Path(output_dir)
    results_path = output_dir / RESULTS_FILE
    done = read_results(results_path)
    pending = pending_requests(selected, done)
    if pending:
        generator = make_generator()
        try:
            generate_cases(pending, generator, results_path, done)
        finally:
            generator.close()
    missing = [key for key in pending if key not in done]
    if missing:
        raise LongBenchIncompleteError(
            f"no prediction for {len(missing)} case(s) (e.g. {missing[:3]}); "
            f"rerun to generate them, finished cases are kept in {results_path}"
        )
    summary = summarize(selected, done, longbench_e)
    summary["data_dir"] = str(data_dir)
    replace_text_atomically(
        output_dir / SUMMARY_JSON, json.dumps(summary, indent=2, ensure_ascii=False)
    )
    replace_text_atomically(output_dir / SUMMARY_MD, render_markdown(summary))
    return summary


def add_cli(subparsers: Any) -> None:
    """Adds the `longbench` subcommand (the generation options are the shared ones)."""
    parser = subparsers.add_parser(
        "longbench",
        help="LongBench (v1) / LongBench-E on local JSONL data",
        description="Generate and score LongBench from <data-dir>/<task>.jsonl "
        "(LongBench-E: <task>_e.jsonl). Reruns resume from <output>/results.jsonl.",
    )
    parser.add_argument("--data-dir", type=Path, required=True, help="LongBench's data folder")
    parser.add_argument(
        "--output", type=Path, required=True, help="output folder (results, summary)"
    )
    parser.add_argument(
        "--tasks",
        nargs="+",
        default=None,
        help="task names, space- or comma-separated (default: every task with a file). "
        f"LongBench: {', '.join(TASK_NAMES)}. LongBench-E: {', '.join(LONGBENCH_E_TASK_NAMES)}",
    )
    parser.add_argument(
        "--longbench-e",
        action="store_true",
        help="LongBench-E: the <task>_e.jsonl files, scores also per length bucket "
        "(0-4k, 4-8k, 8k+ words; characters for Chinese)",
    )
    parser.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    """0 when the summary was written, 2 on bad input, 1 when cases are still missing."""
    try:
        summary = run_longbench(
            args.data_dir,
            args.output,
            lambda: build_generator(generation_options_from_args(args)),
            tasks=parse_task_names(args.tasks),
            longbench_e=args.longbench_e,
        )
    except (LongBenchInputError, RecordsFileError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except LongBenchIncompleteError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(render_markdown(summary))
    return 0
