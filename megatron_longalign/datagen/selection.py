"""Which documents become jobs: a token-length window, measured with the training
tokenizer (what the model will see, not characters or words), and optional upsampling
of long documents.

Upsampling: a document of at least `upsample_min_tokens` tokens yields `upsample_copies`
jobs instead of one. Each copy is its own job (key `id#2`, `id#3`, ...) with its own
random task and question (the choices are seeded by the job key), so the copies ask
different things about the same long text. This shifts the sample length distribution
toward the long end, where real long-context data is scarcest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from tqdm import tqdm

from megatron_longalign.data.tokenizer import TextTokenizer
from megatron_longalign.datagen.documents import Document


@dataclass(frozen=True)
class Job:
    key: str  # unique per job; keys resume and the random choices
    document: Document
    copy: int  # 1 for the first (or only) job of a document
    tokens: int


@dataclass(frozen=True)
class SelectionRules:
    min_tokens: int = 8192
    max_tokens: int = 65536
    upsample_min_tokens: int | None = None
    upsample_copies: int = 1

    def __post_init__(self) -> None:
        if self.min_tokens < 0 or self.max_tokens < self.min_tokens:
            raise ValueError(
                f"the length window {self.min_tokens}..{self.max_tokens} tokens is empty "
                "(--min-tokens must be at most --max-tokens)"
            )
        if self.upsample_copies < 1:
            raise ValueError(f"--upsample-copies must be at least 1, got {self.upsample_copies}")


@dataclass
class SelectionCounts:
    documents: int = 0
    too_short: int = 0
    too_long: int = 0
    kept: int = 0
    upsampled_copies: int = 0  # extra jobs beyond one per kept document
    short_ids: list[str] = field(default_factory=list)
    long_ids: list[str] = field(default_factory=list)


def job_key(document_id: str, copy: int) -> str:
    return document_id if copy == 1 else f"{document_id}#{copy}"


def select_jobs(
    documents: Sequence[Document],
    tokenizer: TextTokenizer,
    rules: SelectionRules,
    progress: bool = True,
) -> tuple[list[Job], SelectionCounts]:
    """The jobs for `documents` under `rules`, and what was filtered out (counted, with
    ids, never silently)."""
    counts = SelectionCounts(documents=len(documents))
    jobs: list[Job] = []
    for document in tqdm(documents, desc="counting tokens", disable=not progress):
        tokens = int(tokenizer.encode(document.text).size)
        if tokens < rules.min_tokens:
            counts.too_short += 1
            counts.short_ids.append(document.id)
            continue
        if tokens > rules.max_tokens:
            counts.too_long += 1
            counts.long_ids.append(document.id)
            continue
        counts.kept += 1
        long = rules.upsample_min_tokens is not None and tokens >= rules.upsample_min_tokens
        copies = rules.upsample_copies if long else 1
        counts.upsampled_copies += copies - 1
        jobs += [Job(job_key(document.id, c), document, c, tokens) for c in range(1, copies + 1)]
    _check_unique_keys(jobs)
    return jobs, counts


def _check_unique_keys(jobs: Sequence[Job]) -> None:
    # A document whose id looks like another's copy ("a#2" beside "a" upsampled).
    seen: dict[str, Job] = {}
    for job in jobs:
        if job.key in seen:
            raise ValueError(
                f"job key {job.key!r} of {job.document.source} collides with a copy of "
                f"{seen[job.key].document.source}; rename the document id"
            )
        seen[job.key] = job
