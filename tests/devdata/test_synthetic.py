"""Tests for the deterministic synthetic data generator."""

from __future__ import annotations

import gzip
import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_longalign.devdata import synthetic

ROOT = Path(__file__).resolve().parents[2]
MIN_WORDS, MAX_WORDS = 200, 3000
# Longest question phrasing ("What is the vault combination of the obsidian observatory?").
QUESTION_SLACK = 12

RETRIEVAL_Q = re.compile(r"^What is the (?P<attr>[a-z ]+) of the (?P<subject>[a-z]+ [a-z]+)\?$")
RETRIEVAL_A = re.compile(r"^The (?P<attr>[a-z ]+) of the (?P<subject>[a-z]+ [a-z]+) is (\d{5})\.$")
HOP_Q = re.compile(r"^What is the city where (?P<person>\w+) lives famous for\?$")
HOP_A = re.compile(
    r"^(?P<person>\w+) lives in (?P<city>\w+), and the people of (?P=city) are famous for "
    r"(?P<craft>[a-z]+ [a-z]+ [a-z]+)\.$"
)
KV_Q = re.compile(r"^What is the value of the key (?P<key>[a-z]+_[a-z]+)\?$")
KV_A = re.compile(r"^The value of the key (?P<key>[a-z]+_[a-z]+) is (?P<value>[0-9A-Z]{6})\.$")


@pytest.fixture(scope="module")
def long_samples() -> list[dict]:
    return list(synthetic.generate_long_samples(60, MIN_WORDS, MAX_WORDS, seed=7))


@pytest.fixture(scope="module")
def short_chats() -> list[dict]:
    return list(synthetic.generate_short_chats(300, seed=7))


def split_user(content: str) -> tuple[str, str]:
    """Mirror preprocessing: context and question split at the last blank line."""
    context, _, question = content.rpartition("\n\n")
    return context, question


