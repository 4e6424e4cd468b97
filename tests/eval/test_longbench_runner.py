"""The LongBench runner end to end with a fake Generator on a hand-written data folder:
requests, results, hand-computed summary, resume, and input errors before any generation."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from megatron_longalign.eval.longbench import (
    LongBenchIncompleteError,
    add_cli,
    run_longbench,
)
from megatron_longalign.eval.longbench_data import LongBenchInputError, load_tasks
from megatron_longalign.eval.longbench_tasks import TASKS

TREC_CLASSES = ["Date", "City", "Country"]


def _sample(dataset, _id, input_, context, answers, length=100, all_classes=None, lang="en"):
    return {
        "input": input_,
        "context": context,
        "answers": answers,
        "length": length,
        "dataset": dataset,
        "language": lang,
        "all_classes": all_classes,
        "_id": _id,
    }


DATA = {
    "hotpotqa": [
        _sample("hotpotqa", "h1", "Capital of France?", "Paris is the capital.", ["Paris"]),
        _sample("hotpotqa", "h2", "Landmark?", "The {tower} text.", ["the Eiffel Tower", "Eiffel"]),
    ],
    "trec": [
        _sample("trec", "t1", "Where is Rome?", "Q: When? Type: Date", ["City"], 50, TREC_CLASSES),
        _sample("trec", "t2", "When was it?", "Q: Where? Type: City", ["Date"], 50, TREC_CLASSES),
    ],
    "passage_retrieval_zh": [
        _sample("passage_retrieval_zh", "p1", "摘要", "段落1：甲", ["段落3"], 9, lang="zh"),
    ],
}
PREDICTIONS = {
    "hotpotqa/h1": "Paris",  # F1 1
    # vs "eiffel tower": P 2/4, R 1 -> 2/3; vs "eiffel": P 1/4, R 1 -> 2/5; best 2/3
    "hotpotqa/h2": "Eiffel Tower in Paris",
    "trec/t1": "City\nType: Country",  # cut at the newline: only City matches -> 1
    "trec/t2": "Country",  # gold Date not matched -> 0
    "passage_retrieval_zh/p1": "段落3，不是段落13",  # numbers 3 and 13, one right -> 1/2
}
# hotpotqa 100*(1 + 2/3)/2 = 83.33..; trec 100*(1 + 0)/2 = 50; passage_retrieval_zh 50
EXPECTED_TASK_SCORES = {"hotpotqa": 250 / 3, "trec": 50.0, "passage_retrieval_zh": 50.0}
EXPECTED_AVERAGES = {
    "en": (250 / 3 + 50) / 2,
    "zh": 50.0,
    "code": None,
    "overall": (250 / 3 + 50 + 50) / 3,
}


@dataclass(frozen=True)
class FakeGeneration:
    key: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    truncated_tokens: int


class Killed(Exception):
    """Stands for a run killed part-way."""


class FakeGenerator:
    """The Generator protocol with canned answers keyed by the request key."""

    tokenizer_path = "unused"

    def __init__(self, answers, stop_after=None, skip=()):
        self.answers, self.stop_after, self.skip = answers, stop_after, set(skip)
        self.requests = []
        self.closed = False

    def generate(self, requests, *, desc=None):
        self.requests.extend(requests)
        for number, request in enumerate(requests):
            if number == self.stop_after:
                raise Killed
            if request.key in self.skip:
                continue
            yield FakeGeneration(request.key, self.answers[request.key], 10, 2, 0)

    def close(self):
        self.closed = True


def _never():
    raise AssertionError("the generator must not be built")


def write_data(folder: Path, data=DATA, suffix="") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for task, samples in data.items():
        lines = [json.dumps(s, ensure_ascii=False) for s in samples]
        (folder / f"{task}{suffix}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def _check_summary(summary):
    assert list(summary["tasks"]) == ["hotpotqa", "trec", "passage_retrieval_zh"]  # LongBench order
    for task, expected in EXPECTED_TASK_SCORES.items():
        assert summary["tasks"][task]["score"] == pytest.approx(expected)
    assert summary["tasks"]["trec"]["samples"] == 2
    for name, expected in EXPECTED_AVERAGES.items():
        assert summary["averages"][name] == (None if expected is None else pytest.approx(expected))


def test_end_to_end_with_fake_generator(tmp_path):
    data_dir = write_data(tmp_path / "data")
    out = tmp_path / "out"
    generator = FakeGenerator(PREDICTIONS)
    summary = run_longbench(data_dir, out, lambda: generator)
    _check_summary(summary)
    assert generator.closed
    # The requests: LongBench's prompt filled in, its generation budget.
    by_key = {r.key: r for r in generator.requests}
    assert sorted(by_key) == sorted(PREDICTIONS)
    assert by_key["trec/t1"].prompt == (
        "Please determine the type of the question below. Here are some examples of "
        "questions.\n\nQ: When? Type: Date\nWhere is Rome?"
    )
    assert by_key["trec/t1"].max_new_tokens == 64
    # As LongBench's pred.py: few-shot tasks without the chat template, QA inside it.
    assert by_key["trec/t1"].raw and not by_key["hotpotqa/h1"].raw
    assert by_key["hotpotqa/h2"].max_new_tokens == 32
    assert "The {tower} text." in by_key["hotpotqa/h2"].prompt  # braces in data are kept
    # Files: one result per case, the summary as JSON and markdown, no temporary left.
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["key"] for r in records) == sorted(PREDICTIONS)
    assert {r["key"]: r["prediction"] for r in records} == PREDICTIONS
    assert json.loads((out / "summary.json").read_text()) == summary
    markdown = (out / "summary.md").read_text()
    assert "| hotpotqa | en | Multi-Doc QA | qa_f1 | 2 | 83.33 |" in markdown
    assert "| overall | 61.11 |" in markdown
    assert sorted(p.name for p in out.iterdir()) == ["results.jsonl", "summary.json", "summary.md"]


def test_tasks_option_selects_and_orders(tmp_path):
    data_dir = write_data(tmp_path / "data")
    selected = load_tasks(data_dir, ["trec", "hotpotqa"])
    assert [t.task.name for t in selected] == ["trec", "hotpotqa"]
    assert [t.task.name for t in load_tasks(data_dir)] == list(EXPECTED_TASK_SCORES)


def test_resume_generates_only_missing_cases(tmp_path):
    data_dir = write_data(tmp_path / "data")
    out = tmp_path / "out"
    first = FakeGenerator(PREDICTIONS, stop_after=2)
    with pytest.raises(Killed):
        run_longbench(data_dir, out, lambda: first)
    assert first.closed
    done = [json.loads(x)["key"] for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(done) == 2 and not (out / "summary.json").exists()
    # A kill in the middle of a line leaves a torn tail: ignored, that case is redone.
    with open(out / "results.jsonl", "a", encoding="utf-8") as handle:
        handle.write('{"key": "trec/t2", "predic')
    second = FakeGenerator(PREDICTIONS)
    summary = run_longbench(data_dir, out, lambda: second)
    assert sorted(r.key for r in second.requests) == sorted(set(PREDICTIONS) - set(done))
    _check_summary(summary)
    lines = (out / "results.jsonl").read_text().splitlines()
    assert sorted(json.loads(x)["key"] for x in lines) == sorted(PREDICTIONS)
    # Everything done: a rerun rewrites the summary without building a generator.
    _check_summary(run_longbench(data_dir, out, _never))


def test_missing_generations_are_an_error_and_kept_for_the_rerun(tmp_path):
    data_dir = write_data(tmp_path / "data")
    out = tmp_path / "out"
    with pytest.raises(LongBenchIncompleteError, match="1 case"):
        run_longbench(data_dir, out, lambda: FakeGenerator(PREDICTIONS, skip={"trec/t2"}))
    assert not (out / "summary.json").exists()
    rerun = FakeGenerator(PREDICTIONS)
    _check_summary(run_longbench(data_dir, out, lambda: rerun))
    assert [r.key for r in rerun.requests] == ["trec/t2"]


def test_longbench_e_length_buckets(tmp_path):
    qasper = [
        _sample("qasper_e", "a", "q", "c", ["yes"], length=100),
        _sample("qasper_e", "b", "q", "c", ["yes"], length=4000),  # 4000 is in 4-8k
        _sample("qasper_e", "c", "q", "c", ["yes"], length=9000),
    ]
    data_dir = write_data(tmp_path / "data", {"qasper": qasper}, suffix="_e")
    answers = {"qasper_e/a": "yes", "qasper_e/b": "no", "qasper_e/c": "yes"}
    summary = run_longbench(data_dir, tmp_path / "out", lambda: FakeGenerator(answers), None, True)
    entry = summary["tasks"]["qasper"]
    assert entry["score"] == pytest.approx(200 / 3)
    assert {k: v["score"] for k, v in entry["length_buckets"].items()} == {
        "0-4k": 100.0,
        "4-8k": 0.0,
        "8k+": 100.0,
    }
    assert summary["benchmark"] == "LongBench-E"
    with pytest.raises(LongBenchInputError, match="unknown LongBench-E task"):
        load_tasks(data_dir, ["narrativeqa"], longbench_e=True)


# ---- bad input: clear errors before any generation ---------------------------------------------
def _broken(tmp_path, task, text):
    data_dir = write_data(tmp_path / "data")
    (data_dir / f"{task}.jsonl").write_text(text, encoding="utf-8")
    return data_dir


def _line(sample):
    return json.dumps(sample, ensure_ascii=False) + "\n"


GOOD_TREC = DATA["trec"][0]


@pytest.mark.parametrize(
    ("task", "second_line", "message"),
    [
        ("trec", "{not json\n", "not valid JSON"),
        ("trec", _line({k: v for k, v in GOOD_TREC.items() if k != "answers"}), "answers"),
        ("trec", _line({**GOOD_TREC, "_id": "t9", "length": "12"}), "'length' has type str"),
        ("trec", _line({**GOOD_TREC, "_id": "t9", "answers": []}), "non-empty list"),
        ("trec", _line(GOOD_TREC), "_id 't1' already used on line 1"),
        ("trec", _line({**GOOD_TREC, "_id": "t9", "all_classes": None}), "classification"),
        ("trec", _line({**GOOD_TREC, "_id": "t9", "dataset": "lsht"}), "wrong file"),
        (
            "passage_retrieval_zh",
            _line({**DATA["passage_retrieval_zh"][0], "_id": "x"} | {"answers": ["3"]}),
            "段落",
        ),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path, task, second_line, message):
    first = _line(DATA[task][0])
    data_dir = _broken(tmp_path, task, first + second_line)
    with pytest.raises(LongBenchInputError) as err:
        run_longbench(data_dir, tmp_path / "out", _never)
    assert f"{data_dir / f'{task}.jsonl'}:2:" in str(err.value)
    assert message in str(err.value)
    assert not (tmp_path / "out").exists()


def test_task_selection_errors(tmp_path):
    data_dir = write_data(tmp_path / "data")
    with pytest.raises(LongBenchInputError, match="unknown LongBench task.*nosuch"):
        run_longbench(data_dir, tmp_path / "out", _never, tasks=["trec", "nosuch"])
    with pytest.raises(LongBenchInputError, match="missing data file.*qasper.jsonl"):
        run_longbench(data_dir, tmp_path / "out", _never, tasks=["qasper"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LongBenchInputError, match="no LongBench file"):
        run_longbench(empty, tmp_path / "out", _never)
    with pytest.raises(LongBenchInputError, match="no samples"):
        run_longbench(_broken(tmp_path, "trec", "\n"), tmp_path / "out", _never)


def test_damaged_results_file_is_an_error_before_generation(tmp_path):
    data_dir = write_data(tmp_path / "data")
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.jsonl").write_text('{"key": "trec/t1", "prediction": "City"}\n{oops\n')
    with pytest.raises(ValueError, match=r"results.jsonl:2"):
        run_longbench(data_dir, out, _never)


def test_cli_reports_bad_input_with_status_2(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers())
    data_dir = write_data(tmp_path / "data")
    args = parser.parse_args(
        ["longbench", "--data-dir", str(data_dir), "--output", str(tmp_path / "o")]
        + ["--tasks", "trec,nosuch"]
    )
    assert args.func(args) == 2
    assert "nosuch" in capsys.readouterr().err


def test_task_table_spot_checks():
    # Values read off LongBench's config/dataset2maxlen.json and eval.py.
    assert len(TASKS) == 21
    assert (TASKS["narrativeqa"].max_new_tokens, TASKS["gov_report"].max_new_tokens) == (128, 512)
    assert TASKS["lsht"].metric == "classification" and TASKS["lsht"].language == "zh"
    assert TASKS["dureader"].metric == "rouge_l_zh"
    assert TASKS["repobench-p"].metric == "code_sim" and TASKS["repobench-p"].raw_prompt
    assert TASKS["samsum"].first_line_only and not TASKS["lcc"].first_line_only
    assert not TASKS["qasper"].raw_prompt
