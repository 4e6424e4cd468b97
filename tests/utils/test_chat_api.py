"""The OpenAI-compatible client against a local server: retries on 429/5xx, the reply
cache (a rerun pays nothing twice), the concurrency limit, usage totals and errors."""

from __future__ import annotations

import threading
import time

import pytest

from megatron_longalign.utils.chat_api import ChatAPIError, ChatClient, bounded_map
from tests.helpers.openai_server import OpenAIStub, StubReply

FAST = {"retry-after-ms": "5"}


def _failing_first(statuses: list[int], text: str):
    calls = iter(statuses)

    def reply(body: dict) -> StubReply:
        status = next(calls, 200)
        return StubReply(text=text, status=status, headers=FAST)

    return reply


@pytest.mark.parametrize("statuses", [[429], [500, 503], [429, 502, 429]])
def test_retries_429_and_5xx_then_succeeds(statuses):
    with OpenAIStub(_failing_first(statuses, "hello there")) as server:
        client = ChatClient(server.base_url, "m", max_retries=4)
        reply = client.chat([{"role": "user", "content": "hi you"}])
        assert reply.text == "hello there" and not reply.cached
        assert len(server.requests) == len(statuses) + 1
        assert client.usage.requests == 1
        assert client.usage.completion_tokens == 2 and client.usage.prompt_tokens == 2


def test_gives_up_with_a_clear_error_after_the_retries():
    with OpenAIStub(lambda body: StubReply(status=503, headers=FAST)) as server:
        client = ChatClient(server.base_url, "judge-x", max_retries=2)
        with pytest.raises(ChatAPIError, match=r"judge-x.*HTTP 503"):
            client.chat([{"role": "user", "content": "q"}])
        assert len(server.requests) == 3


def test_a_client_error_is_not_retried():
    with OpenAIStub(lambda body: StubReply(status=404)) as server:
        client = ChatClient(server.base_url, "missing", max_retries=5)
        with pytest.raises(ChatAPIError, match="HTTP 404"):
            client.chat([{"role": "user", "content": "q"}])
        assert len(server.requests) == 1


def test_unreachable_endpoint():
    with OpenAIStub(lambda body: "x") as server:
        url = server.base_url
    client = ChatClient(url, "m", max_retries=1, timeout=2)
    with pytest.raises(ChatAPIError, match="unreachable"):
        client.chat([{"role": "user", "content": "q"}])


def test_cache_survives_a_new_client_and_salt_asks_again(tmp_path):
    counter = iter(range(100))
    with OpenAIStub(lambda body: f"reply {next(counter)}") as server:
        cache = tmp_path / "cache.jsonl"
        messages = [{"role": "user", "content": "rate this"}]
        first = ChatClient(server.base_url, "m", cache_path=cache)
        assert first.chat(messages).text == "reply 0"
        assert first.chat(messages).cached
        first.close()
        second = ChatClient(server.base_url, "m", cache_path=cache)
        again = second.chat(messages)
        assert again.text == "reply 0" and again.cached
        assert second.chat(messages, cache_salt="retry1").text == "reply 1"
        assert second.chat(messages, temperature=0.5).text == "reply 2"
        assert (
            ChatClient(server.base_url, "other", cache_path=cache).chat(messages).text == "reply 3"
        )
        assert len(server.requests) == 4
        assert second.usage.cached == 1 and second.usage.requests == 2


def test_bounded_map_limits_concurrency_and_returns_every_item():
    running, peak, lock = [0], [0], threading.Lock()

    def work(x: int) -> int:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.01)
        with lock:
            running[0] -= 1
        return x * x

    results = dict(bounded_map(work, range(20), 3))
    assert results == {x: x * x for x in range(20)}
    assert peak[0] == 3


def test_bounded_map_raises_after_the_running_items():
    def work(x: int) -> int:
        if x == 2:
            raise ValueError("bad item 2")
        return x

    seen = []
    with pytest.raises(ValueError, match="bad item 2"):
        for item, _ in bounded_map(work, range(5), 1):
            seen.append(item)
    assert seen == [0, 1]


def test_completions_are_cached_apart_from_chats(tmp_path):
    counter = iter(range(100))
    with OpenAIStub(lambda body: f"reply {next(counter)}") as server:
        client = ChatClient(server.base_url, "m", cache_path=tmp_path / "cache.jsonl")
        assert client.complete("2+2=", max_tokens=3).text == "reply 0"
        assert client.complete("2+2=", max_tokens=3).cached
        assert client.chat([{"role": "user", "content": "2+2="}]).text == "reply 1"
        assert [("prompt" in b, "messages" in b) for b in server.requests] == [
            (True, False),
            (False, True),
        ]
