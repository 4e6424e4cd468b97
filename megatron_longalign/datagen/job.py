"""One job through the model: the LongAlign procedure for one document (copy).

1. Draw the task type from an RNG seeded by (seed, job key): the choice depends on
   nothing else, so concurrency and processing order do not change the data.
2. Ask for NUM_QUESTIONS questions with that task's prompt in the document's language;
   parse strictly (parsing.parse_questions); drop near-duplicates.
3. Draw one of the remaining questions from the same RNG.
4. Ask for the answer given the document; check it (not empty, no refusal, not cut off).
A reply that fails its check is asked again, up to `max_attempts` times per step (the
cache salt makes each attempt a new request); then the job is rejected with the reason
and the last raw output. An endpoint that fails (ChatAPIError, after the client's HTTP
retries) is not the document's fault: it propagates and stops the run.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from megatron_longalign.datagen.language import detect_language
from megatron_longalign.datagen.parsing import (
    TRUNCATED,
    Malformed,
    check_answer,
    drop_near_duplicates,
    parse_questions,
)
from megatron_longalign.datagen.prompts import TASK_TYPES, question_request, sample_prompt
from megatron_longalign.datagen.selection import Job
from megatron_longalign.datagen.settings import GenerationSettings
from megatron_longalign.utils.chat_api import ChatClient, ChatReply

T = TypeVar("T")
QUESTIONS_STAGE, ANSWER_STAGE = "questions", "answer"


@dataclass
class JobOutcome:
    """Exactly one of `sample` and `reject` is set: the record to append."""

    key: str
    sample: dict[str, Any] | None = None
    reject: dict[str, Any] | None = None
    usage: dict[str, int] = field(
        default_factory=lambda: {"prompt_tokens": 0, "completion_tokens": 0}
    )


class _Rejected(Exception):
    def __init__(self, stage: str, error: Malformed, raw: str, attempts: int) -> None:
        super().__init__(str(error))
        self.stage, self.error, self.raw, self.attempts = stage, error, raw, attempts


def job_rng(seed: int, key: str) -> random.Random:
    # A string seed is hashed with SHA-512 by `random`: stable across runs and processes.
    return random.Random(f"self-instruct\0{seed}\0{key}")


def _questions_check(reply: ChatReply) -> list[str]:
    if reply.finish_reason == "length":
        raise Malformed(TRUNCATED, "the question list was cut off at the output token limit")
    return parse_questions(reply.text)


def _ask(
    client: ChatClient,
    content: str,
    check: Callable[[ChatReply], T],
    settings: GenerationSettings,
    stage: str,
    outcome: JobOutcome,
) -> tuple[T, int]:
    """check(reply) of the first usable reply and the attempts it took, or _Rejected."""
    messages = [{"role": "user", "content": content}]
    for attempt in range(1, settings.max_attempts + 1):
        reply = client.chat(
            messages,
            temperature=settings.temperature,
            max_tokens=settings.max_output_tokens,
            cache_salt="" if attempt == 1 else f"attempt{attempt}",
        )
        outcome.usage["prompt_tokens"] += reply.prompt_tokens
        outcome.usage["completion_tokens"] += reply.completion_tokens
        try:
            return check(reply), attempt
        except Malformed as error:
            if attempt == settings.max_attempts:
                raise _Rejected(stage, error, reply.text, attempt) from None
    raise AssertionError("unreachable")


def run_job(client: ChatClient, job: Job, settings: GenerationSettings) -> JobOutcome:
    """The sample (or the reject) for `job`."""
    rng = job_rng(settings.seed, job.key)
    task_type = rng.choice(TASK_TYPES)
    language = detect_language(job.document.text)
    outcome = JobOutcome(job.key)
    meta: dict[str, Any] = {
        "job": job.key,
        "document_id": job.document.id,
        "copy": job.copy,
        "document_tokens": job.tokens,
        "language": language,
        "task_type": task_type,
        "generator_model": settings.model,
        "seed": settings.seed,
        "prompts_version": settings.prompts_version,
        "near_duplicates_dropped": 0,
    }
    text = job.document.text
    try:
        request = question_request(text, task_type, language)
        questions, asked = _ask(
            client, request, _questions_check, settings, QUESTIONS_STAGE, outcome
        )
        unique, meta["near_duplicates_dropped"] = drop_near_duplicates(questions)
        question = unique[rng.randrange(len(unique))]
        meta.update(questions=questions, question_index=questions.index(question))
        answer_check = lambda reply: check_answer(reply.text, reply.finish_reason)  # noqa: E731
        answer, answered = _ask(
            client, sample_prompt(text, question), answer_check, settings, ANSWER_STAGE, outcome
        )
    except _Rejected as rejected:
        outcome.reject = {
            **meta,
            "stage": rejected.stage,
            "reason": rejected.error.reason,
            "message": str(rejected.error),
            "attempts": rejected.attempts,
            "raw": rejected.raw,
            "usage": outcome.usage,
        }
        return outcome
    meta.update(attempts={QUESTIONS_STAGE: asked, ANSWER_STAGE: answered}, usage=outcome.usage)
    outcome.sample = {
        "messages": [
            {"role": "user", "content": sample_prompt(text, question)},
            {"role": "assistant", "content": answer},
        ],
        "meta": meta,
    }
    return outcome
