"""Parse and validate one chat record (one JSONL line) into a `Conversation`.

Two input schemas are accepted:
- OpenAI / LongAlign: ``{"messages": [{"role": "system|user|assistant", "content": str}]}``
- ShareGPT: ``{"conversations": [{"from": "system|human|gpt", "value": str}]}``

Every rejection raises `BadSample` with a stable machine-readable `reason` (used for
counting drops) and a human message (used in errors and the rejects file).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

SYSTEM, USER, ASSISTANT = "system", "user", "assistant"

# Stable reason codes: they appear in P.json and P.rejects.jsonl.
BAD_INPUT_REASONS = (
    "invalid_utf8",
    "invalid_json",
    "bad_schema",
    "missing_role",
    "unknown_role",
    "missing_content",
    "non_string_content",
    "empty_content",
    "no_assistant_turn",
    "non_alternating",
)

_ROLE_ALIASES = {
    "system": SYSTEM,
    "user": USER,
    "human": USER,
    "assistant": ASSISTANT,
    "gpt": ASSISTANT,
    "chatgpt": ASSISTANT,
    "bot": ASSISTANT,
}

# (list key, role key, content key) per accepted schema.
_SCHEMAS = (("messages", "role", "content"), ("conversations", "from", "value"))


class BadSample(ValueError):
    """A record that cannot be turned into a training sample."""

    def __init__(self, reason: str, message: str) -> None:
        assert reason in BAD_INPUT_REASONS, reason
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Turn:
    role: str  # one of SYSTEM, USER, ASSISTANT
    content: str


@dataclass(frozen=True)
class Conversation:
    turns: tuple[Turn, ...]

    @property
    def system(self) -> str | None:
        return self.turns[0].content if self.turns and self.turns[0].role == SYSTEM else None

    def rounds(self) -> list[tuple[str, str]]:
        """(user, assistant) pairs in order; the system turn is not part of any round."""
        body = [t for t in self.turns if t.role != SYSTEM]
        return [(body[i].content, body[i + 1].content) for i in range(0, len(body), 2)]


def decode_line(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadSample(
            "invalid_utf8", f"invalid UTF-8 at byte {err.start}: {raw[err.start : err.end]!r}"
        ) from None


def parse_json_line(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise BadSample("invalid_json", f"invalid JSON: {err.msg} (column {err.colno})") from None


def conversation_from_record(record: Any) -> Conversation:
    """Validate a decoded JSON value and return its conversation."""
    if not isinstance(record, dict):
        raise BadSample("bad_schema", f"expected a JSON object, got {type(record).__name__}")
    for list_key, role_key, content_key in _SCHEMAS:
        if list_key in record:
            return _parse_turns(record[list_key], list_key, role_key, content_key)
    raise BadSample(
        "bad_schema",
        'expected a "messages" list (OpenAI/LongAlign style) or a "conversations" list '
        f"(ShareGPT style); found keys {sorted(record)[:8]}",
    )


def parse_conversation(raw: bytes) -> Conversation:
    """bytes of one JSONL line -> validated Conversation (raises BadSample)."""
    return conversation_from_record(parse_json_line(decode_line(raw)))


def _parse_turns(items: Any, list_key: str, role_key: str, content_key: str) -> Conversation:
    if not isinstance(items, list) or not items:
        raise BadSample("bad_schema", f'"{list_key}" must be a non-empty list')
    turns = []
    for index, item in enumerate(items):
        where = f"{list_key}[{index}]"
        if not isinstance(item, dict):
            raise BadSample("bad_schema", f"{where} must be an object")
        if role_key not in item:
            raise BadSample("missing_role", f'{where} has no "{role_key}"')
        raw_role = item[role_key]
        role = _ROLE_ALIASES.get(raw_role.lower()) if isinstance(raw_role, str) else None
        if role is None:
            raise BadSample(
                "unknown_role",
                f"{where} has unknown {role_key} {raw_role!r} "
                f"(expected one of {sorted(_ROLE_ALIASES)})",
            )
        if content_key not in item:
            raise BadSample("missing_content", f'{where} has no "{content_key}"')
        content = item[content_key]
        if not isinstance(content, str):
            raise BadSample(
                "non_string_content",
                f"{where} {content_key} must be a string, got {type(content).__name__}",
            )
        if not content.strip():
            raise BadSample("empty_content", f"{where} ({role}) has empty {content_key}")
        turns.append(Turn(role, content))
    _check_order(turns, list_key)
    return Conversation(tuple(turns))


def _check_order(turns: list[Turn], list_key: str) -> None:
    """Optional leading system turn, then user/assistant strictly alternating, ending on
    an assistant turn (a trailing user turn would have no answer to learn from)."""
    if not any(t.role == ASSISTANT for t in turns):
        raise BadSample("no_assistant_turn", "conversation has no assistant turn")
    start = 1 if turns[0].role == SYSTEM else 0
    for offset, turn in enumerate(turns[start:]):
        expected = USER if offset % 2 == 0 else ASSISTANT
        if turn.role != expected:
            raise BadSample(
                "non_alternating",
                f"{list_key}[{start + offset}] is {turn.role!r} but {expected!r} was expected "
                "(an optional system turn first, then user/assistant alternating)",
            )
    if turns[-1].role != ASSISTANT:
        raise BadSample(
            "non_alternating",
            f"{list_key}[{len(turns) - 1}] is a trailing user turn with no assistant reply",
        )
