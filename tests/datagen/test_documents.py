"""Document readers (ids, errors naming file and line) and the selection rules (length
window in tokens of the given tokenizer, upsampling)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from megatron_longalign.datagen.documents import DocumentError, read_documents
from megatron_longalign.datagen.selection import SelectionRules, select_jobs


class WordTokenizer:
    """One token per whitespace-separated word: counts a test can see by eye."""

    def encode(self, text: str) -> np.ndarray:
        return np.zeros(len(text.split()), dtype=np.int32)


def test_directory_ids_are_relative_paths(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "two.txt").write_text("second doc", encoding="utf-8")
    (tmp_path / "one.md").write_text("first doc", encoding="utf-8")
    (tmp_path / "skip.bin").write_bytes(b"\x00")
    docs = read_documents([tmp_path])
    assert [(d.id, d.text) for d in docs] == [("b/two.txt", "second doc"), ("one.md", "first doc")]


def test_jsonl_ids_given_or_from_the_text_hash(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"id": 7, "text": "alpha"}\n\n{"text": "beta", "source": "x"}\n')
    docs = read_documents([path])
    expected_hash = "sha256:" + hashlib.sha256(b"beta").hexdigest()[:16]
    assert [d.id for d in docs] == ["7", expected_hash]
    assert docs[1].source == f"{path}:3"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"id": "a"}', "no 'text' field"),
        ('{"text": 5}', "'text' is int"),
        ('{"text": "x", "id": ""}', "'id' must be"),
        ('{"text": "x"', "not a JSON line"),
        ('["text"]', "expected a JSON object"),
    ],
)
def test_bad_lines_name_the_file_and_line(tmp_path, line, message):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(DocumentError, match=message) as caught:
        read_documents([path])
    assert f"{path}:2" in str(caught.value)


def test_repeated_ids_and_missing_inputs_are_errors(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n')
    with pytest.raises(DocumentError, match=rf"{path}:2: document id 'a' already used at {path}:1"):
        read_documents([path])
    with pytest.raises(DocumentError, match="no such file"):
        read_documents([tmp_path / "missing.jsonl"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DocumentError, match="no .txt/.md files"):
        read_documents([tmp_path / "empty"])


def test_length_window_and_upsampling(tmp_path):
    path = tmp_path / "docs.jsonl"
    lengths = {"a": 4, "b": 5, "c": 9, "d": 10, "e": 11}
    path.write_text("".join(f'{{"id": "{k}", "text": "{"w " * n}"}}\n' for k, n in lengths.items()))
    rules = SelectionRules(min_tokens=5, max_tokens=10, upsample_min_tokens=9, upsample_copies=3)
    jobs, counts = select_jobs(read_documents([path]), WordTokenizer(), rules, progress=False)
    # a (4) too short, e (11) too long; b kept once; c and d (>= 9) three times each
    assert [j.key for j in jobs] == ["b", "c", "c#2", "c#3", "d", "d#2", "d#3"]
    assert [j.copy for j in jobs] == [1, 1, 2, 3, 1, 2, 3]
    assert [j.tokens for j in jobs] == [5, 9, 9, 9, 10, 10, 10]
    assert (counts.too_short, counts.too_long, counts.kept, counts.upsampled_copies) == (1, 1, 3, 4)
    assert counts.short_ids == ["a"] and counts.long_ids == ["e"]


def test_rules_are_checked():
    with pytest.raises(ValueError, match="--min-tokens must be at most --max-tokens"):
        SelectionRules(min_tokens=10, max_tokens=5)
    with pytest.raises(ValueError, match="--upsample-copies"):
        SelectionRules(upsample_copies=0)


def test_a_document_id_that_collides_with_a_copy_is_an_error(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"id": "a", "text": "w w w"}\n{"id": "a#2", "text": "v v v"}\n')
    rules = SelectionRules(min_tokens=1, max_tokens=10, upsample_min_tokens=1, upsample_copies=2)
    with pytest.raises(ValueError, match="collides"):
        select_jobs(read_documents([path]), WordTokenizer(), rules, progress=False)
