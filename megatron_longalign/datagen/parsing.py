"""What counts as a usable model output.

Question lists are parsed strictly: the prompt asks for "1: ", "2: ", ... and the reply
must contain items numbered 1, 2, 3, ... in order, each at the start of a line, with
NUM_QUESTIONS of them. Accepted markers after the number: ":" / "：" (asked for), "."
and ")" (the same list in the other common notation); a leading quote or markdown bold
around the number is tolerated, since the prompt shows the format in quotes. A line
that does not start an item continues the item above it (a question wrapped over lines)
until a blank line; text after a blank line that starts no item (a preamble or a
closing remark) belongs to no question. Anything else (no list, a gap or restart in
the numbering, fewer items, an empty item, a refusal) is a `Malformed` reply with a
stable reason. More than NUM_QUESTIONS items keeps the first NUM_QUESTIONS.

Near-duplicates among a document's questions: two questions whose normalised texts
(casefolded, punctuation and spaces removed) have a rapidfuzz `ratio` of at least
NEAR_DUPLICATE_RATIO are one question; the later one is dropped and counted. Character
level, so it works for Chinese as for English.
"""

from __future__ import annotations

import re
import unicodedata

from rapidfuzz import fuzz

from megatron_longalign.datagen.prompts import NUM_QUESTIONS

NEAR_DUPLICATE_RATIO = 90.0

# Stable reasons (they appear in the rejects file and the summary).
NO_LIST, BAD_NUMBERING, TOO_FEW, EMPTY_QUESTION = (
    "no_numbered_list",
    "bad_numbering",
    "too_few_questions",
    "empty_question",
)
REFUSAL, EMPTY_ANSWER, TRUNCATED = "refusal", "empty_answer", "truncated"

_ITEM = re.compile(r"^\s*[\"“'*]*\s*(\d{1,3})\s*\**\s*[:：.)）]\**\s*(.*)$")
_QUOTES = "\"“”'‘’*"

# A refusal opens the reply; matching only the opening keeps answers that quote such a
# phrase from the document. Case-insensitive.
_REFUSAL = re.compile(
    r"^\s*(i'?m sorry|i am sorry|sorry, (but )?i|i apologi[sz]e|i can(no|')t|i cannot|"
    r"i'?m (not able|unable)|i am (not able|unable)|as an ai\b|unfortunately,? i (can|am)|"
    r"抱歉|对不起|很抱歉|我无法|我不能|作为一个?(ai|人工智能))",
    re.IGNORECASE,
)


class Malformed(ValueError):
    """A model reply that cannot be used; `reason` is one of the stable reasons."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def is_refusal(text: str) -> bool:
    return bool(_REFUSAL.match(text))


def _items(text: str) -> list[tuple[int, list[str]]]:
    items: list[tuple[int, list[str]]] = []
    open_item = False
    for line in text.splitlines():
        match = _ITEM.match(line)
        if match:
            items.append((int(match.group(1)), [match.group(2)]))
            open_item = True
        elif not line.strip():
            open_item = False
        elif open_item:
            items[-1][1].append(line.strip())
    return items


def parse_questions(text: str) -> list[str]:
    """The NUM_QUESTIONS questions of a reply, or `Malformed`."""
    if is_refusal(text):
        raise Malformed(REFUSAL, "the reply is a refusal")
    items = _items(text)
    if not items:
        raise Malformed(NO_LIST, 'no numbered list ("1: ...") in the reply')
    numbers = [number for number, _ in items]
    expected = list(range(1, len(items) + 1))
    if numbers != expected:
        raise Malformed(BAD_NUMBERING, f"items numbered {numbers}, expected {expected}")
    if len(items) < NUM_QUESTIONS:
        raise Malformed(TOO_FEW, f"{len(items)} questions, {NUM_QUESTIONS} were asked for")
    questions = []
    for number, lines in items[:NUM_QUESTIONS]:
        question = " ".join(part.strip() for part in lines).strip().strip(_QUOTES).strip()
        if not question:
            raise Malformed(EMPTY_QUESTION, f"question {number} is empty")
        questions.append(question)
    return questions


def check_answer(text: str, finish_reason: str | None) -> str:
    """The answer, stripped, or `Malformed` (empty, a refusal, cut off by max tokens)."""
    answer = text.strip()
    if not answer:
        raise Malformed(EMPTY_ANSWER, "the answer is empty")
    if is_refusal(answer):
        raise Malformed(REFUSAL, "the answer is a refusal")
    if finish_reason == "length":
        raise Malformed(TRUNCATED, "the answer was cut off at the output token limit")
    return answer


def _normalised(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold()
    return "".join(c for c in text if c.isalnum())


def drop_near_duplicates(questions: list[str]) -> tuple[list[str], int]:
    """`questions` without near-duplicates of an earlier one, and how many were dropped."""
    kept: list[str] = []
    keys: list[str] = []
    for question in questions:
        key = _normalised(question)
        if any(fuzz.ratio(key, other) >= NEAR_DUPLICATE_RATIO for other in keys):
            continue
        kept.append(question)
        keys.append(key)
    return kept, len(questions) - len(kept)
