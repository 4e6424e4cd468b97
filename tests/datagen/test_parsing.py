"""Strict question-list parsing, answer checks, refusals, near-duplicates, language."""

from __future__ import annotations

import pytest

from megatron_longalign.datagen.language import CHINESE, ENGLISH, detect_language
from megatron_longalign.datagen.parsing import (
    BAD_NUMBERING,
    EMPTY_ANSWER,
    EMPTY_QUESTION,
    NO_LIST,
    REFUSAL,
    TOO_FEW,
    TRUNCATED,
    Malformed,
    check_answer,
    drop_near_duplicates,
    is_refusal,
    parse_questions,
)

FIVE = ["Who is Tomas?", "Where is the gate?", "What is the code?", "Why copper?", "When?"]


def numbered(questions, marker=": ", start=1) -> str:
    return "\n".join(f"{i}{marker}{q}" for i, q in enumerate(questions, start))


@pytest.mark.parametrize("marker", [": ", "：", ". ", ") ", " : "])
def test_the_requested_list_and_its_common_variants_parse(marker):
    assert parse_questions(numbered(FIVE, marker)) == FIVE


def test_preamble_closing_remark_quotes_and_wrapped_lines():
    text = (
        "Sure! Here are five questions:\n\n"
        '"1: Who is Tomas?"\n**2:** Where is\n  the gate?\n3: What is the code?\n'
        "4: Why copper?\n5: When?\n\nThese cover all parts of the text."
    )
    assert parse_questions(text) == FIVE


def test_chinese_full_width_colon():
    questions = ["文中的主角是谁？", "城门在哪里？", "密码是什么？", "为什么用铜？", "何时发生？"]
    assert parse_questions(numbered(questions, "：")) == questions


def test_more_than_five_keeps_the_first_five():
    assert parse_questions(numbered(FIVE + ["Sixth?"])) == FIVE


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("Who is Tomas? Where is the gate? What is the code?", NO_LIST),
        ("", NO_LIST),
        (numbered(FIVE[:3]), TOO_FEW),
        (numbered(FIVE[:2]) + "\n4: Why copper?\n5: When?\n6: Who?", BAD_NUMBERING),
        (numbered(FIVE[:3]) + "\n" + numbered(FIVE[:3]), BAD_NUMBERING),  # a restart
        (numbered(FIVE, start=0), BAD_NUMBERING),
        (numbered(FIVE[:2] + ['""'] + FIVE[3:]), EMPTY_QUESTION),
        ("I'm sorry, but I can't help with that.\n" + numbered(FIVE), REFUSAL),
        ("抱歉，我无法完成这个请求。", REFUSAL),
    ],
)
def test_malformed_lists_are_refused_with_a_reason(text, reason):
    with pytest.raises(Malformed) as caught:
        parse_questions(text)
    assert caught.value.reason == reason


def test_answer_checks():
    assert check_answer("  The code is 42.\n", "stop") == "The code is 42."
    for text, finish, reason in [
        (" \n ", "stop", EMPTY_ANSWER),
        ("As an AI, I cannot read that.", "stop", REFUSAL),
        ("I cannot answer this based on the text.", "stop", REFUSAL),
        ("The code is", "length", TRUNCATED),
    ]:
        with pytest.raises(Malformed) as caught:
            check_answer(text, finish)
        assert caught.value.reason == reason


def test_a_refusal_is_only_a_refusal_at_the_start():
    assert not is_refusal('The letter says "I\'m sorry, but I cannot come".')
    assert is_refusal("  I apologize, but the document does not say.")


def test_near_duplicates_are_dropped_and_counted():
    questions = [
        "What is the secret code of the amber gate?",
        "what is the secret code of the Amber Gate",  # case and punctuation only
        "Where does Tomas Verdane live?",
        "What is the secret code of amber gate?",  # one word fewer: ratio > 90
        "Why are the lanterns made of copper?",
    ]
    kept, dropped = drop_near_duplicates(questions)
    assert kept == [questions[0], questions[2], questions[4]] and dropped == 2
    assert drop_near_duplicates(FIVE) == (FIVE, 0)


def test_language_rule():
    assert detect_language("The amber gate lives in the city.") == ENGLISH
    assert detect_language("琥珀门位于城市之中，以编织铜灯笼闻名。") == CHINESE
    # 11 ideographs, 11 Latin letters: 11/22 = 0.5
    assert detect_language("这是一个关于Transformer模型的文章") == CHINESE
    # the threshold: 3 ideographs of 10 letters = 0.3 is Chinese, 3 of 11 is not
    assert detect_language("甲乙丙 abcdefg 12345") == CHINESE
    assert detect_language("甲乙丙 abcdefgh") == ENGLISH
    # 2 ideographs vs 26 Latin letters: 2/28 < 0.3
    assert detect_language("The word 东京 means eastern capital.") == ENGLISH
    assert detect_language("12345 !!! ...") == ENGLISH
