"""A whole Self-Instruct run: check everything, skip what is done, generate the rest
with bounded concurrency, append each sample or reject as it finishes, and write the
summary (also when the run stops on an endpoint error).

Order of work, cheapest checks first: the settings sidecar, the documents (every line),
the tokenizer, token counting and selection; only then any request.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from megatron_longalign.data.tokenizer import load_tokenizer
from megatron_longalign.datagen.documents import read_documents
from megatron_longalign.datagen.job import JobOutcome, run_job
from megatron_longalign.datagen.ledger import Ledger, read_ledger
from megatron_longalign.datagen.selection import Job, SelectionCounts, SelectionRules, select_jobs
from megatron_longalign.datagen.settings import (
    GenerationSettings,
    OutputFiles,
    check_settings,
    record_settings,
)
from megatron_longalign.utils.atomic_files import write_text_durably
from megatron_longalign.utils.chat_api import ChatClient, ChatUsage
from megatron_longalign.utils.jsonl_records import RecordAppender


@dataclass(frozen=True)
class Endpoint:
    base_url: str
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8
    max_retries: int = 6  # HTTP retries (429, 5xx, connection) inside the client
    timeout: float = 600.0
    price_input: float = 0.0  # per 1M prompt tokens
    price_output: float = 0.0  # per 1M completion tokens

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.price_input + completion_tokens * self.price_output) / 1e6


@dataclass(frozen=True)
class RunConfig:
    inputs: Sequence[str | os.PathLike]
    output: str | os.PathLike
    tokenizer: str | os.PathLike
    endpoint: Endpoint
    settings: GenerationSettings
    selection: SelectionRules = SelectionRules()
    limit: int | None = None  # at most this many new jobs (a pilot run)
    progress: bool = True


@dataclass
class RunTally:
    skipped_done: int = 0
    generated: int = 0
    rejected: Counter = field(default_factory=Counter)
    near_duplicates_dropped: int = 0
    not_run: int = 0


def _record(
    outcome: JobOutcome,
    samples: RecordAppender,
    rejects: RecordAppender,
    tally: RunTally,
    ledger: Ledger,
) -> None:
    if outcome.sample is not None:
        samples.append(outcome.sample)
        ledger.add_sample(outcome.sample["meta"])
        tally.generated += 1
        tally.near_duplicates_dropped += outcome.sample["meta"]["near_duplicates_dropped"]
    else:
        assert outcome.reject is not None
        rejects.append(outcome.reject)
        ledger.add_reject(outcome.reject)
        tally.rejected[outcome.reject["reason"]] += 1
        tally.near_duplicates_dropped += outcome.reject["near_duplicates_dropped"]


def run_self_instruct(config: RunConfig) -> dict[str, Any]:
    """Run (or resume) `config`; returns the summary also written to the summary file.
    Raises ChatAPIError when the endpoint fails for good (the summary says so)."""
    files = OutputFiles(Path(config.output))
    check_settings(files, config.settings)
    documents = read_documents(config.inputs)
    tokenizer = load_tokenizer(config.tokenizer)
    jobs, counts = select_jobs(documents, tokenizer, config.selection, config.progress)
    ledger = read_ledger(files.samples, files.rejects)
    todo = [job for job in jobs if job.key not in ledger.done]
    tally = RunTally(skipped_done=len(jobs) - len(todo))
    if config.limit is not None:
        tally.not_run, todo = max(0, len(todo) - config.limit), todo[: config.limit]
    record_settings(files, config.settings)
    endpoint = config.endpoint
    client = ChatClient(
        endpoint.base_url,
        config.settings.model,
        api_key_env=endpoint.api_key_env,
        max_retries=endpoint.max_retries,
        timeout=endpoint.timeout,
        concurrency=endpoint.concurrency,
        cache_path=files.cache,
    )
    status = "failed"
    try:
        with RecordAppender(files.samples) as samples, RecordAppender(files.rejects) as rejects:
            work = partial(run_job, client, settings=config.settings)
            desc = "self-instruct" if config.progress else None
            for _, outcome in client.map(work, todo, desc=desc):
                _record(outcome, samples, rejects, tally, ledger)
        status = "complete" if tally.not_run == 0 else "partial (--limit)"
    finally:
        client.close()
        summary = build_summary(config, files, counts, jobs, tally, ledger, client.usage, status)
        write_text_durably(files.summary, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary


def build_summary(
    config: RunConfig,
    files: OutputFiles,
    counts: SelectionCounts,
    jobs: Sequence[Job],
    tally: RunTally,
    ledger: Ledger,
    usage: ChatUsage,
    status: str,
) -> dict[str, Any]:
    """Every count of the run: nothing filtered or rejected goes unreported."""
    endpoint = config.endpoint
    return {
        "status": status,
        "documents": {
            "read": counts.documents,
            "too_short": counts.too_short,
            "too_long": counts.too_long,
            "kept": counts.kept,
            "upsampled_copies": counts.upsampled_copies,
            "jobs": len(jobs),
            "too_short_ids": counts.short_ids,
            "too_long_ids": counts.long_ids,
        },
        "this_run": {
            "skipped_done": tally.skipped_done,
            "generated": tally.generated,
            "rejected": dict(sorted(tally.rejected.items())),
            "near_duplicate_questions_dropped": tally.near_duplicates_dropped,
            "not_run": tally.not_run,
            "usage": usage.as_dict(),
            "cost": round(endpoint.cost(usage.prompt_tokens, usage.completion_tokens), 6),
        },
        "output": {
            **ledger.as_dict(),
            "cost": round(endpoint.cost(ledger.prompt_tokens, ledger.completion_tokens), 6),
            "missing_jobs": sum(1 for job in jobs if job.key not in ledger.done),
        },
        "settings": asdict(config.settings),
        "selection": asdict(config.selection),
        "files": {
            "samples": str(files.samples),
            "rejects": str(files.rejects),
            "cache": str(files.cache),
            "settings": str(files.settings),
        },
    }
