"""Record validation: every bad-input class gets its own reason and a useful message."""

from __future__ import annotations

import json

import pytest

from megatron_longalign.data.conversation import (
    BAD_INPUT_REASONS,
    BadSample,
    Turn,
    parse_conversation,
)
from tests.conftest import chat


def parse(obj) -> object:
    raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return parse_conversation(raw)


# (reason, raw line, a fragment the message must contain)
BAD_LINES = [
    ("invalid_utf8", b'{"messages": "\xff\xfe"}', "invalid UTF-8 at byte 14"),
    ("invalid_json", b'{"messages": [', "invalid JSON"),
    ("invalid_json", b"not json at all", "invalid JSON"),
    ("bad_schema", b"[1, 2]", "expected a JSON object"),
    ("bad_schema", b'{"text": "hi"}', '"messages" list'),
    ("bad_schema", b'{"messages": []}', "non-empty list"),
    ("bad_schema", b'{"messages": ["hi"]}', "messages[0] must be an object"),
    ("missing_role", b'{"messages": [{"content": "hi"}]}', 'messages[0] has no "role"'),
    ("unknown_role", b'{"messages": [{"role": "tool", "content": "x"}]}', "'tool'"),
    ("unknown_role", b'{"conversations": [{"from": "robot", "value": "x"}]}', "from 'robot'"),
    ("missing_content", b'{"messages": [{"role": "user"}]}', 'has no "content"'),
    ("non_string_content", b'{"messages": [{"role": "user", "content": 3}]}', "got int"),
    ("non_string_content", b'{"messages": [{"role": "user", "content": null}]}', "got NoneType"),
    ("empty_content", b'{"messages": [{"role": "user", "content": "  \\n"}]}', "empty content"),
    ("no_assistant_turn", json.dumps(chat("only a question")).encode(), "no assistant turn"),
    (
        "non_alternating",
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "user", "content": "b"},
                    {"role": "assistant", "content": "c"},
                ]
            }
        ).encode(),
        "messages[1] is 'user' but 'assistant' was expected",
    ),
    (
        "non_alternating",
        json.dumps(
            {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}
        ).encode(),
        "messages[0] is 'assistant'",
    ),
    ("non_alternating", json.dumps(chat("q", "a", "q2")).encode(), "trailing user turn"),
    (
        "non_alternating",
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "system", "content": "s"},
                    {"role": "assistant", "content": "a"},
                ]
            }
        ).encode(),
        "messages[1] is 'system'",
    ),
]


@pytest.mark.parametrize("reason,raw,fragment", BAD_LINES)
def test_bad_records_are_rejected_with_reason(reason, raw, fragment):
    with pytest.raises(BadSample) as info:
        parse_conversation(raw)
    assert info.value.reason == reason
    assert fragment in info.value.message


def test_every_reason_is_exercised():
    assert {reason for reason, _, _ in BAD_LINES} == set(BAD_INPUT_REASONS)


def test_openai_style_multi_turn_with_system():
    conversation = parse(chat("q1", "a1", "q2", "a2", system="be brief"))
    assert conversation.system == "be brief"
    assert conversation.rounds() == [("q1", "a1"), ("q2", "a2")]


def test_sharegpt_style_maps_roles():
    record = {
        "conversations": [
            {"from": "system", "value": "s"},
            {"from": "human", "value": "q"},
            {"from": "gpt", "value": "a"},
        ]
    }
    assert parse(record).turns == (Turn("system", "s"), Turn("user", "q"), Turn("assistant", "a"))


def test_contents_are_kept_verbatim():
    conversation = parse(chat("  spaced question \n", "\tanswer  "))
    assert conversation.rounds() == [("  spaced question \n", "\tanswer  ")]
