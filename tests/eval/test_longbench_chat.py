"""LongBench-Chat end to end on CPU: a fake Generator with canned answers, and
tests/helpers/openai_server.OpenAIStub as the judge, whose replies are derived from the
request (which answer is rated, in which few-shot order), so the expected score is
computed here, by hand, from what the judge was actually shown."""

from __future__ import annotations

import argparse
import itertools
import json
import re
import threading
from collections import Counter
from pathlib import Path

import pytest

from megatron_longalign.eval import generation
from megatron_longalign.eval import longbench_chat as lbc
from megatron_longalign.eval.longbench_chat_data import load_cases
from megatron_longalign.utils.chat_api import ChatAPIError, ChatClient
from megatron_longalign.utils.jsonl_records import read_records
from tests.helpers.openai_server import OpenAIStub, StubReply

# ---- the benchmark files, the model and the judge -------------------------------------

SHOT_SCORES = (10, 6, 2)


def write_benchmark(directory: Path, ids: list[int]) -> tuple[Path, Path]:
    """The public two-file layout: test_cases.json and few_shots.json (item idx-1)."""
    cases = [
        {
            "idx": i,
            "query": f"What does document {i} say?",
            "prompt": f"LONG DOCUMENT {i} " + "filler " * 50 + f"\nWhat does document {i} say?",
            "answer": f"reference {i}",
        }
        for i in ids
    ]
    shots = [
        [{"answer": f"example {i}-{j}", "score": s} for j, s in enumerate(SHOT_SCORES)]
        for i in range(1, max(ids) + 1)
    ]
    (directory / "test_cases.json").write_text(json.dumps(cases))
    (directory / "few_shots.json").write_text(json.dumps(shots))
    return directory / "test_cases.json", directory / "few_shots.json"


class FakeGenerator:
    """The Generator Protocol with canned answers: "answer <key>" (padded with
    whitespace, which the runner strips). `fail_after` raises like a kill."""

    tokenizer_path = "unused"

    def __init__(self, fail_after: int | None = None) -> None:
        self.fail_after = fail_after
        self.requests: list = []
        self.closed = False

    def generate(self, requests, *, desc=None):
        for number, request in enumerate(requests):
            if number == self.fail_after:
                raise RuntimeError("killed while generating")
            self.requests.append(request)
            yield generation.Generation(request.key, f"  answer {request.key}\n", 10, 2, 0)

    def close(self) -> None:
        self.closed = True


class Factory:
    """make_generator for the runner; records every generator it built."""

    def __init__(self, **kwargs) -> None:
        self.kwargs, self.built = kwargs, []

    def __call__(self) -> FakeGenerator:
        self.built.append(FakeGenerator(**self.kwargs))
        return self.built[-1]


BLOCK = re.compile(r"\[Assistant's answer begins\]\n(.*?)\n\[Assistant's answer ends\]", re.S)
PERMUTATIONS = sorted(itertools.permutations(range(3)))
BASE = {1: 5.0, 2: 3.0, 3: 7.0, 4: 6.0, 5: 4.0, 6: 2.0}


def shown(body: dict) -> tuple[int, tuple[int, ...], str]:
    """(query idx of the rated answer, few-shot order, user message) of a judge request."""
    user = body["messages"][1]["content"]
    blocks = BLOCK.findall(user)
    order = tuple(int(block.rsplit("-", 1)[1]) for block in blocks[:-1])
    return int(blocks[-1].split()[-1]), order, user


def good_rating(idx: int, order: tuple[int, ...]) -> float:
    """The rule of the stub judge: a base per query plus 0.5 x the order's rank among
    the 6 permutations, so two different orders always get different ratings."""
    return BASE[idx] + 0.5 * PERMUTATIONS.index(order)


def good_reply(idx: int, order: tuple[int, ...]) -> str:
    # quotes the format first: only the last [[...]] may count
    return f'Format "[[rating]]". Close to the reference.\nRating: [[{good_rating(idx, order):g}]]'


