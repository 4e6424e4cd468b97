"""Self-Instruct runs against a local OpenAI-compatible server (OpenAIStub) with replies
derived from the request (fake_model.FakeModel)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import sentencepiece

from megatron_longalign.data.conversation import conversation_from_record
from megatron_longalign.datagen.prompts import QUESTION_PROMPTS
from megatron_longalign.datagen.runner import run_self_instruct
from megatron_longalign.datagen.settings import SettingsMismatch
from megatron_longalign.utils.chat_api import ChatAPIError
from tests.datagen.conftest import english_text, run_config, write_documents
from tests.datagen.fake_model import (
    FakeModel,
    good_answer,
    is_question_request,
    marker_of,
    questions_for,
)
from tests.helpers.openai_server import OpenAIStub, StubReply


def records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def doc_texts(path: Path) -> dict[str, str]:
    return {r["id"]: r["text"] for r in records(path)}


def expected_questions(marker: str) -> list[str]:
    return questions_for(marker)


def test_one_sample_per_document_with_provenance(tmp_path, english_docs, sp_model):
    out = tmp_path / "out" / "samples.jsonl"
    with OpenAIStub(FakeModel()) as server:
        summary = run_self_instruct(run_config([english_docs], out, sp_model, server.base_url))
    texts, samples = doc_texts(english_docs), records(out)
    assert sorted(s["meta"]["document_id"] for s in samples) == sorted(texts)
    question_prompts = {
        marker_of(b): b["messages"][0]["content"] for b in server.requests if is_question_request(b)
    }
    for sample in samples:
        meta, (user, assistant) = sample["meta"], sample["messages"]
        marker = "DOC" + meta["document_id"][1:]
        question = expected_questions(marker)[meta["question_index"]]
        assert meta["questions"] == expected_questions(marker)
        assert user == {"role": "user", "content": texts[meta["document_id"]] + "\n\n" + question}
        assert assistant == {"role": "assistant", "content": f"Answer for {marker}: {question}"}
        sent = question_prompts[marker]
        assert (
            sent == texts[meta["document_id"]] + "\n\n" + QUESTION_PROMPTS["en"][meta["task_type"]]
        )
        assert (meta["generator_model"], meta["language"], meta["copy"]) == (
            "stub-generator",
            "en",
            1,
        )
        # preprocessing reads the messages and ignores `meta`
        turns = conversation_from_record(sample).turns
        assert [t.content for t in turns] == [user["content"], assistant["content"]]
    assert len({s["meta"]["task_type"] for s in samples}) > 1  # the choice is random
    assert len(server.requests) == 16
    # the stub counts words as tokens: an independent account of the usage and the cost
    prompt = sum(len(b["messages"][0]["content"].split()) for b in server.requests)
    completion = sum(len(s["messages"][1]["content"].split()) for s in samples) + sum(
        len(("Here are the questions:\n" + "\n".join(s["meta"]["questions"])).split()) + 5
        for s in samples
    )  # + 5: the "n:" markers
    usage = summary["this_run"]["usage"]
    assert usage == {
        "requests": 16,
        "cached": 0,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
    }
    assert summary["this_run"]["cost"] == pytest.approx((2 * prompt + 10 * completion) / 1e6)
    assert summary["output"]["cost"] == pytest.approx(summary["this_run"]["cost"])
    assert summary["this_run"]["generated"] == 8 and summary["output"]["missing_jobs"] == 0
    assert summary["this_run"]["near_duplicate_questions_dropped"] == 0
    assert json.loads(out.with_name("samples.summary.json").read_text()) == summary


def _broken(marker: str, stage: str, attempt: int):
    """Per-document misbehaviour of the generator (None: the normal reply)."""
    topics = [
        "Who keeps the gate",
        "Where the lanterns go",
        "Why copper",
        "When it began",
        "How codes work",
    ]
    five = [f"{i}: {topic} in {marker}?" for i, topic in enumerate(topics, 1)]
    if marker == "DOC0" and stage == "questions":
        return "These are my thoughts on the text, without any list."
    if marker == "DOC1" and stage == "questions" and attempt == 1:
        return "\n".join(five[:3])  # too few, then fine
    if marker == "DOC2" and stage == "answer":
        return "   "
    if marker == "DOC3" and stage == "answer" and attempt == 1:
        return "I'm sorry, but I can't help with that."
    if marker == "DOC4" and stage == "questions":
        return "I cannot do this."
    if marker == "DOC5" and stage == "questions":
        return "\n".join([five[0], five[0].replace("1: W", "2: w").rstrip("?"), *five[2:]])
    if marker == "DOC6" and stage == "questions":
        return "\n".join(five[:2] + five[3:])  # 1, 2, 4, 5
    return None


def test_malformed_output_is_retried_then_rejected_with_its_reason(
    tmp_path, english_docs, sp_model
):
    out = tmp_path / "samples.jsonl"
    with OpenAIStub(FakeModel(_broken)) as server:
        summary = run_self_instruct(run_config([english_docs], out, sp_model, server.base_url))
    samples = {s["meta"]["document_id"]: s["meta"] for s in records(out)}
    rejects = {r["document_id"]: r for r in records(tmp_path / "samples.rejects.jsonl")}
    assert sorted(samples) == ["d1", "d3", "d5", "d7"] and sorted(rejects) == [
        "d0",
        "d2",
        "d4",
        "d6",
    ]
    expected = {
        "d0": (
            "questions",
            "no_numbered_list",
            "These are my thoughts on the text, without any list.",
        ),
        "d2": ("answer", "empty_answer", "   "),
        "d4": ("questions", "refusal", "I cannot do this."),
        "d6": ("questions", "bad_numbering", _broken("DOC6", "questions", 3)),
    }
    for doc, (stage, reason, raw) in expected.items():
        got = rejects[doc]
        assert (got["stage"], got["reason"], got["raw"], got["attempts"]) == (stage, reason, raw, 3)
    assert samples["d1"]["attempts"] == {"questions": 2, "answer": 1}
    assert samples["d3"]["attempts"] == {"questions": 1, "answer": 2}
    assert samples["d5"]["near_duplicates_dropped"] == 1 and samples["d5"]["question_index"] != 1
    # 3 asks for each of d0/d4/d6, 2+1 for d1, 1+3 for d2, 1+2 for d3, 1+1 for d5 and d7
    assert len(server.requests) == 3 * 3 + 3 + 4 + 3 + 2 * 2
    run = summary["this_run"]
    assert run["generated"] == 4 and run["near_duplicate_questions_dropped"] == 1
    assert run["rejected"] == {
        "bad_numbering": 1,
        "empty_answer": 1,
        "no_numbered_list": 1,
        "refusal": 1,
    }
    assert (
        summary["output"]["rejected"] == run["rejected"] and summary["output"]["missing_jobs"] == 0
    )


def test_429_and_500_then_success_honouring_retry_after(tmp_path, english_docs, sp_model):
    seen: dict[tuple[str, str, int], float] = {}

    def flaky(marker, stage, attempt):
        seen[(marker, stage, attempt)] = time.monotonic()
        wait_ms = "400" if marker == "DOC0" else "5"
        if stage == "questions" and attempt == 1:
            return StubReply(status=429, headers={"retry-after-ms": wait_ms})
        if attempt <= (2 if stage == "questions" else 1):
            return StubReply(status=500, headers={"retry-after-ms": "5"})
        return None

    out = tmp_path / "samples.jsonl"
    with OpenAIStub(FakeModel(flaky)) as server:
        summary = run_self_instruct(run_config([english_docs], out, sp_model, server.base_url))
    assert sorted(s["meta"]["document_id"] for s in records(out)) == [f"d{i}" for i in range(8)]
    assert len(server.requests) == 8 * (3 + 2)  # 429, 500, ok; 500, ok
    assert summary["this_run"]["usage"]["requests"] == 16  # answered requests, not HTTP tries
    assert seen[("DOC0", "questions", 2)] - seen[("DOC0", "questions", 1)] >= 0.4


def test_endpoint_down_mid_run_then_resume_without_duplicates(tmp_path, english_docs, sp_model):
    out, answers = tmp_path / "samples.jsonl", []

    def dies_after_three_answers(marker, stage, attempt):
        if len(answers) >= 3:
            return StubReply(status=500, headers={"retry-after-ms": "5"})
        if marker == "DOC1" and stage == "questions":
            return "no list at all"
        if stage == "answer":
            answers.append(marker)
        return None

    config = run_config([english_docs], out, sp_model, "", concurrency=1, max_retries=1)
    with (
        OpenAIStub(FakeModel(dies_after_three_answers)) as server,
        pytest.raises(ChatAPIError, match="HTTP 500"),
    ):
        run_self_instruct(_at(config, server.base_url))
    assert sorted(s["meta"]["document_id"] for s in records(out)) == ["d0", "d2", "d3"]
    assert [r["document_id"] for r in records(tmp_path / "samples.rejects.jsonl")] == ["d1"]
    summary = json.loads((tmp_path / "samples.summary.json").read_text())
    assert summary["status"] == "failed" and summary["output"]["missing_jobs"] == 4

    keep_rejecting = lambda m, s, a: "no list at all" if (m, s) == ("DOC1", "questions") else None  # noqa: E731
    with OpenAIStub(FakeModel(keep_rejecting)) as server:
        summary = run_self_instruct(_at(config, server.base_url))
    assert sorted(marker_of(b) for b in server.requests) == sorted(
        f"DOC{i}" for i in (4, 4, 5, 5, 6, 6, 7, 7)
    )
    ids = [s["meta"]["document_id"] for s in records(out)]
    rejected = [r["document_id"] for r in records(tmp_path / "samples.rejects.jsonl")]
    assert sorted(ids + rejected) == [f"d{i}" for i in range(8)] and rejected == ["d1"]
    assert summary["this_run"]["skipped_done"] == 4 and summary["status"] == "complete"
    assert summary["output"]["samples"] == 7 and summary["output"]["missing_jobs"] == 0


def _at(config, base_url):
    from dataclasses import replace

    return replace(config, endpoint=replace(config.endpoint, base_url=base_url))


def test_a_chinese_document_gets_the_chinese_prompt(tmp_path, sp_model):
    chinese = "文档9 " + "琥珀门的密码藏在城市里，这座城市以编织铜灯笼而闻名。" * 20
    docs = write_documents(
        tmp_path / "docs.jsonl", {"zh": chinese, "en": english_text("DOC1", 80, 1)}
    )
    out = tmp_path / "samples.jsonl"
    with OpenAIStub(FakeModel()) as server:
        run_self_instruct(run_config([docs], out, sp_model, server.base_url, min_tokens=1))
    sample = next(s for s in records(out) if s["meta"]["document_id"] == "zh")
    meta = sample["meta"]
    assert meta["language"] == "zh"
    asked = next(b for b in server.requests if is_question_request(b) and marker_of(b) == "文档9")
    assert (
        asked["messages"][0]["content"]
        == chinese + "\n\n" + QUESTION_PROMPTS["zh"][meta["task_type"]]
    )
    question = questions_for("文档9", chinese=True)[meta["question_index"]]
    assert sample["messages"][0]["content"] == chinese + "\n\n" + question
    assert sample["messages"][1]["content"] == good_answer({"messages": [sample["messages"][0]]})
    english = next(s for s in records(out) if s["meta"]["document_id"] == "en")
    assert english["meta"]["language"] == "en"


def test_same_seed_same_output_whatever_the_order_and_concurrency(tmp_path, english_docs, sp_model):
    reversed_docs = write_documents(
        tmp_path / "reversed.jsonl", dict(reversed(doc_texts(english_docs).items()))
    )
    outputs = {}
    with OpenAIStub(FakeModel()) as server:
        for name, docs, seed, concurrency in [
            ("a", english_docs, 0, 4),
            ("b", reversed_docs, 0, 1),
            ("c", english_docs, 1, 4),
        ]:
            out = tmp_path / name / "samples.jsonl"
            run_self_instruct(
                run_config(
                    [docs], out, sp_model, server.base_url, seed=seed, concurrency=concurrency
                )
            )
            outputs[name] = out
    lines = {
        name: sorted(path.read_text(encoding="utf-8").splitlines())
        for name, path in outputs.items()
    }
    assert lines["a"] == lines["b"] and len(lines["a"]) == 8
    choices = {
        name: sorted(
            (r["meta"]["document_id"], r["meta"]["task_type"], r["meta"]["question_index"])
            for r in records(p)
        )
        for name, p in outputs.items()
    }
    assert choices["c"] != choices["a"]


def test_the_length_window_and_upsampling_are_counted(tmp_path, english_docs, sp_model):
    processor = sentencepiece.SentencePieceProcessor(model_file=sp_model)
    texts = doc_texts(english_docs)
    tokens = {doc: len(processor.encode(text)) for doc, text in texts.items()}
    shortest, longest = min(tokens, key=tokens.get), max(tokens, key=tokens.get)
    second = sorted(tokens.values())[-2]
    rules = {
        "min_tokens": tokens[shortest] + 1,
        "max_tokens": tokens[longest] - 1,
        "upsample_min_tokens": second,
        "upsample_copies": 2,
    }
    out = tmp_path / "samples.jsonl"
    with OpenAIStub(FakeModel()) as server:
        summary = run_self_instruct(
            run_config([english_docs], out, sp_model, server.base_url, **rules)
        )
    docs = summary["documents"]
    assert (docs["read"], docs["too_short"], docs["too_long"], docs["kept"]) == (8, 1, 1, 6)
    assert docs["too_short_ids"] == [shortest] and docs["too_long_ids"] == [longest]
    assert docs["upsampled_copies"] == 1 and docs["jobs"] == 7
    second_id = next(d for d, n in tokens.items() if n == second)
    copies = sorted(
        s["meta"]["copy"] for s in records(out) if s["meta"]["document_id"] == second_id
    )
    assert copies == [1, 2]
    assert sorted(
        s["meta"]["job"] for s in records(out) if s["meta"]["document_id"] == second_id
    ) == [
        second_id,
        f"{second_id}#2",
    ]


def test_a_resume_with_other_settings_is_refused(tmp_path, english_docs, sp_model):
    out = tmp_path / "samples.jsonl"
    with OpenAIStub(FakeModel()) as server:
        run_self_instruct(run_config([english_docs], out, sp_model, server.base_url, seed=0))
        before = out.read_bytes()
        with pytest.raises(SettingsMismatch, match="seed 0 there, 1 now"):
            run_self_instruct(run_config([english_docs], out, sp_model, server.base_url, seed=1))
        assert len(server.requests) == 16 and out.read_bytes() == before
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text(out.read_text())
    with pytest.raises(SettingsMismatch, match="settings are unknown"):
        run_self_instruct(run_config([english_docs], foreign, sp_model, "http://127.0.0.1:9/v1"))


def test_a_bad_document_line_stops_the_run_before_any_request(tmp_path, sp_model):
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"id": "a", "text": "fine text"}\n{"id": "b", "body": "oops"}\n')
    requests_seen = threading.Event()
    with (
        OpenAIStub(lambda body: requests_seen.set() or "x") as server,
        pytest.raises(ValueError, match=rf"{docs}:2: no 'text' field"),
    ):
        run_self_instruct(run_config([docs], tmp_path / "s.jsonl", sp_model, server.base_url))
    assert not requests_seen.is_set() and not (tmp_path / "s.jsonl").exists()
