"""LongBench (v1) metrics, as its eval.py and metrics.py define them.

Every metric scores one prediction against one gold answer in [0, 1]; a sample scores the
maximum over its gold answers (`sample_score`), a task 100 x the mean over its samples.

Where we knowingly differ from LongBench's code (docs/EVALUATION.md, "LongBench"):
- ROUGE-L comes from Google's `rouge-score` (sentence-level LCS, F1 = harmonic mean),
  LongBench uses the `rouge` package (LCS unioned over "."-split sentences, an F-beta
  with beta = P/R). Both are "ROUGE-L F"; the numbers differ slightly on multi-sentence
  summaries.
- classification drops every matched class that is a proper substring of the gold class;
  LongBench removes them from the list it is iterating over, which skips the element after
  each removal (only matters when two such classes match in a row).
"""

from __future__ import annotations

import logging
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

from rapidfuzz import fuzz
from rouge_score import rouge_scorer

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_EN_PUNCTUATION = frozenset(string.punctuation)
# LongBench's Chinese punctuation list (normalize_zh_answer), plus ASCII punctuation.
_ZH_PUNCTUATION = _EN_PUNCTUATION | frozenset(
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
)
_NUMBER = re.compile(r"\d+")
_PARAGRAPH_EN = re.compile(r"Paragraph (\d+)")
_PARAGRAPH_ZH = re.compile(r"段落(\d+)")


@lru_cache(maxsize=1)
def _jieba() -> Any:
    """jieba, initialised once without its "Building prefix dict..." chatter on stderr."""
    import jieba

    jieba.setLogLevel(logging.WARNING)
    jieba.initialize()
    return jieba


def chinese_words(text: str) -> list[str]:
    """jieba's default (precise-mode) segmentation, as LongBench uses it."""
    return _jieba().lcut(text, cut_all=False)


def normalize_answer(text: str) -> str:
    """English: lower case, drop punctuation, drop articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _EN_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def normalize_zh_answer(text: str) -> str:
    """Chinese: lower case, drop Chinese and English punctuation and all whitespace."""
    return "".join("".join(ch for ch in text.lower() if ch not in _ZH_PUNCTUATION).split())


def token_f1(prediction: Sequence[str], gold: Sequence[str]) -> float:
    """F1 of the multiset overlap of two token lists (0 when nothing overlaps)."""
    same = sum((Counter(prediction) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision = same / len(prediction)
    recall = same / len(gold)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, gold: str, **_: Any) -> float:
    return token_f1(normalize_answer(prediction).split(), normalize_answer(gold).split())


def qa_f1_zh(prediction: str, gold: str, **_: Any) -> float:
    def words(text: str) -> list[str]:
        normalized = (normalize_zh_answer(word) for word in chinese_words(text))
        return [word for word in normalized if word]

    return token_f1(words(prediction), words(gold))


class _WhitespaceTokenizer:
    """rouge-score's default tokenizer keeps only [a-z0-9]: every Chinese character would
    vanish. Chinese text arrives here already segmented by jieba and joined by spaces."""

    def tokenize(self, text: str) -> list[str]:
        return text.split()


@lru_cache(maxsize=1)
def _rouge_en() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


@lru_cache(maxsize=1)
def _rouge_words() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_WhitespaceTokenizer())


def rouge_l(prediction: str, gold: str, **_: Any) -> float:
    return _rouge_en().score(gold, prediction)["rougeL"].fmeasure


def rouge_l_zh(prediction: str, gold: str, **_: Any) -> float:
    joined_prediction = " ".join(chinese_words(prediction))
    joined_gold = " ".join(chinese_words(gold))
    return _rouge_words().score(joined_gold, joined_prediction)["rougeL"].fmeasure


def classification(prediction: str, gold: str, *, all_classes: Sequence[str], **_: Any) -> float:
    """1/len(matches) when the gold class is among the class names found in the
    prediction, else 0. A matched class contained in the gold name (e.g. "Date" in
    "Date of birth") is not a competing match: it is dropped first."""
    matches = [name for name in all_classes if name in prediction]
    matches = [name for name in matches if name == gold or name not in gold]
    return 1.0 / len(matches) if gold in matches else 0.0


def _share_of_numbers(prediction: str, right: str) -> float:
    """Right numbers / all numbers in the prediction (0 when it has none)."""
    numbers = _NUMBER.findall(prediction)
    if not numbers:
        return 0.0
    return sum(number == right for number in numbers) / len(numbers)


def count(prediction: str, gold: str, **_: Any) -> float:
    return _share_of_numbers(prediction, gold)


def retrieval(prediction: str, gold: str, **_: Any) -> float:
    return _share_of_numbers(prediction, gold_paragraph(gold, "retrieval"))


def retrieval_zh(prediction: str, gold: str, **_: Any) -> float:
    return _share_of_numbers(prediction, gold_paragraph(gold, "retrieval_zh"))


def gold_paragraph(gold: str, metric: str) -> str:
    """The paragraph number of a retrieval answer ("Paragraph 7" / "段落7" -> "7")."""
    pattern = _PARAGRAPH_EN if metric == "retrieval" else _PARAGRAPH_ZH
    found = pattern.findall(gold)
    if not found:
        raise ValueError(f"retrieval answer {gold!r} does not match {pattern.pattern!r}")
    return found[0]


def first_code_line(prediction: str) -> str:
    """The first line that is code, not a fence or a comment: LongBench skips every line
    containing a backtick, '#' or '//' (anywhere in the line, not only at its start)."""
    for line in prediction.lstrip("\n").split("\n"):
        if "`" not in line and "#" not in line and "//" not in line:
            return line
    return ""


def code_sim(prediction: str, gold: str, **_: Any) -> float:
    # fuzzywuzzy (LongBench's choice; with python-Levenshtein) returns the Indel
    # similarity rounded to an integer percent, and 0 when either string is empty;
    # rapidfuzz's ratio is the same similarity unrounded, and 100 for two empty strings.
    line = first_code_line(prediction)
    if not line or not gold:
        return 0.0
    return round(fuzz.ratio(line, gold)) / 100


METRICS: dict[str, Callable[..., float]] = {
    "qa_f1": qa_f1,
    "qa_f1_zh": qa_f1_zh,
    "rouge_l": rouge_l,
    "rouge_l_zh": rouge_l_zh,
    "classification": classification,
    "retrieval": retrieval,
    "retrieval_zh": retrieval_zh,
    "count": count,
    "code_sim": code_sim,
}


def first_line(prediction: str) -> str:
    """The prediction up to its first newline, leading newlines skipped (LongBench cuts
    few-shot predictions there: models go on to invent the next example)."""
    return prediction.lstrip("\n").split("\n")[0]


def sample_score(
    metric: str,
    prediction: str,
    answers: Sequence[str],
    *,
    all_classes: Sequence[str] | None = None,
    first_line_only: bool = False,
) -> float:
    """The score of one sample: the best over its gold answers, in [0, 1]."""
    if first_line_only:
        prediction = first_line(prediction)
    score = METRICS[metric]
    return max(
        (score(prediction, gold, all_classes=all_classes or ()) for gold in answers), default=0.0
    )
