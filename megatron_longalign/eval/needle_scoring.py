"""Scoring needle-in-a-haystack answers: key-phrase recall (no judge), or an LLM judge.

Recall: the fraction of the needle's key phrases found in the answer. Answer and phrases
are normalised the same way (Unicode NFKC, case-folded, every run of characters that are
not letters or digits becomes one space) and a phrase counts when it occurs on word
boundaries ("sunny day" is found in "...on a Sunny-day!", "park" is not found in
"parking"). Score = found / number of phrases, in [0, 1].

Judge: THUDM/LongAlign's needle judge prompt (Needle_test/eval.py): the question, the
needle as ground truth and the answer, an "accuracy" rubric, rated 1-10 as "[[n]]". The
rating is read and re-asked for as in LongBench-Chat (eval/judge.py `rate`): a reply
without one is asked again, up to `retries` times; after that the case is recorded as
unparsed with no score, counted in the summary, never scored 0.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

from megatron_longalign.eval.judge import JudgedRating, rate
from megatron_longalign.utils.chat_api import ChatClient

_NOT_WORD = re.compile(r"[\W_]+")

JUDGE_SYSTEM = "You are a helpful assistant."
JUDGE_CRITERIA = (
    "For this evaluation, you should primarily consider the following criteria:\n"
    "accuracy: \n"
    "    Score 1: The answer is completely unrelated to the reference.\n"
    "    Score 3: The answer has minor relevance but does not align with the reference.\n"
    "    Score 5: The answer has moderate relevance but contains inaccuracies.\n"
    "    Score 7: The answer aligns with the reference but has minor omissions.\n"
    "    Score 10: The answer is completely accurate and aligns perfectly with the reference.\n"
    "    Only respond with a numberical score\n"
    "    \n"
)
JUDGE_TEMPLATE = (
    "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the "
    "response provided by an AI assistant to the user question displayed below. "
    "{criteria}[Ground truth]\n{reference}\nBegin your evaluation by providing a short "
    "explanation. Be as objective as possible. After providing your explanation, you must "
    'rate the response on a scale of 1 to 10 by strictly following this format: "[[rating]]", '
    'for example: "Rating: [[5]]".\n\n[Question]\n{question}\n\n'
    "[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]"
)


def normalize(text: str) -> str:
    """NFKC, case-folded, non-alphanumeric runs as single spaces, trimmed."""
    return _NOT_WORD.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def phrase_recall(answer: str, phrases: Sequence[str]) -> tuple[float, list[str]]:
    """(fraction of `phrases` found in `answer`, the phrases found)."""
    if not phrases:
        raise ValueError("no key phrases to score against")
    haystack = f" {normalize(answer)} "
    found = [phrase for phrase in phrases if f" {normalize(phrase)} " in haystack]
    return len(found) / len(phrases), found


def judge_messages(question: str, reference: str, answer: str) -> list[dict]:
    user = JUDGE_TEMPLATE.format(
        criteria=JUDGE_CRITERIA, reference=reference, question=question, answer=answer
    )
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


def judge_answer(
    client: ChatClient, question: str, reference: str, answer: str, *, retries: int = 2
) -> JudgedRating:
    """Rate `answer` 1-10 against `reference`; unparseable replies are asked again."""
    return rate(client, judge_messages(question, reference, answer), attempts=retries + 1)
