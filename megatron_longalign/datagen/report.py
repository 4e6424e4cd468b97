"""The run summary as a few lines for the console (the JSON file has everything)."""

from __future__ import annotations

from typing import Any


def _reasons(counts: dict[str, int]) -> str:
    total = sum(counts.values())
    if not total:
        return "0"
    return f"{total} (" + ", ".join(f"{k} {v}" for k, v in counts.items()) + ")"


def format_summary(summary: dict[str, Any]) -> str:
    docs, run, out = summary["documents"], summary["this_run"], summary["output"]
    usage = run["usage"]
    return "\n".join(
        [
            f"status: {summary['status']}",
            f"documents: {docs['read']} read, {docs['too_short']} too short, "
            f"{docs['too_long']} too long, {docs['kept']} kept, "
            f"+{docs['upsampled_copies']} upsampled copies = {docs['jobs']} jobs",
            f"this run: {run['generated']} generated, rejected {_reasons(run['rejected'])}, "
            f"{run['skipped_done']} already done, {run['not_run']} not run (--limit), "
            f"{run['near_duplicate_questions_dropped']} near-duplicate questions dropped",
            f"this run's API usage: {usage['requests']} requests ({usage['cached']} from the "
            f"cache), {usage['prompt_tokens']} prompt + {usage['completion_tokens']} "
            f"completion tokens, cost {run['cost']:.4f}",
            f"output: {out['samples']} samples, rejected {_reasons(out['rejected'])}, "
            f"{out['missing_jobs']} jobs missing, {out['prompt_tokens']} prompt + "
            f"{out['completion_tokens']} completion tokens behind it, cost {out['cost']:.4f}",
        ]
    )
