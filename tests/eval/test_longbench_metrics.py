"""LongBench metrics against values worked out by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from rouge_score import rouge_scorer

from megatron_longalign.eval import longbench_metrics as m

REPO = Path(__file__).resolve().parents[2]


# ---- QA F1, English ----------------------------------------------------------------------
def test_normalize_answer_drops_case_punctuation_articles_and_extra_spaces():
    assert m.normalize_answer("An apple,  the   PEAR.") == "apple pear"
    # articles only as whole words
    assert m.normalize_answer("Theatre then anthem") == "theatre then anthem"


def test_qa_f1_english():
    # prediction -> "eiffel tower in paris" (4 tokens), gold -> "eiffel tower" (2 tokens)
    # overlap 2: P = 2/4, R = 2/2, F1 = 2*(1/2)*1 / (3/2) = 2/3
    assert m.qa_f1("The Eiffel Tower, in Paris!", "the Eiffel tower") == pytest.approx(2 / 3)
    # multiset overlap: pred {red:2, blue:1}, gold {red:3, green:1} -> min counts: red 2
    # P = 2/3, R = 2/4, F1 = 2*(2/3)*(1/2) / (2/3 + 1/2) = 4/7
    assert m.qa_f1("red red blue", "red green red red") == pytest.approx(4 / 7)
    assert m.qa_f1("blue", "red") == 0.0
    assert m.qa_f1("", "red") == 0.0


# ---- QA F1, Chinese (jieba words) ---------------------------------------------------------
def test_qa_f1_chinese_over_jieba_words():
    prediction, gold = "小明硕士毕业于中国科学院计算所。", "他毕业于中国科学院"
    # Pin the segmentation the expected value rests on.
    assert m.chinese_words(prediction) == [
        "小明",
        "硕士",
        "毕业",
        "于",
        "中国科学院",
        "计算所",
        "。",
    ]
    assert m.chinese_words(gold) == ["他", "毕业", "于", "中国科学院"]
    # "。" normalises to "" and is dropped: 6 prediction words, 4 gold words,
    # overlap {毕业, 于, 中国科学院} = 3: P = 3/6, R = 3/4, F1 = 2*(1/2)*(3/4) / (5/4) = 0.6
    assert m.qa_f1_zh(prediction, gold) == pytest.approx(0.6)
    assert m.qa_f1_zh("北京", "北京。") == 1.0  # punctuation-only words vanish


def test_normalize_zh_answer_drops_chinese_and_english_punctuation_and_spaces():
    assert m.normalize_zh_answer("“北京”， A b!") == "北京ab"


# ---- ROUGE-L -------------------------------------------------------------------------------
def test_rouge_l_english_equals_hand_lcs():
    # pred: the cat sat on the mat / gold: the cat is on the mat; LCS "the cat on the mat" = 5
    # P = 5/6, R = 5/6, F = 5/6
    assert m.rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # pred: police killed the gunman (4) / gold: the gunman was shot down by police (7)
    # LCS "the gunman" = 2: P = 1/2, R = 2/7, F = 2*(1/2)*(2/7) / (1/2 + 2/7) = 4/11
    assert m.rouge_l("police killed the gunman", "the gunman was shot down by police") == (
        pytest.approx(4 / 11)
    )
    assert m.rouge_l("The CAT.", "the cat") == pytest.approx(1.0)  # case, punctuation
    assert m.rouge_l("", "the cat") == 0.0


def test_rouge_l_chinese_scores_jieba_words_not_dropped_characters():
    prediction, gold = "北京是中国的首都。", "中国的首都是北京"
    assert m.chinese_words(prediction) == ["北京", "是", "中国", "的", "首都", "。"]
    assert m.chinese_words(gold) == ["中国", "的", "首都", "是", "北京"]
    # LCS over words: 中国 的 首都 = 3 ("北京 是" / "是 北京" cross it)
    # P = 3/6, R = 3/5, F = 2*(1/2)*(3/5) / (11/10) = 6/11
    assert m.rouge_l_zh(prediction, gold) == pytest.approx(6 / 11)
    # The hazard the custom tokenizer avoids: rouge-score's default tokenizer keeps only
    # [a-z0-9], so Chinese text has no tokens at all and scores 0 even when identical.
    default = rouge_scorer.RougeScorer(["rougeL"])
    assert default.score("中国 的 首都", "中国 的 首都")["rougeL"].fmeasure == 0.0
    assert m.rouge_l_zh("中国的首都", "中国的首都") == pytest.approx(1.0)


# ---- code edit similarity -----------------------------------------------------------------
def test_code_sim_takes_first_line_without_fence_or_comment():
    prediction = "\n```python\n# the next line\nreturn a + b  // no\n    return a + b\nmore"
    assert m.first_code_line(prediction) == "    return a + b"
    assert m.code_sim(prediction, "    return a + b") == 1.0
    assert m.first_code_line("```\n# only comments\n") == ""


def test_code_sim_is_rounded_indel_similarity():
    # Indel similarity = 2*LCS / (len a + len b), as an integer percent (fuzzywuzzy):
    # abcd / abce: LCS 3 -> 6/8 = 75%
    assert m.code_sim("abcd", "abce") == 0.75
    # kitten / sitting: LCS "ittn" = 4 -> 8/13 = 61.5% -> 62%
    assert m.code_sim("kitten", "sitting") == 0.62
    # abc / abd: 4/6 = 66.7% -> 67%
    assert m.code_sim("abc", "abd") == 0.67
    assert m.code_sim("", "x = 1") == 0.0
    assert m.code_sim("# comment only", "x = 1") == 0.0


# ---- classification -------------------------------------------------------------------------
CLASSES = ["Date", "Date of birth", "Color", "City"]


def test_classification_drops_classes_contained_in_the_gold():
    # matches Date, Date of birth; Date is inside the gold name -> dropped -> 1/1
    assert m.classification("Date of birth", "Date of birth", all_classes=CLASSES) == 1.0
    # matches Date, Date of birth, Color; Date dropped -> 2 left, gold among them -> 1/2
    assert m.classification("Color or Date of birth", "Date of birth", all_classes=CLASSES) == 0.5
    # gold Date: "Date of birth" is not inside "Date", stays a competitor -> 1/2
    assert m.classification("Date of birth", "Date", all_classes=CLASSES) == 0.5
    assert m.classification("City", "Date", all_classes=CLASSES) == 0.0
    assert m.classification("no class here", "Date", all_classes=CLASSES) == 0.0


def test_classification_drops_every_contained_class():
    # Da and Date are both inside the gold: both go (LongBench's in-place removal would
    # skip Date and score 1/2; see the module docstring).
    classes = ["Da", "Date", "Date of birth"]
    assert m.classification("Date of birth", "Date of birth", all_classes=classes) == 1.0


# ---- retrieval and count -----------------------------------------------------------------------
def test_retrieval_english_and_chinese():
    assert m.retrieval("Paragraph 12", "Paragraph 12") == 1.0
    assert m.retrieval("Paragraph 12 or Paragraph 3", "Paragraph 12") == 0.5
    assert m.retrieval("Paragraph 1", "Paragraph 12") == 0.0  # whole numbers, not digits
    assert m.retrieval("I do not know", "Paragraph 12") == 0.0
    assert m.retrieval_zh("答案是段落5", "段落5") == 1.0
    assert m.retrieval_zh("段落5和段落15", "段落5") == 0.5
    with pytest.raises(ValueError, match="Paragraph"):
        m.retrieval("Paragraph 1", "the first one")


def test_count():
    assert m.count("7", "7") == 1.0
    assert m.count("There are 7 unique paragraphs among 30", "7") == 0.5
    assert m.count("17", "7") == 0.0
    assert m.count("seven", "7") == 0.0


# ---- one sample ---------------------------------------------------------------------------------
def test_sample_score_is_best_gold_and_cuts_first_line_when_asked():
    # vs "Paris": 1.0; vs "the city of Paris" -> "city of paris": P = 1, R = 1/3 -> 0.5
    assert m.sample_score("qa_f1", "Paris", ["the city of Paris", "Paris"]) == 1.0
    assert m.sample_score("qa_f1", "Paris", ["the city of Paris"]) == pytest.approx(0.5)
    prediction = "\nCity\nQuestion: when? Type: Date"
    # without the cut both City and Date match -> 1/2; with it only City -> 1
    assert m.sample_score("classification", prediction, ["City"], all_classes=CLASSES) == 0.5
    assert (
        m.sample_score(
            "classification", prediction, ["City"], all_classes=CLASSES, first_line_only=True
        )
        == 1.0
    )


def test_jieba_initialises_quietly():
    # A fresh process: jieba otherwise logs "Building prefix dict..." to stderr.
    code = "from megatron_longalign.eval.longbench_metrics import chinese_words as w; w('北京')"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert done.stderr == ""
