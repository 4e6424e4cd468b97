"""Needle placement by text: at the requested depth (within one sentence), at a sentence
boundary, for a sentencepiece and a byte-level BPE tokenizer; the public script's
fixed-period-id search fails the same check."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from megatron_longalign.data.tokenizer import load_tokenizer
from megatron_longalign.devdata.tokenizer_training import train_hf_bpe
from megatron_longalign.eval import haystack as hs
from megatron_longalign.eval.needle import NEEDLE, NeedleSettings, make_case

REPO = Path(__file__).resolve().parents[2]
DEPTHS = [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
LENGTHS = [600, 2500]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict[str, str]:
    lines = hs.generated_haystack(60_000, seed=7).split("\n\n") + [NEEDLE]
    directory = tmp_path_factory.mktemp("bpe") / "byte_level"
    return {
        "sentencepiece": str(REPO / "data/sample/tokenizer.model"),
        "byte_level_bpe": str(train_hf_bpe(lines, directory, 700, "byte_level")),
    }


def needle_position(tokenizer, context: str) -> tuple[int, int, int]:
    """(tokens before the needle, haystack tokens, tokens up to the end of the sentence
    after the needle), from the context text alone."""
    start = context.index(NEEDLE)
    before, after = context[:start], context[start + len(NEEDLE) :]
    # the next sentence, if any, with the whitespace after it (a paragraph break is its
    # own tokens, which belong to the sentence before them)
    following = re.match(r"\s*[^.]*\.?\s*", after).group(0)
    pieces = [before, NEEDLE, following, after[len(following) :]]
    ids, bounds = tokenizer.encode_pieces(pieces)
    needle_tokens = int(bounds[2] - bounds[1])
    haystack = int(ids.size) - needle_tokens
    return int(bounds[1]), haystack, int(bounds[3]) - needle_tokens


def at_requested_depth(tokenizer, context: str, depth: float) -> bool:
    """The needle starts the sentence that holds token depth% of the haystack (one token
    of slack for rounding), right after a sentence end."""
    start = context.index(NEEDLE)
    boundary = start == 0 or context[:start].rstrip()[-1] == "."
    before, haystack, next_end = needle_position(tokenizer, context)
    target = depth / 100 * haystack
    return boundary and before <= target + 1 and target <= next_end + 1


@pytest.mark.parametrize("kind", ["sentencepiece", "byte_level_bpe"])
@pytest.mark.parametrize("length", LENGTHS)
def test_needle_lands_at_the_requested_depth(tokenizers, kind, length):
    tokenizer = load_tokenizer(tokenizers[kind])
    settings = NeedleSettings(output=Path("unused"), lengths=[length], depths=DEPTHS, seed=3)
    index = hs.haystack_with_tokens(tokenizer, hs.generated_haystack(length * 8, 3), length)
    positions = []
    for depth in DEPTHS:
        case = make_case(settings, tokenizer, index, length, depth)
        context = case.prompt.split("\n\nRead the document and answer:")[0]
        assert at_requested_depth(tokenizer, context, depth), (kind, length, depth)
        before, haystack, _ = needle_position(tokenizer, context)
        positions.append(before)
        # the record's measurements agree with this independent one
        assert case.facts["needle_token"] == before
        # cut at a word start: short by at most one word (one sentence at depth 100)
        assert -10 <= case.facts["context_tokens"] - length <= 2 or depth == 100
        assert case.facts["context_tokens"] <= length + 2
    assert positions[0] == 0
    assert context.endswith(NEEDLE)  # depth 100: the needle ends the context
    assert positions == sorted(positions) and len(set(positions)) == len(DEPTHS)


def public_fixed_id_insert(tokenizer, haystack_text: str, budget: int, depth: float) -> str:
    """THUDM/LongAlign Needle_test/prompt.py's placement, re-expressed: walk back through
    the token ids from depth% until the token 30930 (a hard-coded period id), then
    insert the needle's tokens there."""
    tokens = tokenizer.encode(haystack_text).tolist()[:budget]
    point = int(len(tokens) * depth / 100)
    while point > 0 and tokens[point - 1] != 30930:
        point -= 1
    needle = tokenizer.encode(NEEDLE).tolist()
    return tokenizer.decode(tokens[:point] + needle + tokens[point:])


@pytest.mark.parametrize("kind", ["sentencepiece", "byte_level_bpe"])
def test_public_fixed_id_search_fails_the_depth_check(tokenizers, kind):
    """The check above catches the public bug: every needle lands at the start."""
    tokenizer = load_tokenizer(tokenizers[kind])
    text = hs.generated_haystack(10_000, 3)
    contexts = [public_fixed_id_insert(tokenizer, text, 1000, d) for d in DEPTHS]
    assert {c.find("Dolores") < 120 for c in contexts} == {True}
    assert not any(
        at_requested_depth(tokenizer, c, d)
        for c, d in zip(contexts, DEPTHS, strict=True)
        if d >= 10
    )


def test_cjk_and_newline_sentence_starts():
    text = "第一句。第二句。\nLine three ends here. Line four"
    index = hs.index_text(load_tokenizer(str(REPO / "data/sample/tokenizer.model")), text)
    starts = index.boundaries[index.is_sentence_start].tolist()
    assert starts == [0, 4, 9, 31, len(text)]  # 。 twice (the second with its newline), ". "


def test_haystack_dir_sorted_and_repeated(tmp_path):
    (tmp_path / "b.txt").write_text("Second file. It is here.\n")
    (tmp_path / "a.txt").write_text("First file.")
    (tmp_path / "notes.md").write_text("ignored")
    text = hs.read_haystack_dir(tmp_path)
    assert text == "First file.\n\nSecond file. It is here."
    tokenizer = load_tokenizer(str(REPO / "data/sample/tokenizer.model"))
    index = hs.haystack_with_tokens(tokenizer, text, 200)
    assert index.total_tokens >= 200
    assert index.text.startswith(text + "\n\n" + text)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: None, "no *.txt files"),
        (lambda d: (d / "a.txt").write_text("  \n"), "every *.txt file in it is empty"),
        (lambda d: (d / "a.txt").write_bytes(b"\xff\xfe bad"), "a.txt: not UTF-8"),
    ],
)
def test_bad_haystack_dir(tmp_path, setup, message):
    setup(tmp_path)
    with pytest.raises(hs.HaystackError, match=re.escape(message)):
        hs.read_haystack_dir(tmp_path)
    with pytest.raises(hs.HaystackError, match="not a directory"):
        hs.read_haystack_dir(tmp_path / "missing")
