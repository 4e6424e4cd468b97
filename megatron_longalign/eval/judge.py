"""An LLM judge that rates answers on a numeric scale: the command-line options that
choose it, and the reading of its rating (LongBench-Chat; the needle task's optional
judge).

The judge is any OpenAI-compatible chat endpoint (`utils.chat_api.ChatClient`: HTTP
retries with backoff on 429/5xx, a reply cache in the output directory, a concurrency
limit). This module adds what is specific to judging:

- `parse_rating`: the rating is the number inside the LAST `[[...]]` of the reply (the
  judge prompt asks for "[[rating]]", and a judge often quotes that format or earlier
  ratings before giving its own, so only the last one counts). Like the public
  LongBench-Chat script, which takes `float` of that number, decimals are accepted
  ("[[8.5]]" -> 8.5); "[[7/10]]" is read as 7. Anything else inside the brackets, or a
  number outside the scale (e.g. "[[11]]" on 1-10), is *unparsed*, never a guess.
- `rate`: asks again, with a fresh request (`cache_salt`), while the reply is unparsed,
  up to `RATING_ATTEMPTS` (5, as the public script) times in all; a rating still unparsed
  after that is returned as None for the caller to count and report, never scored 0.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from megatron_longalign.utils.chat_api import ChatClient

RATING_ATTEMPTS = 5
_LAST_BRACKETS = re.compile(r"\[\[(.*?)\]\]", re.DOTALL)
_NUMBER = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(?:/\s*10\s*)?")


@dataclass(frozen=True)
class ParsedRating:
    value: float | None  # None: unparsed
    problem: str | None = None  # why it is unparsed


def parse_rating(text: str, *, low: float = 1.0, high: float = 10.0) -> ParsedRating:
    """The number inside the last `[[...]]` of `text`, if it lies in [low, high]."""
    found = _LAST_BRACKETS.findall(text)
    if not found:
        return ParsedRating(None, "no [[rating]] in the reply")
    inside = found[-1]
    match = _NUMBER.fullmatch(inside)
    if match is None:
        return ParsedRating(None, f"the last [[...]] holds {inside[:40]!r}, not a number")
    value = float(match.group(1))
    if not low <= value <= high:
        return ParsedRating(None, f"rating {value:g} is outside {low:g}-{high:g}")
    return ParsedRating(value)


@dataclass(frozen=True)
class JudgedRating:
    """The outcome of asking the judge for one rating, with every reply it gave."""

    rating: float | None  # None: unparsed after every attempt
    texts: tuple[str, ...]  # the judge's replies, one per attempt, in order
    problems: tuple[str, ...]  # why each unparsed attempt was rejected
    prompt_tokens: int
    completion_tokens: int

    @property
    def attempts(self) -> int:
        return len(self.texts)


def rate(
    client: ChatClient,
    messages: list[dict],
    *,
    attempts: int = RATING_ATTEMPTS,
    low: float = 1.0,
    high: float = 10.0,
) -> JudgedRating:
    """Ask `client` (temperature 0) for a rating until one parses, at most `attempts`
    times. Attempt i > 0 carries cache_salt f"retry{i}": at temperature 0 with a reply
    cache the same request would return the same unparseable reply, and on a rerun the
    same salts find the same cached replies, so a rerun pays nothing again. Endpoint
    failures (ChatAPIError) propagate."""
    texts, problems = [], []
    prompt_tokens = completion_tokens = 0
    for attempt in range(attempts):
        reply = client.chat(
            messages, temperature=0.0, cache_salt="" if attempt == 0 else f"retry{attempt}"
        )
        texts.append(reply.text)
        prompt_tokens += reply.prompt_tokens
        completion_tokens += reply.completion_tokens
        parsed = parse_rating(reply.text, low=low, high=high)
        if parsed.value is not None:
            return JudgedRating(
                parsed.value, tuple(texts), tuple(problems), prompt_tokens, completion_tokens
            )
        problems.append(parsed.problem or "unparsed")
    return JudgedRating(None, tuple(texts), tuple(problems), prompt_tokens, completion_tokens)


# ---- command-line options ------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_judge_arguments(parser: argparse.ArgumentParser) -> None:
    """The judge's options (an OpenAI-compatible endpoint), shared by every task that
    uses a judge."""
    group = parser.add_argument_group("judge (an OpenAI-compatible chat endpoint)")
    group.add_argument(
        "--judge-base-url",
        default=None,
        help="the judge's endpoint, e.g. https://api.openai.com/v1 or a vLLM server's /v1",
    )
    group.add_argument(
        "--judge-model", default=None, help="the judge model (LongAlign's paper: gpt-4)"
    )
    group.add_argument(
        "--judge-api-key-env",
        default="OPENAI_API_KEY",
        help="environment variable holding the judge's API key (default: %(default)s); "
        "local servers started without --api-key need none",
    )
    group.add_argument(
        "--judge-concurrency",
        type=_positive_int,
        default=8,
        help="judge requests in flight at once (default: %(default)s)",
    )
    group.add_argument(
        "--judge-max-retries",
        type=int,
        default=6,
        help="HTTP retries per request on 408/409/429/5xx/connection errors, with "
        "exponential backoff (default: %(default)s)",
    )


class JudgeOptionsError(ValueError):
    """The judge options are incomplete."""


def judge_client_from_args(
    args: argparse.Namespace, cache_path: str | os.PathLike | None
) -> ChatClient | None:
    """The judge client the options describe, caching replies in `cache_path`; None when
    neither --judge-base-url nor --judge-model is given (no judge). One without the other
    is a JudgeOptionsError."""
    base_url, model = args.judge_base_url, args.judge_model
    if base_url is None and model is None:
        return None
    if base_url is None or model is None:
        missing = "--judge-base-url" if base_url is None else "--judge-model"
        raise JudgeOptionsError(
            f"the judge needs both --judge-base-url and --judge-model: {missing} is missing"
        )
    if not os.environ.get(args.judge_api_key_env):
        print(
            f"note: ${args.judge_api_key_env} is not set; the judge gets no API key "
            "(fine for a local server, a 401 from a hosted API)",
            file=sys.stderr,
        )
    if cache_path is not None:
        Path(cache_path).parent.mkdir(parents=True, exist_ok=True)
    return ChatClient(
        base_url,
        model,
        api_key_env=args.judge_api_key_env,
        max_retries=args.judge_max_retries,
        concurrency=args.judge_concurrency,
        cache_path=cache_path,
    )
