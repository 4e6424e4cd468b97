"""Append-only records: a kill's torn last line is ignored and cut; damage is an error."""

from __future__ import annotations

import json

import pytest

from megatron_longalign.utils.jsonl_records import (
    RecordAppender,
    RecordsFileError,
    iter_records,
    read_records,
)


def test_round_trip_and_missing_file(tmp_path):
    path = tmp_path / "sub" / "r.jsonl"
    assert read_records(path) == []
    with RecordAppender(path) as out:
        out.append({"key": "a", "v": 1})
        out.append({"key": "b", "text": "中文"})
    assert read_records(path) == [{"key": "a", "v": 1}, {"key": "b", "text": "中文"}]


def test_torn_last_line_is_ignored_then_cut_by_the_next_writer(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"key": "a"}) + "\n" + '{"key": "b", "v"')  # killed mid-write
    assert read_records(path) == [{"key": "a"}]
    with RecordAppender(path) as out:
        out.append({"key": "c"})
    assert path.read_text().splitlines() == ['{"key": "a"}', '{"key": "c"}']
    assert read_records(path) == [{"key": "a"}, {"key": "c"}]


@pytest.mark.parametrize("line", ["{not json", "[1, 2]"])
def test_a_damaged_complete_line_names_file_and_line(tmp_path, line):
    path = tmp_path / "r.jsonl"
    path.write_text('{"key": "a"}\n' + line + "\n")
    with pytest.raises(RecordsFileError, match=r"r\.jsonl:2"):
        read_records(path)


def test_line_separators_inside_a_text_do_not_split_a_record(tmp_path):
    """Records are written with ensure_ascii=False: U+2028, U+0085 and friends reach the
    file raw and must not be taken for line ends (str.splitlines() would)."""
    path = tmp_path / "r.jsonl"
    text = "para one\u2028para two\x85three\x1cfour"
    with RecordAppender(path) as out:
        out.append({"key": "a", "text": text})
        out.append({"key": "b"})
    assert read_records(path) == [{"key": "a", "text": text}, {"key": "b"}]
    assert list(iter_records(path)) == read_records(path)


def test_a_line_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"key": "a"}\n{"key": "\xff"}\n')
    with pytest.raises(RecordsFileError, match=r"r\.jsonl:2"):
        read_records(path)