class TroubledJudge:
    """Query 2: every request's first reply is unparseable (the retry parses).
    Query 3: one order (the first asked) always gets [[11]], outside 1-10.
    Query 4: always "[[N/A]]" (both orders unparsed: no score).
    Query 5: the very first request gets HTTP 429 (the client backs off and retries).
    Query 1: plain."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.times: Counter[str] = Counter()
        self.stuck: str | None = None
        self.sent_429 = False

    def __call__(self, body: dict) -> str | StubReply:
        idx, order, user = shown(body)
        with self.lock:
            self.times[user] += 1
            first_time = self.times[user] == 1
            if idx == 3 and self.stuck is None:
                self.stuck = user
            if idx == 5 and not self.sent_429:
                self.sent_429 = True
                return StubReply(status=429, headers={"retry-after-ms": "1"})
        if idx == 2 and first_time:
            return "The answer is partly right."
        if idx == 3 and user == self.stuck:
            return "Rating: [[11]]"
        if idx == 4:
            return "Rating: [[N/A]]"
        return good_reply(idx, order)


def orders_asked(server: OpenAIStub) -> dict[int, list[tuple[int, ...]]]:
    """idx -> the distinct few-shot orders the judge received, in order of arrival."""
    asked: dict[int, list[tuple[int, ...]]] = {}
    for body in server.requests:
        idx, order, _ = shown(body)
        if order not in asked.setdefault(idx, []):
            asked[idx].append(order)
    return asked


def run(directory: Path, server: OpenAIStub, factory: Factory, ids=None, **client_kwargs):
    data, shots = directory / "test_cases.json", directory / "few_shots.json"
    cases = load_cases(data, shots)
    client = ChatClient(
        server.base_url,
        "judge-model",
        cache_path=lbc.judge_cache_path(directory / "out"),
        **client_kwargs,
    )
    try:
        return lbc.run_longbench_chat(cases, factory, client, directory / "out")
    finally:
        client.close()


# ---- the score -------------------------------------------------------------------------


def test_score_is_the_mean_over_two_shuffled_orders_with_unparsed_counted(tmp_path) -> None:
    write_benchmark(tmp_path, [1, 2, 3, 4, 5])
    with OpenAIStub(TroubledJudge()) as server:
        summary = run(tmp_path, server, Factory(), concurrency=2)
    asked = orders_asked(server)
    assert all(len(asked[i]) == 2 for i in range(1, 6))
    # by hand: queries 1, 2, 5 average their two orders' ratings; query 3 has only the
    # order that was not stuck; query 4 has none and is left out of the mean
    expected = {i: sum(good_rating(i, o) for o in asked[i]) / 2 for i in (1, 2, 5)}
    expected[3] = good_rating(3, asked[3][1])
    assert summary["score"] == pytest.approx(sum(expected.values()) / 4)
    assert summary["score_x10"] == pytest.approx(10 * summary["score"])
    assert summary["queries"] == 5 and summary["queries_judged"] == 5
    assert summary["queries_scored"] == 4 and summary["queries_unscored"] == [4]
    assert summary["ratings"] == 10 and summary["ratings_unparsed"] == 1 + 2
    # attempts: q1 1+1, q2 2+2, q3 5+1, q4 5+5, q5 1+1; the 429 is one more HTTP request
    assert summary["judge_attempts"] == 24
    assert len(server.requests) == 25
    assert summary["judge_usage_this_run"]["requests"] == 24
    assert summary["judge_usage_this_run"]["cached"] == 0
    assert summary["complete"] is True

    records = read_records(tmp_path / "out" / "results.jsonl")
    results = {r["idx"]: r for r in records}
    assert len(records) == 5 and sorted(results) == [1, 2, 3, 4, 5]
    assert results[3]["ratings"] == [None, good_rating(3, asked[3][1])]
    assert results[3]["orders"][0]["judge_texts"] == ["Rating: [[11]]"] * 5
    assert "outside 1-10" in results[3]["orders"][0]["problems"][0]
    assert results[4]["score"] is None and results[4]["unparsed"] == 2  # not 0
    assert [o["attempts"] for o in results[2]["orders"]] == [2, 2]
    assert results[2]["score"] == pytest.approx(expected[2])
    assert [tuple(o["order"]) for o in results[1]["orders"]] == asked[1]

    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved == summary
    markdown = (tmp_path / "out" / "summary.md").read_text()
    assert f"| score (1-10) | {summary['score']:.2f} |" in markdown
    assert "| ratings unparsed / asked | 3 / 10 |" in markdown


def test_the_429_was_retried_with_the_same_request(tmp_path) -> None:
    write_benchmark(tmp_path, [5])
    with OpenAIStub(TroubledJudge()) as server:
        summary = run(tmp_path, server, Factory())
    assert len(server.requests) == 3  # 429, its retry, the second order
    assert server.requests[0] == server.requests[1]
    assert summary["ratings_unparsed"] == 0 and summary["queries_scored"] == 1


def test_the_judge_sees_two_different_permutations_and_never_the_document(tmp_path) -> None:
    ids = [1, 2, 3, 4, 5, 6]
    write_benchmark(tmp_path, ids)
    judge = lambda body: good_reply(*shown(body)[:2])  # noqa: E731
    with OpenAIStub(judge) as server:
        run(tmp_path, server, Factory())
    asked = orders_asked(server)
    assert len(server.requests) == 2 * len(ids)
    for idx in ids:
        first, second = asked[idx]
        assert first != second
        assert sorted(first) == sorted(second) == [0, 1, 2]  # every example, once
    assert len({tuple(asked[i]) for i in ids}) > 1  # the seed differs by query
    for body in server.requests:
        assert body["model"] == "judge-model" and body["temperature"] == 0.0
        system, user = body["messages"]
        assert system == {"role": "system", "content": lbc.SYSTEM_PROMPT}
        assert "LONG DOCUMENT" not in user["content"]
        idx, _, _ = shown(body)
        assert f"[Question]\nWhat does document {idx} say?\n" in user["content"]
        assert f"\nreference {idx}\n[Reference answer ends]" in user["content"]
        assert user["content"].endswith(
            f"begins]\nanswer {idx}\n[Assistant's answer ends]\n\nRating: "
        )

    # the same orders on another run (deterministic seed), without any cache
    other = tmp_path / "again"
    other.mkdir()
    write_benchmark(other, ids)
    with OpenAIStub(judge) as server2:
        run(other, server2, Factory())
    assert orders_asked(server2) == asked


PUBLIC_TEMPLATE_LINES = [  # LongBench_Chat/prompt_fs.txt, as published (the reference)
    "[Instructions]",
    "You are asked to evaluate the quality of the AI assistant's answers to user questions as an impartial judge, and your evaluation should take into account factors including correctness (high priority), helpfulness, accuracy, and relevance. The scoring principles are as follows:",
    "1. Read the AI assistant's answer and compare the assistant's answer with the reference answer.",
    "2. Identify all errors in the AI Assistant's answers and consider how much they affect the answer to the question.",
    "3. Evaluate how helpful the AI assistant's answers are in directly answering the user's questions and providing the information the user needs. ",
    "4. Examine any additional information in the AI assistant's answer to ensure that it is correct and closely related to the question. If this information is incorrect or not relevant to the question, points should be deducted from the overall score.",
    "",
    'Please give an overall integer rating from 1 to 10 based on the above principles, strictly in the following format:"[[rating]]", e.g. "[[5]]".',
    "",
    "[Question]",
    "{}",
    "",
    "[Reference answer begins]",
    "{}",
    "[Reference answer ends]",
    "",
    "Below are several assistants' answers and their ratings:",
    "",
    *(
        ["[Assistant's answer begins]", "{}", "[Assistant's answer ends]", "", "Rating: [[{}]]", ""]
        * 3
    ),
    "Please rate the following assistant answers based on the scoring principles and examples above:",
    "",
    "[Assistant's answer begins]",
    "{}",
    "[Assistant's answer ends]",
    "",
    "Rating: ",
]


def test_judge_prompt_is_the_published_template_in_the_given_order(tmp_path) -> None:
    write_benchmark(tmp_path, [1])
    case = load_cases(tmp_path / "test_cases.json", tmp_path / "few_shots.json")[0]
    public = "\n".join(PUBLIC_TEMPLATE_LINES)
    shots = [(f"example 1-{j}", s) for j, s in enumerate(SHOT_SCORES)]
    for order in [(0, 1, 2), (2, 0, 1)]:
        filled = public.format(
            case.query, case.answer, *itertools.chain(*(shots[j] for j in order)), "my answer"
        )
        ours = lbc.judge_prompt(case, "my answer", order)
        # the one difference: the published file has a trailing space after "needs."
        assert ours == filled.replace("user needs. \n", "user needs.\n")


# ---- resume, cache, kills --------------------------------------------------------------


def test_rerun_asks_the_judge_nothing_and_generates_nothing(tmp_path) -> None:
    write_benchmark(tmp_path, [1, 2, 3, 4, 5])
    with OpenAIStub(TroubledJudge()) as server:
        first_factory = Factory()
        first = run(tmp_path, server, first_factory)
        assert len(first_factory.built) == 1 and first_factory.built[0].closed
        assert sorted(r.key for r in first_factory.built[0].requests) == list("12345")
        assert {r.max_new_tokens for r in first_factory.built[0].requests} == {1024}
        sent = len(server.requests)

        factory = Factory()
        second = run(tmp_path, server, factory)  # resume: everything is done
        assert factory.built == [] and len(server.requests) == sent
        assert second["score"] == first["score"]
        assert second["judge_usage_this_run"]["requests"] == 0

        # without the judgments, the reply cache still answers every request
        (tmp_path / "out" / "results.jsonl").unlink()
        third = run(tmp_path, server, factory)
        assert factory.built == [] and len(server.requests) == sent
        assert third["score"] == first["score"]
        assert third["judge_usage_this_run"] == {
            "requests": 0,
            "cached": 24,
            "prompt_tokens": 0,
            "completion_tokens": 0,
        }
        assert third["judge_tokens"] == first["judge_tokens"]  # as recorded when paid


def _fails_after(successes: int):
    """A judge that answers `successes` requests, then fails with HTTP 500."""
    count = Counter()
    lock = threading.Lock()

    def reply(body: dict) -> str | StubReply:
        with lock:
            count["n"] += 1
            if count["n"] > successes:
                return StubReply(status=500, headers={"retry-after-ms": "1"})
        return good_reply(*shown(body)[:2])

    return reply


def test_judge_outage_keeps_partial_results_and_the_rerun_completes(tmp_path) -> None:
    ids = [1, 2, 3, 4]
    write_benchmark(tmp_path, ids)
    out = tmp_path / "out"
    with OpenAIStub(_fails_after(3)) as server, pytest.raises(ChatAPIError, match="HTTP 500"):
        # query 1 (2 requests) and query 2's first order succeed; its second order fails
        run(tmp_path, server, Factory(), concurrency=1, max_retries=1)
    assert [r["idx"] for r in read_records(out / "results.jsonl")] == [1]
    assert [r["idx"] for r in read_records(out / "answers.jsonl")] == ids
    partial = json.loads((out / "summary.json").read_text())
    assert partial["complete"] is False and partial["queries_missing"] == [2, 3, 4]

    factory = Factory()
    with OpenAIStub(lambda body: good_reply(*shown(body)[:2])) as healthy:
        summary = run(tmp_path, healthy, factory)
    assert factory.built == []  # the answers were kept
    assert len(healthy.requests) == 1 + 2 * 2  # query 2's first order came from the cache
    judged = [r["idx"] for r in read_records(out / "results.jsonl")]
    assert judged[0] == 1 and sorted(judged) == [1, 2, 3, 4]  # each once: no duplicates
    assert summary["complete"] is True

    # the same score as a run that was never interrupted
    clean = tmp_path / "clean"
    clean.mkdir()
    write_benchmark(clean, ids)
    with OpenAIStub(lambda body: good_reply(*shown(body)[:2])) as server:
        assert run(clean, server, Factory())["score"] == summary["score"]


def test_a_kill_while_generating_keeps_the_answers_so_far(tmp_path) -> None:
    write_benchmark(tmp_path, [1, 2, 3, 4])
    judge = lambda body: good_reply(*shown(body)[:2])  # noqa: E731
    with OpenAIStub(judge) as server:
        with pytest.raises(RuntimeError, match="killed"):
            run(tmp_path, server, Factory(fail_after=2))
        assert server.requests == []  # nothing judged before every answer exists
        assert [r["idx"] for r in read_records(tmp_path / "out" / "answers.jsonl")] == [1, 2]
        factory = Factory()
        summary = run(tmp_path, server, factory)
    assert [r.key for r in factory.built[0].requests] == ["3", "4"]
    assert [r["idx"] for r in read_records(tmp_path / "out" / "answers.jsonl")] == [1, 2, 3, 4]
    assert summary["queries_scored"] == 4


class RepeatingGenerator(FakeGenerator):
    def generate(self, requests, *, desc=None):
        yield from super().generate(list(requests) + [requests[0]], desc=desc)


def test_a_generator_answering_a_key_twice_is_an_error(tmp_path) -> None:
    write_benchmark(tmp_path, [1, 2])
    with OpenAIStub(lambda body: "[[5]]") as server, pytest.raises(RuntimeError, match="'1'"):
        run(tmp_path, server, RepeatingGenerator)
    assert [r["idx"] for r in read_records(tmp_path / "out" / "answers.jsonl")] == [1, 2]


def test_a_torn_results_line_is_judged_again(tmp_path) -> None:
    write_benchmark(tmp_path, [1, 2])
    judge = lambda body: good_reply(*shown(body)[:2])  # noqa: E731
    with OpenAIStub(judge) as server:
        first = run(tmp_path, server, Factory())
        results = tmp_path / "out" / "results.jsonl"
        lines = results.read_text().splitlines(keepends=True)
        results.write_text(lines[0] + lines[1][:20])  # killed while writing query 2
        again = run(tmp_path, server, Factory())
    assert sorted(r["idx"] for r in read_records(results)) == [1, 2]
    assert again["score"] == first["score"]


def test_an_output_directory_of_another_judge_or_data_is_refused(tmp_path) -> None:
    write_benchmark(tmp_path, [1, 2])
    judge = lambda body: good_reply(*shown(body)[:2])  # noqa: E731
    with OpenAIStub(judge) as server:
        run(tmp_path, server, Factory())
        cases = load_cases(tmp_path / "test_cases.json", tmp_path / "few_shots.json")
        factory = Factory()
        other = ChatClient(server.base_url, "another-judge")
        with pytest.raises(lbc.ResumeError, match="judged by 'judge-model', not 'another-judge'"):
            lbc.run_longbench_chat(cases, factory, other, tmp_path / "out")
        other.close()
        client = ChatClient(server.base_url, "judge-model")
        with pytest.raises(
            lbc.ResumeError, match=r"results.jsonl record [12]: query idx 2 is not in"
        ):
            lbc.run_longbench_chat(cases[:1], factory, client, tmp_path / "out")
        client.close()
        assert factory.built == []


# ---- command line -----------------------------------------------------------------------


def _cli_args(tmp_path: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    lbc.add_cli(parser.add_subparsers(dest="command"))
    argv = ["longbench-chat", "--data", str(tmp_path / "test_cases.json")]
    argv += ["--few-shots", str(tmp_path / "few_shots.json"), "--output", str(tmp_path / "o")]
    return parser.parse_args(argv + list(extra))


def test_cli_options(tmp_path) -> None:
    args = _cli_args(tmp_path, "--judge-model", "gpt-4", "--judge-base-url", "http://h/v1")
    assert args.func is lbc.run_cli and args.max_new_tokens == 1024
    assert (args.judge_model, args.judge_concurrency) == ("gpt-4", 8)
    assert args.judge_api_key_env == "OPENAI_API_KEY"


def test_cli_bad_data_exits_2_naming_file_item_and_field(tmp_path, capsys) -> None:
    write_benchmark(tmp_path, [1, 2])
    cases = json.loads((tmp_path / "test_cases.json").read_text())
    del cases[1]["prompt"]
    (tmp_path / "test_cases.json").write_text(json.dumps(cases))
    args = _cli_args(tmp_path, "--judge-model", "gpt-4", "--judge-base-url", "http://h/v1")
    assert lbc.run_cli(args) == 2
    assert "test_cases.json item 1: field 'prompt' is missing" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing started


def test_cli_without_a_judge_exits_2(tmp_path, capsys) -> None:
    write_benchmark(tmp_path, [1])
    assert lbc.run_cli(_cli_args(tmp_path)) == 2
    assert "needs a judge" in capsys.readouterr().err
    assert lbc.run_cli(_cli_args(tmp_path, "--judge-model", "gpt-4")) == 2
    assert "--judge-base-url is missing" in capsys.readouterr().err