def assert_valid(record: dict) -> None:
    assert set(record) == {"messages"}
    messages = record["messages"]
    roles = [m["role"] for m in messages]
    body = roles[1:] if roles[0] == "system" else roles
    assert "system" not in body
    assert body and len(body) % 2 == 0
    assert body == ["user", "assistant"] * (len(body) // 2)
    for message in messages:
        assert set(message) == {"role", "content"}
        assert isinstance(message["content"], str) and message["content"].strip()


def words(text: str) -> int:
    return len(text.split())


def qa_rounds(record: dict) -> list[tuple[str, str]]:
    body = [m["content"] for m in record["messages"] if m["role"] != "system"]
    return list(zip(body[::2], body[1::2], strict=True))


def first_context(record: dict) -> str:
    return split_user(qa_rounds(record)[0][0])[0]


# ------------------------------------------------------------------ determinism


def test_long_samples_deterministic_per_seed() -> None:
    a = list(synthetic.generate_long_samples(8, 100, 2000, seed=3))
    b = list(synthetic.generate_long_samples(8, 100, 2000, seed=3))
    c = list(synthetic.generate_long_samples(8, 100, 2000, seed=4))
    assert a == b
    assert a != c
    assert all(x != y for x, y in zip(a, c, strict=True))


def test_short_chats_deterministic_per_seed() -> None:
    assert list(synthetic.generate_short_chats(30, 1)) == list(
        synthetic.generate_short_chats(30, 1)
    )
    assert list(synthetic.generate_short_chats(30, 1)) != list(
        synthetic.generate_short_chats(30, 2)
    )


def test_prefix_stable_when_more_samples_requested() -> None:
    few = list(synthetic.generate_long_samples(3, 100, 1000, seed=9))
    more = list(synthetic.generate_long_samples(6, 100, 1000, seed=9))
    assert more[:3] == few


def test_global_random_state_untouched() -> None:
    random.seed(0)
    expected = random.random()
    random.seed(0)
    list(synthetic.generate_long_samples(2, 100, 500, seed=1))
    list(synthetic.generate_short_chats(5, seed=1))
    list(synthetic.tokenizer_training_text(20, seed=1))
    assert random.random() == expected


def test_vocabulary_fixed_and_pronounceable() -> None:
    vocab = synthetic.vocabulary()
    assert vocab == synthetic.vocabulary()
    assert 500 <= len(vocab) <= 700
    assert len(set(vocab)) == len(vocab)
    assert all(re.fullmatch(r"[a-z]{2,}", w) and re.search(r"[aeiou]", w) for w in vocab)


# ------------------------------------------------------------------ long samples


def test_long_structure_and_lengths(long_samples: list[dict]) -> None:
    for record in long_samples:
        assert_valid(record)
        user = qa_rounds(record)[0][0]
        context, question = split_user(user)
        assert context and question.endswith("?")
        assert "\n\n" not in question
        assert MIN_WORDS <= words(context) <= MAX_WORDS
        assert words(user) <= MAX_WORDS + QUESTION_SLACK
        # Follow-up turns carry only a question: the context is never repeated.
        for follow_up, _ in qa_rounds(record)[1:]:
            assert "\n\n" not in follow_up and words(follow_up) <= QUESTION_SLACK


def test_long_lengths_spread_log_uniformly() -> None:
    samples = synthetic.generate_long_samples(40, 100, 10_000, seed=11)
    counts = sorted(words(first_context(r)) for r in samples)
    # Log-uniform on [1e2, 1e4] has its median near 1e3; uniform would be near 5e3.
    assert counts[0] < 400 and counts[-1] > 4000
    assert 300 < counts[len(counts) // 2] < 3500


def test_long_task_mix(long_samples: list[dict]) -> None:
    questions = [qa_rounds(r)[0][0].rpartition("\n\n")[2] for r in long_samples]
    assert any(RETRIEVAL_Q.match(q) for q in questions)
    assert any(HOP_Q.match(q) for q in questions)
    assert any(KV_Q.match(q) for q in questions)
    assert all(RETRIEVAL_Q.match(q) or HOP_Q.match(q) or KV_Q.match(q) for q in questions)
    with_system = sum(r["messages"][0]["role"] == "system" for r in long_samples)
    multi_turn = sum(len(qa_rounds(r)) > 1 for r in long_samples)
    assert 0.1 < with_system / len(long_samples) < 0.5
    assert 0.05 < multi_turn / len(long_samples) < 0.4


def test_retrieval_answer_is_in_context_only(long_samples: list[dict]) -> None:
    checked = 0
    for record in long_samples:
        context = first_context(record)
        for question, answer in qa_rounds(record):
            q = RETRIEVAL_Q.match(split_user(question)[1])
            if not q:
                continue
            a = RETRIEVAL_A.match(answer)
            assert a, answer
            assert (a["attr"], a["subject"]) == (q["attr"], q["subject"])
            number = a.group(3)
            assert number in context and number not in question.rpartition("\n\n")[2]
            # The answer restates the one fact sentence that was planted in the context.
            assert context.count(answer) == 1
            checked += 1
    assert checked >= 3


def test_fact_depth_varies(long_samples: list[dict]) -> None:
    depths = []
    for record in long_samples:
        question, answer = qa_rounds(record)[0]
        if RETRIEVAL_A.match(answer):
            context = split_user(question)[0]
            depths.append(context.index(answer) / len(context))
    assert min(depths) < 0.3 and max(depths) > 0.7


def test_multi_hop_facts_present_and_far_apart(long_samples: list[dict]) -> None:
    checked = 0
    for record in long_samples:
        context = first_context(record)
        for turn, (question, answer) in enumerate(qa_rounds(record)):
            q = HOP_Q.match(split_user(question)[1])
            if not q:
                continue
            a = HOP_A.match(answer)
            assert a and a["person"] == q["person"], answer
            person_fact = f"{a['person']} lives in {a['city']}."
            city_fact = f"The people of {a['city']} are famous for {a['craft']}."
            assert context.count(person_fact) == 1
            assert context.count(city_fact) == 1
            assert a["city"] not in question.rpartition("\n\n")[2]
            if turn == 0:  # the asked-about chain is planted in opposite halves
                gap = abs(context.index(person_fact) - context.index(city_fact))
                assert gap > 0.15 * len(context)
            checked += 1
    assert checked >= 3


def test_key_value_answer_is_in_records(long_samples: list[dict]) -> None:
    checked = 0
    for record in long_samples:
        context = first_context(record)
        for question, answer in qa_rounds(record):
            q = KV_Q.match(split_user(question)[1])
            if not q:
                continue
            a = KV_A.match(answer)
            assert a and a["key"] == q["key"], answer
            assert re.search(rf"^Record \d+: {a['key']} = {a['value']}\.$", context, re.MULTILINE)
            # Keys are unique, so the question has one answer.
            assert context.count(f" {a['key']} = ") == 1
            assert a["value"] not in question.rpartition("\n\n")[2]
            checked += 1
    assert checked >= 3


def test_filler_sentence_and_paragraph_shape(long_samples: list[dict]) -> None:
    record = next(r for r in long_samples if RETRIEVAL_A.match(qa_rounds(r)[0][1]))
    paragraphs = first_context(record).split("\n\n")
    assert len(paragraphs) > 3
    for paragraph in paragraphs:
        sentences = re.findall(r"[^.]+\.", paragraph)
        assert 3 <= len(sentences) <= 8
        for sentence in sentences:
            sentence = sentence.strip()
            assert sentence[0].isupper()
            assert 6 <= words(sentence) <= 18


def test_long_generation_is_fast() -> None:
    start = time.perf_counter()
    total = sum(
        words(first_context(r)) for r in synthetic.generate_long_samples(50, 50_000, 50_000, 5)
    )
    elapsed = time.perf_counter() - start
    assert total == 50 * 50_000
    assert elapsed < 5.0


def test_long_argument_validation() -> None:
    with pytest.raises(ValueError):
        synthetic.generate_long_samples(1, 0, 10, seed=1)
    with pytest.raises(ValueError):
        synthetic.generate_long_samples(1, 100, 10, seed=1)
    with pytest.raises(ValueError):
        synthetic.generate_long_samples(-1, 10, 100, seed=1)


# ------------------------------------------------------------------ short chats


def test_short_chats_structure(short_chats: list[dict]) -> None:
    turns = set()
    for record in short_chats:
        assert_valid(record)
        total = sum(words(m["content"]) for m in record["messages"])
        assert 20 <= total <= 400
        turns.add(len(qa_rounds(record)))
    assert turns == {1, 2, 3}
    with_system = sum(r["messages"][0]["role"] == "system" for r in short_chats)
    assert 0.1 < with_system / len(short_chats) < 0.3


def short_task_kind(question: str, answer: str) -> str:
    """Classify one short round and check that its answer is right."""
    if m := re.search(r"What is (\d+) (plus|minus|times) (\d+)\?$", question):
        a, op, b = int(m[1]), m[2], int(m[3])
        result = {"plus": a + b, "minus": a - b, "times": a * b}[op]
        assert answer == f"{a} {op} {b} is {result}."
        return "arithmetic"
    if m := re.search(r"Reverse the order of this list: (.+)\.$", question):
        assert answer == f"Reversed: {', '.join(m[1].split(', ')[::-1])}."
        return "reverse"
    if m := re.search(r"Sort these words alphabetically: (.+)\.$", question):
        assert answer == f"Sorted: {', '.join(sorted(m[1].split(', ')))}."
        return "sort"
    if m := re.search(r"Copy this sentence exactly: (.+)$", question):
        assert answer == m[1]
        return "copy"
    context, q = split_user(question)
    assert context and q.endswith("?")
    assert answer in context
    return "paragraph"


def test_short_chats_answers_are_correct(short_chats: list[dict]) -> None:
    kinds = {short_task_kind(q, a) for r in short_chats for q, a in qa_rounds(r)}
    assert kinds == {"arithmetic", "reverse", "sort", "copy", "paragraph"}


def test_short_chats_include_non_ascii(short_chats: list[dict]) -> None:
    exotic = [r for r in short_chats if any(not m["content"].isascii() for m in r["messages"])]
    assert 0.01 <= len(exotic) / len(short_chats) <= 0.12


# ------------------------------------------------------------------ writing


def read_lines(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        text = handle.read()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def test_write_jsonl_messages_roundtrip(tmp_path: Path, short_chats: list[dict]) -> None:
    path = tmp_path / "nested" / "chats.jsonl"
    assert synthetic.write_jsonl(short_chats, path) == len(short_chats)
    assert read_lines(path) == short_chats
    # ensure_ascii=False: non-ASCII text is stored as UTF-8, not \u escapes.
    raw = path.read_bytes().decode("utf-8")
    assert not raw.isascii() and "\\u" not in raw
    assert [p.name for p in path.parent.iterdir()] == ["chats.jsonl"]  # no temp files left


def test_write_jsonl_sharegpt_roles(tmp_path: Path, long_samples: list[dict]) -> None:
    records = long_samples[:10] + list(synthetic.generate_short_chats(10, seed=1))
    path = tmp_path / "sharegpt.jsonl"
    assert synthetic.write_jsonl(records, path, style="sharegpt") == len(records)
    back = {"system": "system", "human": "user", "gpt": "assistant"}
    for original, written in zip(records, read_lines(path), strict=True):
        assert set(written) == {"conversations"}
        restored = [
            {"role": back[t["from"]], "content": t["value"]} for t in written["conversations"]
        ]
        assert restored == original["messages"]


def test_gzip_output_is_byte_deterministic(tmp_path: Path) -> None:
    def write(name: str) -> bytes:
        path = tmp_path / name / "long.jsonl.gz"
        records = synthetic.generate_long_samples(4, 100, 800, seed=2)
        assert synthetic.write_jsonl(records, path) == 4
        return path.read_bytes()

    first, second = write("a"), write("b")
    assert first[:2] == b"\x1f\x8b"  # really gzip
    assert first == second
    assert len(read_lines(tmp_path / "a" / "long.jsonl.gz")) == 4


def test_write_jsonl_rejects_bad_input(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    with pytest.raises(ValueError):
        synthetic.write_jsonl([], path, style="alpaca")
    path.write_text("keep me\n")
    bad = [{"messages": [{"role": "user", "content": "hi"}]}]  # no assistant reply
    with pytest.raises(ValueError):
        synthetic.write_jsonl(bad, path)
    # A failed write leaves the previous file intact and no temporary file behind.
    assert path.read_text() == "keep me\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


# ------------------------------------------------------------------ tokenizer corpus


def test_tokenizer_text_covers_vocabulary() -> None:
    lines = list(synthetic.tokenizer_training_text(300, seed=5))
    assert len(lines) == 300
    assert all(line and "\n" not in line for line in lines)
    assert lines == list(synthetic.tokenizer_training_text(300, seed=5))
    text = " ".join(lines)
    tokens = set(re.findall(r"[A-Za-z]+", text.lower()))
    assert set(synthetic.vocabulary()) <= tokens
    for phrase in ("What is the", "lives in", "famous for", "Record", "plus", "Copy this"):
        assert phrase in text
    assert not text.isascii()


# ------------------------------------------------------------------ CLI


def test_cli_writes_both_files(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        str(ROOT / "tools" / "make_synthetic.py"),
        "--output-dir",
        str(tmp_path),
        "--num-long",
        "3",
        "--num-short",
        "5",
        "--max-words",
        "1500",
        "--style",
        "sharegpt",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    assert "long.jsonl.gz" in result.stdout and "short_chat.jsonl.gz" in result.stdout
    assert len(read_lines(tmp_path / "long.jsonl.gz")) == 3
    assert "conversations" in read_lines(tmp_path / "short_chat.jsonl.gz")[0]


@pytest.mark.parametrize(
    "messages",
    [
        [],
        [{"role": "system", "content": "be brief"}],
        [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}],
        [{"role": "assistant", "content": "hello"}],
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}],
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 3}],
        [{"role": "user", "content": "hi"}, {"role": "assistant"}],
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "a"},
            {"role": "user", "content": "b"},
        ],
        # The conversation parser accepts aliases; the synthetic records use the canonical names.
        [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "hello"}],
    ],
)
def test_validate_record_rejects_malformed_chats(messages) -> None:
    with pytest.raises(ValueError):
        synthetic.validate_record({"messages": messages})


def test_validate_record_rejects_other_schemas() -> None:
    chat = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]
    for record in ({"conversations": chat}, [], {"messages": "hi"}):
        with pytest.raises(ValueError):
            synthetic.validate_record(record)
    synthetic.validate_record(
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
            ]
        }
    )
