"""The judge: reading a rating, asking again while it is unreadable, and its options."""

from __future__ import annotations

import argparse
from collections import Counter

import pytest

from megatron_longalign.eval.judge import (
    RATING_ATTEMPTS,
    JudgeOptionsError,
    add_judge_arguments,
    judge_client_from_args,
    parse_rating,
    rate,
)
from megatron_longalign.utils.chat_api import ChatClient
from tests.helpers.openai_server import OpenAIStub


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[[7]]", 7.0),
        ("The answer is mostly right.\nRating: [[8.5]]", 8.5),  # decimals, as float() in eval.py
        ("[[10]]", 10.0),
        ("[[1]]", 1.0),
        ("[[ 6 ]]", 6.0),
        ("[[7/10]]", 7.0),
        # the last [[...]] counts: a judge quotes the format or the examples first
        ('The format is "[[rating]]"; the examples got [[10]] and [[3]]. Mine: [[4]]', 4.0),
        ("[[3]]\nOn reflection, [[6]]", 6.0),
    ],
)
def test_parse_rating_reads_the_last_double_bracket(text: str, expected: float) -> None:
    parsed = parse_rating(text)
    assert parsed.value == expected
    assert parsed.problem is None


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[[11]]", "outside"),
        ("[[0]]", "outside"),
        ("[[10.5]]", "outside"),
        ("Rating: 7", "no [[rating]]"),
        ("", "no [[rating]]"),
        ("[7]", "no [[rating]]"),
        ("[[7]] then [[N/A]]", "not a number"),  # the last one is what counts
        ("[[-3]]", "not a number"),
        ("[[seven]]", "not a number"),
    ],
)
def test_parse_rating_rejects_what_is_not_a_rating_on_the_scale(text: str, problem: str) -> None:
    parsed = parse_rating(text)
    assert parsed.value is None
    assert problem in parsed.problem


def test_parse_rating_scale_is_a_parameter() -> None:
    assert parse_rating("[[0]]", low=0, high=1).value == 0.0
    assert parse_rating("[[2]]", low=0, high=1).value is None


def _replies_in_turn(*texts: str):
    """A stub reply function giving `texts` in turn, then the last one forever."""
    count = Counter()

    def reply(body: dict) -> str:
        count["n"] += 1
        return texts[min(count["n"], len(texts)) - 1]

    return reply


MESSAGES = [{"role": "user", "content": "rate this"}]


def test_rate_asks_again_with_a_new_request_until_the_rating_parses(tmp_path) -> None:
    with OpenAIStub(_replies_in_turn("Looks fine to me.", "[[12]]", "Rating: [[6]]")) as server:
        client = ChatClient(server.base_url, "judge", cache_path=tmp_path / "cache.jsonl")
        judged = rate(client, MESSAGES)
        assert judged.rating == 6.0
        assert judged.texts == ("Looks fine to me.", "[[12]]", "Rating: [[6]]")
        assert judged.attempts == 3 and len(judged.problems) == 2
        assert len(server.requests) == 3
        assert all(r["temperature"] == 0.0 for r in server.requests)
        # a rerun finds all three replies in the cache: nothing is asked again
        client.close()
        again = ChatClient(server.base_url, "judge", cache_path=tmp_path / "cache.jsonl")
        assert rate(again, MESSAGES) == judged
        assert len(server.requests) == 3
        assert again.usage.requests == 0 and again.usage.cached == 3
        again.close()


def test_rate_gives_up_after_five_attempts_with_no_rating(tmp_path) -> None:
    with OpenAIStub(lambda body: "I cannot rate this.") as server:
        client = ChatClient(server.base_url, "judge")
        judged = rate(client, MESSAGES)
        assert RATING_ATTEMPTS == 5
        assert judged.rating is None  # unparsed, not 0
        assert judged.attempts == 5 and len(server.requests) == 5
        assert judged.completion_tokens == 5 * 4  # the stub counts words
        client.close()


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_judge_arguments(parser)
    return parser.parse_args(argv)


def test_judge_options_build_a_client_or_none(tmp_path, monkeypatch) -> None:
    assert judge_client_from_args(_parse([]), tmp_path / "c.jsonl") is None
    with pytest.raises(JudgeOptionsError, match="--judge-model is missing"):
        judge_client_from_args(_parse(["--judge-base-url", "http://x/v1"]), None)
    with pytest.raises(JudgeOptionsError, match="--judge-base-url is missing"):
        judge_client_from_args(_parse(["--judge-model", "gpt-4"]), None)
    with pytest.raises(SystemExit):
        _parse(["--judge-concurrency", "0"])
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-test")
    args = _parse(
        ["--judge-base-url", "http://127.0.0.1:9/v1", "--judge-model", "gpt-4"]
        + ["--judge-concurrency", "3", "--judge-api-key-env", "MY_JUDGE_KEY"]
    )
    client = judge_client_from_args(args, tmp_path / "out" / "cache.jsonl")
    assert (client.base_url, client.model, client.concurrency) == (
        "http://127.0.0.1:9/v1",
        "gpt-4",
        3,
    )
    assert client._client.api_key == "sk-test"
    client.close()
