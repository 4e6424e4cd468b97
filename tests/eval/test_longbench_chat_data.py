"""Reading the LongBench-Chat files: the public two-file layout, JSONL, inline examples,
and an error naming file, line or item, and field for every kind of damage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_longalign.eval.longbench_chat_data import (
    ChatDataError,
    ScoredAnswer,
    load_cases,
)


def _case(idx: int) -> dict:
    return {"idx": idx, "query": f"q{idx}", "prompt": f"doc {idx}\n\nq{idx}", "answer": f"ref{idx}"}


def _shots(idx: int) -> list[dict]:
    return [{"answer": f"ex{idx}-{j}", "score": s} for j, s in enumerate((10, 7, 2))]


def _write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _write_jsonl(path: Path, items: list) -> Path:
    path.write_text("".join(json.dumps(i) + "\n" for i in items), encoding="utf-8")
    return path


def test_public_layout_pairs_query_idx_with_few_shots_item_idx_minus_one(tmp_path) -> None:
    cases = _write_json(tmp_path / "test_cases.json", [_case(2), _case(1)])
    shots = _write_json(tmp_path / "few_shots.json", [_shots(1), _shots(2)])
    loaded = load_cases(cases, shots)
    assert [c.idx for c in loaded] == [2, 1]
    first = loaded[0]
    assert (first.query, first.prompt, first.answer) == ("q2", "doc 2\n\nq2", "ref2")
    assert first.few_shots == (
        ScoredAnswer("ex2-0", 10.0),
        ScoredAnswer("ex2-1", 7.0),
        ScoredAnswer("ex2-2", 2.0),
    )
    assert first.key == "2"


def test_jsonl_with_inline_few_shots(tmp_path) -> None:
    items = [{**_case(i), "few_shots": _shots(i)} for i in (1, 2, 3)]
    path = tmp_path / "lbc.jsonl"
    path.write_text(
        json.dumps(items[0]) + "\n\n" + "".join(json.dumps(i) + "\n" for i in items[1:])
    )
    loaded = load_cases(path)
    assert [c.idx for c in loaded] == [1, 2, 3]
    assert loaded[2].few_shots[1] == ScoredAnswer("ex3-1", 7.0)


def _error(tmp_path: Path, items: list, shots: list | None = None, jsonl: bool = True) -> str:
    path = (
        _write_jsonl(tmp_path / "cases.jsonl", items)
        if jsonl
        else _write_json(tmp_path / "cases.json", items)
    )
    shots_path = None if shots is None else _write_json(tmp_path / "few_shots.json", shots)
    with pytest.raises(ChatDataError) as info:
        load_cases(path, shots_path)
    return str(info.value)


def test_missing_file(tmp_path) -> None:
    with pytest.raises(ChatDataError, match="nope.json: no such file"):
        load_cases(tmp_path / "nope.json")
    cases = _write_json(tmp_path / "cases.json", [_case(1)])
    with pytest.raises(ChatDataError, match="shots.json: no such file"):
        load_cases(cases, tmp_path / "shots.json")


def test_malformed_jsonl_line_is_named(tmp_path) -> None:
    path = tmp_path / "cases.jsonl"
    path.write_text(json.dumps({**_case(1), "few_shots": _shots(1)}) + "\n{not json\n")
    with pytest.raises(ChatDataError, match=r"cases.jsonl:2: not valid JSON"):
        load_cases(path)


def test_malformed_json_file_and_not_a_list(tmp_path) -> None:
    (tmp_path / "a.json").write_text("[{")
    with pytest.raises(ChatDataError, match="a.json: not valid JSON"):
        load_cases(tmp_path / "a.json")
    _write_json(tmp_path / "b.json", {"idx": 1})
    with pytest.raises(ChatDataError, match="b.json: expected a JSON list"):
        load_cases(tmp_path / "b.json")


@pytest.mark.parametrize("field", ["idx", "query", "prompt", "answer"])
def test_missing_field_names_file_line_and_field(tmp_path, field: str) -> None:
    bad = {**_case(2), "few_shots": _shots(2)}
    del bad[field]
    message = _error(tmp_path, [{**_case(1), "few_shots": _shots(1)}, bad])
    assert f"cases.jsonl:2: field '{field}' is missing" in message


def test_json_items_are_named_by_index(tmp_path) -> None:
    bad = _case(2)
    bad["answer"] = 3
    message = _error(tmp_path, [_case(1), bad], shots=[_shots(1), _shots(2)], jsonl=False)
    assert "cases.json item 1: field 'answer' has type int" in message


def test_empty_text_and_boolean_idx_are_errors(tmp_path) -> None:
    assert "field 'query' is empty" in _error(tmp_path, [{**_case(1), "query": "  "}], [_shots(1)])
    assert "field 'idx' has type bool" in _error(tmp_path, [{**_case(1), "idx": True}], [_shots(1)])


def test_few_shot_problems_name_the_example_and_field(tmp_path) -> None:
    shots = _shots(1)
    shots[2]["score"] = 11
    message = _error(tmp_path, [_case(1)], [shots])
    assert "few_shots.json item 0 example 2: field 'score' is 11, outside 1-10" in message
    shots = _shots(1)
    del shots[1]["answer"]
    message = _error(tmp_path, [_case(1)], [shots])
    assert "few_shots.json item 0 example 1: field 'answer' is missing" in message
    message = _error(tmp_path, [{**_case(1), "few_shots": _shots(1)[:1]}])
    assert "cases.jsonl:1 field 'few_shots': expected a list of at least 2" in message
    assert "field 'few_shots' is missing" in _error(tmp_path, [_case(1)])


def test_idx_beyond_few_shots_and_repeated_idx(tmp_path) -> None:
    message = _error(tmp_path, [_case(1), _case(3)], [_shots(1), _shots(2)])
    assert "cases.jsonl:2: field 'idx' is 3, but" in message and "has 2 items" in message
    message = _error(tmp_path, [_case(1), _case(1)], [_shots(1)])
    assert "cases.jsonl:2: field 'idx' 1 repeats" in message and "cases.jsonl:1" in message


def test_empty_file_is_an_error(tmp_path) -> None:
    assert "no queries" in _error(tmp_path, [], [])
