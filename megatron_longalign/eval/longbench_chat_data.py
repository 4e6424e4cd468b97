"""Read and validate the LongBench-Chat benchmark files the user supplies (nothing is
downloaded).

The public benchmark (THUDM/LongAlign, `LongBench_Chat/`) is two JSON files:
- `test_cases.json`: a list of queries, each with `idx` (1-based id), `query` (the
  question alone, shown to the judge), `prompt` (the long document plus the question:
  the model's input) and `answer` (the reference answer);
- `few_shots.json`: a list whose item idx-1 holds that query's scored example answers for
  the judge, each `{"answer": str, "score": number}` (three per query).
Both field names are kept exactly. Either file may also be JSONL (one item per line).
Instead of the second file a query may carry its examples inline, in a `few_shots` field
of the same shape (one self-contained file).

Everything is checked before any generation: a problem is a `ChatDataError` naming the
file, the line (JSONL) or item index (JSON) and the field.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MIN_FEW_SHOTS = 2  # the paper's two judge calls need two different example orders
SCORE_RANGE = (1.0, 10.0)


class ChatDataError(ValueError):
    """A LongBench-Chat data file is missing or malformed."""


@dataclass(frozen=True)
class ScoredAnswer:
    answer: str
    score: float


@dataclass(frozen=True)
class ChatCase:
    idx: int
    query: str
    prompt: str
    answer: str  # the reference answer
    few_shots: tuple[ScoredAnswer, ...]

    @property
    def key(self) -> str:
        return str(self.idx)


def read_items(path: str | os.PathLike) -> list[tuple[str, Any]]:
    """(location, item) of every item of a JSON list or a JSONL file; the location names
    the file and the line (JSONL) or the item index (JSON)."""
    path = Path(path)
    if not path.is_file():
        raise ChatDataError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise ChatDataError(f"{path}: cannot be read ({err})") from err
    if path.suffix == ".jsonl":
        items = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append((f"{path}:{number}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise ChatDataError(f"{path}:{number}: not valid JSON ({err})") from err
        return items
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ChatDataError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, list):
        raise ChatDataError(f"{path}: expected a JSON list of items (or a .jsonl file)")
    return [(f"{path} item {index}", item) for index, item in enumerate(data)]


def _field(where: str, item: Any, name: str, kind: type | tuple[type, ...]) -> Any:
    if not isinstance(item, dict):
        raise ChatDataError(f"{where}: expected a JSON object, got {type(item).__name__}")
    if name not in item:
        raise ChatDataError(f"{where}: field {name!r} is missing")
    value = item[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ChatDataError(f"{where}: field {name!r} has type {type(value).__name__}")
    if isinstance(value, str) and not value.strip():
        raise ChatDataError(f"{where}: field {name!r} is empty")
    return value


def parse_few_shots(where: str, examples: Any) -> tuple[ScoredAnswer, ...]:
    """A query's scored example answers: a list of {"answer", "score"} objects."""
    if not isinstance(examples, list) or len(examples) < MIN_FEW_SHOTS:
        raise ChatDataError(
            f"{where}: expected a list of at least {MIN_FEW_SHOTS} scored example answers "
            '({"answer": ..., "score": ...})'
        )
    shots = []
    for number, example in enumerate(examples):
        at = f"{where} example {number}"
        score = float(_field(at, example, "score", (int, float)))
        if not SCORE_RANGE[0] <= score <= SCORE_RANGE[1]:
            raise ChatDataError(f"{at}: field 'score' is {score:g}, outside 1-10")
        shots.append(ScoredAnswer(_field(at, example, "answer", str), score))
    return tuple(shots)


def _case(where: str, item: Any, few_shots: tuple[ScoredAnswer, ...]) -> ChatCase:
    idx = _field(where, item, "idx", int)
    return ChatCase(
        idx=idx,
        query=_field(where, item, "query", str),
        prompt=_field(where, item, "prompt", str),
        answer=_field(where, item, "answer", str),
        few_shots=few_shots,
    )


def load_cases(
    path: str | os.PathLike, few_shots_path: str | os.PathLike | None = None
) -> list[ChatCase]:
    """Every query of `path`, with its scored examples from `few_shots_path` (the public
    few_shots.json, item idx-1) or, without it, from each query's `few_shots` field."""
    shared = read_items(few_shots_path) if few_shots_path is not None else None
    cases: list[ChatCase] = []
    seen: dict[int, str] = {}
    for where, item in read_items(path):
        idx = _field(where, item, "idx", int)
        if idx in seen:
            raise ChatDataError(f"{where}: field 'idx' {idx} repeats {seen[idx]}")
        seen[idx] = where
        if shared is None:
            examples_at, examples = (
                f"{where} field 'few_shots'",
                _field(where, item, "few_shots", list),
            )
        elif not 1 <= idx <= len(shared):
            raise ChatDataError(
                f"{where}: field 'idx' is {idx}, but {few_shots_path} has "
                f"{len(shared)} items (query idx uses item idx-1)"
            )
        else:
            examples_at, examples = shared[idx - 1]
        cases.append(_case(where, item, parse_few_shots(examples_at, examples)))
    if not cases:
        raise ChatDataError(f"{path}: no queries")
    return cases
