"""Haystack text for needle-in-a-haystack, and placing the needle in it by *text*.

The haystack is either the text files of a directory (`*.txt`, concatenated in sorted
name order with a blank line between files, and the whole concatenation repeated when it
has fewer tokens than the longest context asked for), or a generated one: deterministic
English-like sentences from a small built-in vocabulary and a seed (for demos and tests;
it never contains the needle's key words).

Lengths and depths are counted in tokens of the model's tokenizer, but the needle is
placed by text: the haystack is split at word and sentence starts, one `encode_pieces`
call gives the number of tokens before each of those character positions, and the needle
goes in at the last sentence start whose token count is at most the requested depth. This
works for any tokenizer. (THUDM/LongAlign's Needle_test looked for a hard-coded period
token id, 30930, walking back through the token ids; with a Llama tokenizer that id is
"。", never found in English text, so every needle landed at position 0.)
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_longalign.data.tokenizer import TextTokenizer

# A sentence starts after ".", "!" or "?" plus whitespace, after a CJK full stop (with
# or without whitespace), and after a line break.
_SENTENCE_END = re.compile(r"[.!?]\s+|[。！？]\s*|\n\s*")
_WHITESPACE = re.compile(r"\s+")
_FILE_SEPARATOR = "\n\n"


class HaystackError(ValueError):
    """The haystack cannot serve the requested contexts."""


# ---- sources -------------------------------------------------------------------------------


def read_haystack_dir(directory: str | Path) -> str:
    """The `*.txt` files of `directory`, in sorted name order, joined by a blank line."""
    directory = Path(directory)
    if not directory.is_dir():
        raise HaystackError(f"--haystack-dir {directory}: not a directory")
    files = sorted(path for path in directory.glob("*.txt") if path.is_file())
    if not files:
        raise HaystackError(f"--haystack-dir {directory}: no *.txt files in it")
    texts = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError as err:
            raise HaystackError(f"{path}: not UTF-8 text ({err})") from None
        if text:
            texts.append(text)
    if not texts:
        raise HaystackError(f"--haystack-dir {directory}: every *.txt file in it is empty")
    return _FILE_SEPARATOR.join(texts)


_SUBJECTS = (
    "the old miller", "a young teacher", "the river town", "our neighbour", "the council",
    "a quiet student", "the night train", "every farmer", "the small library", "my cousin",
    "the harbour master", "a travelling painter", "the village choir", "the north wind",
)  # fmt: skip
_VERBS = (
    "carried", "painted", "counted", "repaired", "described", "followed", "remembered",
    "opened", "watched", "measured", "planted", "explained", "visited", "collected",
)  # fmt: skip
_OBJECTS = (
    "the wooden bridge", "a basket of apples", "the long letter", "seven copper coins",
    "the winter garden", "an empty boat", "the stone tower", "a map of the valley",
    "the morning bread", "three grey horses", "the broken clock", "a book of songs",
)  # fmt: skip
_TAILS = (
    "before the rain began", "near the eastern gate", "after the market closed",
    "with great patience", "for the first time", "during the long autumn",
    "without saying a word", "while the bells were ringing", "in the cold evening",
)  # fmt: skip


def generated_haystack(min_chars: int, seed: int = 0) -> str:
    """Deterministic English-like prose of at least `min_chars` characters: sentences of
    subject, verb, object and an optional phrase; paragraphs of four to seven."""
    rng = random.Random(seed)
    paragraphs: list[str] = []
    size = 0
    while size < min_chars:
        sentences = []
        for _ in range(rng.randint(4, 7)):
            words = [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)]
            if rng.random() < 0.6:
                words.append(rng.choice(_TAILS))
            sentence = " ".join(words)
            sentences.append(sentence[0].upper() + sentence[1:] + ".")
        paragraphs.append(" ".join(sentences))
        size += len(paragraphs[-1]) + 2
    return "\n\n".join(paragraphs)


# ---- token-indexed text ---------------------------------------------------------------------


@dataclass(frozen=True)
class IndexedText:
    """`text` with the token count before each word and sentence start.

    `boundaries` are character positions (sorted, starting with 0 and ending with
    len(text)); `tokens_before[i]` is the number of tokens of `text` (encoded whole) whose
    anchor lies before `boundaries[i]`; `is_sentence_start[i]` says whether a sentence
    starts there (position 0 and the end of the text count as sentence starts)."""

    text: str
    boundaries: np.ndarray
    tokens_before: np.ndarray
    is_sentence_start: np.ndarray

    @property
    def total_tokens(self) -> int:
        return int(self.tokens_before[-1])


def _starts(pattern: re.Pattern, text: str) -> set[int]:
    return {match.end() for match in pattern.finditer(text)}


def index_text(tokenizer: TextTokenizer, text: str) -> IndexedText:
    """Index `text` with one tokenizer call (the pieces' token bounds come from the
    tokenizer's own offsets, see data/tokenizer.encode_pieces)."""
    sentences = _starts(_SENTENCE_END, text) | {0, len(text)}
    points = sorted(_starts(_WHITESPACE, text) | sentences)
    pieces = [text[a:b] for a, b in zip(points[:-1], points[1:], strict=True)]
    _, bounds = tokenizer.encode_pieces(pieces or [""])
    boundaries = np.asarray(points, dtype=np.int64)
    return IndexedText(
        text=text,
        boundaries=boundaries,
        tokens_before=np.asarray(bounds[: len(points)], dtype=np.int64),
        is_sentence_start=np.isin(boundaries, sorted(sentences)),
    )


def haystack_with_tokens(tokenizer: TextTokenizer, base: str, needed_tokens: int) -> IndexedText:
    """`base` (repeated as often as needed, separated by a blank line) indexed, with at
    least `needed_tokens` tokens; a long `base` is first cut to about what is needed, so a
    large haystack directory is not tokenized whole."""
    sample = base[:200_000]
    chars_per_token = max(len(sample) / max(len(tokenizer.encode(sample)), 1), 0.5)
    want_chars = int(needed_tokens * chars_per_token * 1.3) + 1000
    while True:
        repeats = max(1, math.ceil(want_chars / (len(base) + len(_FILE_SEPARATOR))))
        text = _FILE_SEPARATOR.join([base] * repeats)[:want_chars]
        index = index_text(tokenizer, text)
        if index.total_tokens >= needed_tokens:
            return index
        want_chars *= 2  # the sample was denser than the rest: try again with more


# ---- placing the needle ------------------------------------------------------------------


@dataclass(frozen=True)
class NeedleContext:
    """A context of the requested length with the needle in it."""

    text: str  # the haystack part with the needle inserted
    needle_start: int  # character position of the needle in `text`
    needle_text: str  # exactly what was inserted (the needle and the spaces around it)
    haystack_tokens: int  # tokens of the haystack part (from the index)
    target_token: int  # depth * haystack_tokens: where the needle was asked to go
    insertion_token: int  # the haystack tokens before the chosen sentence start


def place_needle(index: IndexedText, needle: str, budget: int, depth: float) -> NeedleContext:
    """Cut the haystack at the last word (or sentence) start with at most `budget` tokens
    before it, then insert `needle` at the last sentence start at or before token
    `depth`% of that cut (depth 100: at the end, after the last whole sentence)."""
    if not 0 <= depth <= 100:
        raise ValueError(f"depth {depth} is outside [0, 100]")
    if index.total_tokens < budget:
        raise HaystackError(f"the haystack has {index.total_tokens} tokens, {budget} are needed")
    last = int(np.searchsorted(index.tokens_before, budget, side="right")) - 1
    haystack_tokens = int(index.tokens_before[last])
    target = math.floor(haystack_tokens * depth / 100)
    candidates = np.flatnonzero(
        index.is_sentence_start[: last + 1] & (index.tokens_before[: last + 1] <= target)
    )
    chosen = int(candidates[-1])
    if target >= haystack_tokens:
        # Depth 100: the needle ends the context, after the last whole sentence (the
        # partial sentence at the cut is dropped, so the context may be a few tokens short).
        last = chosen
    position = int(index.boundaries[chosen])
    cut = int(index.boundaries[last])
    # No whitespace is left dangling at the end of the context.
    before, after = index.text[:position], index.text[position:cut].rstrip()
    if not after:
        before = before.rstrip()
    inserted = needle
    if before and not before[-1].isspace() and before[-1] not in "。！？":
        inserted = " " + inserted
    if after and not after[0].isspace():
        inserted = inserted + " "
    return NeedleContext(
        text=before + inserted + after,
        needle_start=len(before) + (1 if inserted.startswith(" ") else 0),
        needle_text=inserted,
        haystack_tokens=haystack_tokens,
        target_token=target,
        insertion_token=int(index.tokens_before[chosen]),
    )


def needle_token_span(tokenizer: TextTokenizer, context: NeedleContext) -> tuple[int, int, int]:
    """(tokens before the needle, tokens of the needle, tokens of the whole context),
    measured on the final context encoded whole."""
    position = context.needle_start
    end = position + len(context.needle_text.strip())
    pieces = [context.text[:position], context.text[position:end], context.text[end:]]
    ids, bounds = tokenizer.encode_pieces(pieces)
    return int(bounds[1]), int(bounds[2] - bounds[1]), int(ids.size)
