"""One client for OpenAI-compatible chat endpoints (judges, generators, served models):
a hosted API, or a vLLM / SGLang server the user runs.

Retries are the `openai` client's own: 408, 409, 429, 5xx and connection errors back off
exponentially and honour Retry-After (`max_retries` of them). What this adds:
- a reply cache, an append-only JSONL file keyed by a hash of the request, so a rerun of
  a killed or finished job pays for nothing twice;
- a concurrency limit (`map`), since long-context requests are slow and servers and
  rate limits cap what they accept at once;
- token usage totals;
- one error type, `ChatAPIError`, whose message names the endpoint, the model and what
  the server said, raised once the retries are spent.
The API key comes from the environment (`api_key_env`); local servers that need none get
a placeholder.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import openai
from tqdm import tqdm

from megatron_longalign.utils.jsonl_records import RecordAppender, read_records

T = TypeVar("T")
R = TypeVar("R")
_NO_KEY = "EMPTY"  # vLLM and SGLang accept any key unless started with --api-key


class ChatAPIError(RuntimeError):
    """The endpoint did not answer (after the retries), or refused the request."""


@dataclass(frozen=True)
class ChatReply:
    text: str
    prompt_tokens: int
    completion_tokens: int
    cached: bool
    finish_reason: str | None


@dataclass
class ChatUsage:
    requests: int = 0  # answered by the endpoint (not the cache)
    cached: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def request_key(model: str, messages: list[dict], temperature: float, max_tokens, salt: str) -> str:
    """The cache key of one request: everything that changes the reply."""
    blob = json.dumps(
        [model, messages, temperature, max_tokens, salt], ensure_ascii=False, sort_keys=True
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ChatClient:
    """Chat completions from `model` at `base_url` (e.g. http://host:8000/v1)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str = "OPENAI_API_KEY",
        max_retries: int = 6,
        timeout: float = 600.0,
        concurrency: int = 8,
        cache_path: str | os.PathLike | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        self.base_url, self.model, self.concurrency = base_url, model, concurrency
        self._client = openai.OpenAI(
            base_url=base_url,
            api_key=os.environ.get(api_key_env) or _NO_KEY,
            max_retries=max_retries,
            timeout=timeout,
        )
        self.usage = ChatUsage()
        self._lock = threading.Lock()
        self._cache: dict[str, dict[str, Any]] = {}
        self._cache_file: RecordAppender | None = None
        if cache_path is not None:
            self._cache = {r["key"]: r for r in read_records(cache_path) if "key" in r}
            self._cache_file = RecordAppender(Path(cache_path))

    def chat(
        self,
        messages: list[dict],
        *,
        temperature: float = 0.0,
        max_tokens: int | None = None,
        cache_salt: str = "",
    ) -> ChatReply:
        """The reply to `messages`, from the cache when this exact request was answered.
        `cache_salt` makes an otherwise identical request a new one (asking again)."""
        key = request_key(self.model, messages, temperature, max_tokens, cache_salt)
        return self._cached(key, lambda: self._request(messages, temperature, max_tokens))

    def complete(
        self, prompt: str, *, temperature: float = 0.0, max_tokens: int | None = None
    ) -> ChatReply:
        """A plain-text completion of `prompt` (the completions endpoint: no chat template),
        cached like `chat`."""
        key = request_key(self.model, [{"prompt": prompt}], temperature, max_tokens, "complete")
        return self._cached(key, lambda: self._request(prompt, temperature, max_tokens))

    def _cached(self, key: str, ask: Callable[[], dict[str, Any]]) -> ChatReply:
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self.usage.cached += 1
                return _reply(hit, cached=True)
        record = {"key": key, **ask()}
        with self._lock:
            self.usage.requests += 1
            self.usage.prompt_tokens += record["prompt_tokens"]
            self.usage.completion_tokens += record["completion_tokens"]
            self._cache[key] = record
            if self._cache_file is not None:
                self._cache_file.append(record)
        return _reply(record, cached=False)

    def _request(
        self, messages: list[dict] | str, temperature: float, max_tokens
    ) -> dict[str, Any]:
        """One request (a chat, or a completion when `messages` is a prompt string)."""
        where = f"{self.base_url} (model {self.model!r})"
        limit = {} if max_tokens is None else {"max_tokens": max_tokens}
        try:
            if isinstance(messages, str):
                response = self._client.completions.create(
                    model=self.model, prompt=messages, temperature=temperature, **limit
                )
            else:
                response = self._client.chat.completions.create(
                    model=self.model, messages=messages, temperature=temperature, **limit
                )
        except openai.APIStatusError as err:
            body = (err.response.text or "")[:300]
            raise ChatAPIError(
                f"{where} answered HTTP {err.status_code} (after retries where retryable): {body}"
            ) from err
        except (openai.APIConnectionError, openai.APITimeoutError) as err:
            raise ChatAPIError(f"{where} is unreachable after retries: {err}") from err
        if not response.choices:
            raise ChatAPIError(f"{where} returned no choices")
        choice, usage = response.choices[0], response.usage
        text = choice.text if isinstance(messages, str) else choice.message.content
        return {
            "text": text or "",
            "finish_reason": choice.finish_reason,
            "prompt_tokens": int(getattr(usage, "prompt_tokens", 0) or 0),
            "completion_tokens": int(getattr(usage, "completion_tokens", 0) or 0),
        }

    def map(
        self, fn: Callable[[T], R], items: Iterable[T], *, desc: str | None = None
    ) -> Iterator[tuple[T, R]]:
        """(item, fn(item)) for every item, at most `concurrency` running at once, in the
        order they finish. An exception from fn is raised once the running ones end."""
        yield from bounded_map(fn, items, self.concurrency, desc=desc)

    def close(self) -> None:
        if self._cache_file is not None:
            self._cache_file.close()
        self._client.close()


def _reply(record: dict[str, Any], cached: bool) -> ChatReply:
    return ChatReply(
        text=record["text"],
        prompt_tokens=record["prompt_tokens"],
        completion_tokens=record["completion_tokens"],
        cached=cached,
        finish_reason=record.get("finish_reason"),
    )


def bounded_map(
    fn: Callable[[T], R], items: Iterable[T], limit: int, *, desc: str | None = None
) -> Iterator[tuple[T, R]]:
    """`fn` over `items` on `limit` threads, submitting lazily (a long item list is never
    all in flight), yielding (item, result) as each finishes; tqdm bar when `desc` is given."""
    pending: dict[Future, T] = {}
    source = iter(items)
    total = len(items) if hasattr(items, "__len__") else None
    with (
        ThreadPoolExecutor(max_workers=limit) as pool,
        tqdm(total=total, desc=desc, disable=desc is None) as bar,
    ):
        error: BaseException | None = None
        while True:
            while error is None and len(pending) < limit:
                item = next(source, _END)
                if item is _END:
                    break
                pending[pool.submit(fn, item)] = item
            if not pending:
                break
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                item = pending.pop(future)
                if future.exception() is not None:
                    error = error or future.exception()
                    continue
                bar.update(1)
                yield item, future.result()
        if error is not None:
            raise error


_END: Any = object()
