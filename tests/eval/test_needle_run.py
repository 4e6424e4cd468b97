"""A needle run end to end with a fake generator: recall scores checked by hand, CSV, PNG
and summary written, resume skips finished cases, judge scoring through a local
OpenAI-compatible stub (an unparseable reply, then a rating), and bad input."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import pytest

from megatron_longalign.eval import needle
from megatron_longalign.eval.judge import parse_rating
from megatron_longalign.eval.needle_scoring import normalize, phrase_recall
from megatron_longalign.utils.jsonl_records import read_records
from tests.eval.needle_fakes import FULL, NOTHING, PARTIAL, FakeGenerator
from tests.helpers.openai_server import OpenAIStub

REPO = Path(__file__).resolve().parents[2]
SP = str(REPO / "data/sample/tokenizer.model")
# fake_answer by depth (a sentence is under 5% of these contexts and the prompt's tail is
# short): 10, 30 -> the needle (recall 1); 60 -> "eat a sandwich" (1/3); 90 -> nothing (0).
DEPTH_RECALL = {10: 1.0, 30: 1.0, 60: 1 / 3, 90: 0.0}


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    needle.add_cli(parser.add_subparsers(dest="command"))
    return parser.parse_args(["needle", *argv])


def grid_args(output: Path, *extra: str) -> list[str]:
    return ["--output", str(output), "--lengths", "900,2000", "--depths", "10,30,60,90",
            "--haystack", "generated", *extra]  # fmt: skip


def test_recall_by_hand():
    phrases = needle.KEY_PHRASES
    assert phrase_recall(FULL, phrases) == (1.0, list(phrases))
    assert phrase_recall(PARTIAL, phrases) == (pytest.approx(1 / 3), ["sandwich"])
    assert phrase_recall(NOTHING, phrases) == (0.0, [])
    assert phrase_recall("Sit in DOLORES-park, on a Sunny  day!", phrases)[0] == pytest.approx(
        2 / 3
    )
    assert phrase_recall("sandwiches in the parking lot", phrases)[0] == 0.0  # word boundaries
    assert normalize("Ｄolores\u00a0Park!") == "dolores park"  # NFKC: full-width letters, nbsp


def test_rating_parse():
    assert parse_rating("Explanation... Rating: [[7]]").value == 7
    assert parse_rating("[[3]] at first, finally [[ 9 ]]").value == 9
    assert parse_rating("Rating: [[11]]").value is None
    assert parse_rating("I would give it a 10").value is None


def test_run_scores_csv_png_summary(tmp_path):
    generator = FakeGenerator(SP)
    assert needle.run_cli(parse(grid_args(tmp_path)), generator=generator) == 0
    records = {r["key"]: r for r in read_records(tmp_path / "results.jsonl")}
    assert len(records) == 8 and len(generator.requested) == 8
    for length in (900, 2000):
        for depth, expected in DEPTH_RECALL.items():
            record = records[f"len{length}_depth{depth}"]
            assert record["score"] == pytest.approx(expected), record["key"]
            assert abs(record["needle_depth"] - depth) < 100 * 60 / length  # one sentence
            # cut at a word start: short by at most one word (<= 10 tokens here)
            assert -10 <= record["context_tokens"] - length <= 2
    rows = list(csv.DictReader((tmp_path / "scores.csv").open()))
    assert [(r["length"], r["depth"]) for r in rows][:2] == [("900", "10"), ("900", "30")]
    assert {(r["length"], r["depth"]): float(r["score"]) for r in rows} == pytest.approx(
        {(str(n), str(d)): s for n in (900, 2000) for d, s in DEPTH_RECALL.items()}
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["mean_score"] == pytest.approx((1 + 1 + 1 / 3 + 0) / 4)
    assert summary["status_counts"] == {"scored": 8}
    assert summary["mean_by_depth"]["60"] == pytest.approx(1 / 3)
    png = (tmp_path / "heatmap.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_resume_skips_finished_cases(tmp_path):
    killed = FakeGenerator(SP, fail_after=3)
    with pytest.raises(RuntimeError, match="killed"):
        needle.run_cli(parse(grid_args(tmp_path)), generator=killed)
    assert len(read_records(tmp_path / "results.jsonl")) == 3
    again = FakeGenerator(SP)
    assert needle.run_cli(parse(grid_args(tmp_path)), generator=again) == 0
    assert len(again.requested) == 5 and not set(again.requested) & set(killed.requested)
    assert len(read_records(tmp_path / "results.jsonl")) == 8
    third = FakeGenerator(SP)
    assert needle.run_cli(parse(grid_args(tmp_path)), generator=third) == 0
    assert third.requested == []
    # a bigger grid runs only the new cells
    fourth = FakeGenerator(SP)
    args = grid_args(tmp_path)
    args[args.index("--depths") + 1] = "10,30,50,60,90"
    assert needle.run_cli(parse(args), generator=fourth) == 0
    assert sorted(fourth.requested) == ["len2000_depth50", "len900_depth50"]


def test_judge_unparseable_then_rated(tmp_path):
    calls: list[str] = []

    def reply(body: dict) -> str:
        answer = body["messages"][1]["content"].split("[The Start of Assistant's Answer]\n")[1]
        calls.append(answer)
        if "Dolores Park" not in answer:
            return "no rating here"  # always unparseable: recorded unparsed, never 0
        return "Looks right. Rating: [[8]]" if len(calls) % 2 == 0 else "Hmm, [[rating]]"

    with OpenAIStub(reply) as server:
        args = grid_args(tmp_path, "--judge-base-url", server.base_url, "--judge-model", "j",
                         "--judge-concurrency", "1", "--judge-retries", "2")  # fmt: skip
        args[args.index("--lengths") + 1] = "900"
        args[args.index("--depths") + 1] = "10,90"
        assert needle.run_cli(parse(args), generator=FakeGenerator(SP)) == 0
        bodies = list(server.requests)
    records = {r["depth"]: r for r in read_records(tmp_path / "results.jsonl")}
    assert records[10]["score"] == 8 and records[10]["status"] == "scored"
    assert records[10]["judge_replies"] == ["Hmm, [[rating]]", "Looks right. Rating: [[8]]"]
    assert records[90]["score"] is None and records[90]["status"] == "unparsed"
    assert len(records[90]["judge_replies"]) == 3  # first try + 2 retries
    assert len(bodies) == 5
    first = bodies[0]["messages"][1]["content"]
    assert "[Ground truth]\n" + needle.NEEDLE in first and "[[rating]]" in first
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status_counts"] == {"scored": 1, "unparsed": 1}
    assert summary["mean_score"] == 8 and summary["unscored_keys"] == ["len900_depth90"]
    csv_rows = list(csv.DictReader((tmp_path / "scores.csv").open()))
    assert [r["score"] for r in csv_rows] == ["8", ""]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--depths", "10,120"], "depths must be in [0, 100]"),
        (["--lengths", "1k,x"], "'x' is not a token count"),
        (["--min-depth", "-5"], "depths must be in [0, 100]"),
        (["--haystack-dir", "MISSING"], "not a directory"),
        (["--needle", "A cat sat."], "give its --key-phrases too"),
        (["--key-phrases", "sandwich,moon"], "['moon'] do not occur in the needle"),
    ],
)
def test_bad_input_exits_2(tmp_path, capsys, change, message):
    args = grid_args(tmp_path / "out")
    if "--haystack-dir" in change:
        args.remove("--haystack"), args.remove("generated")
    if change[0] in args:
        args[args.index(change[0]) + 1] = change[1]
    else:
        args += change
    if change[0] == "--min-depth":
        args = [a for a in args if a not in ("--depths", "10,30,60,90")]
    generator = FakeGenerator(SP)
    assert needle.run_cli(parse(args), generator=generator) == 2
    assert message in capsys.readouterr().err
    assert generator.requested == []


def test_lengths_beyond_the_model_limit_are_refused(tmp_path, capsys):
    args = parse(grid_args(tmp_path))
    args.max_length = 1500  # the shared generation option
    assert needle.run_cli(args, generator=FakeGenerator(SP)) == 2
    assert "exceeds --max-length 1500" in capsys.readouterr().err
    args.max_length = 2005  # 2000 fits alone, not with the question
    generator = FakeGenerator(SP)
    assert needle.run_cli(args, generator=generator) == 2
    assert "plus the question" in capsys.readouterr().err and generator.requested == []


def test_other_setup_in_the_same_output_is_refused(tmp_path, capsys):
    assert needle.run_cli(parse(grid_args(tmp_path)), generator=FakeGenerator(SP)) == 0
    args = parse(grid_args(tmp_path, "--seed", "5"))
    assert needle.run_cli(args, generator=FakeGenerator(SP)) == 2
    assert "another haystack" in capsys.readouterr().err


def test_default_grid():
    from megatron_longalign.eval.needle_grid import depth_grid, length_grid

    assert depth_grid() == [10, 19, 28, 37, 46, 54, 63, 72, 81, 90]
    lengths = length_grid()
    assert lengths[0] == 1000 and lengths[-1] == 64000 and len(lengths) == 10
    assert lengths[1] == 1000 + 7000  # (64000 - 1000) / 9
    assert length_grid("2k,1k,1.5k,1k") == [1000, 1500, 2000]
    assert depth_grid(None, 0, 100, 5) == [0, 25, 50, 75, 100]


def test_heatmap_logged_to_an_offline_wandb_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    args = grid_args(tmp_path, "--wandb-project", "needle-test")
    args[args.index("--lengths") + 1] = "900"
    assert needle.run_cli(parse(args), generator=FakeGenerator(SP)) == 0
    images = list(tmp_path.glob("wandb/offline-run-*/files/media/images/needle/heatmap_*.png"))
    assert len(images) == 1 and images[0].read_bytes().startswith(b"\x89PNG")


def test_no_wandb_without_a_project_or_run(tmp_path):
    from megatron_longalign.eval.needle_report import log_to_wandb

    summary = {"mean_score": 1.0}
    assert log_to_wandb(tmp_path / "h.png", summary, None, "x", tmp_path) is False
    assert not (tmp_path / "wandb").exists()
