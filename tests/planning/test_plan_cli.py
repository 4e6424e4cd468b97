"""tools/plan.py end to end (subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "plan.py"), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


def test_llama3_8b_64k_on_8x80gb_recommends_a_fitting_model_parallel_layout():
    proc = run(
        "--model", "conf/model/llama3_8b.yaml", "--seq-length", "65536",
        "--gpus", "8", "--gpu-memory-gb", "80", "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    best = out["recommended"]
    assert best["recommended"] and best["fits"]
    assert best["cp"] > 1 or best["tp"] > 1
    assert best["tp"] * best["pp"] * best["cp"] * best["dp"] == 8
    assert best["memory_gb"]["total"] <= 80
    assert set(best["memory_gb"]) >= {"weights", "grads", "optimizer", "activations", "total"}
    assert sum(row["recommended"] for row in out["layouts"]) == 1


def test_table_output_marks_the_recommendation():
    proc = run("--model", "tiny", "--seq-length", "4096", "--gpus", "2")
    assert proc.returncode == 0, proc.stderr
    assert "recompute" in proc.stdout and "\n* " in proc.stdout


def test_bad_input_is_a_clear_error():
    proc = run("--model", "no_such_model", "--seq-length", "4096", "--gpus", "8")
    assert proc.returncode == 2
    assert "no such file" in proc.stderr and "Traceback" not in proc.stderr
    proc = run("--model", "tiny", "--seq-length", "4096", "--gpus", "8", "--nodes", "3")
    assert proc.returncode == 2 and "--nodes" in proc.stderr


def test_no_fit_names_what_would():
    proc = run(
        "--model", "llama2_7b", "--seq-length", "131072", "--gpus", "1", "--gpu-memory-gb", "80"
    )
    assert proc.returncode == 1
    assert "no layout fits" in proc.stderr and "would fit" in proc.stderr


def test_loss_impl_follows_the_model_and_shows_what_chunked_frees():
    base = ("--model", "llama3_8b", "--seq-length", "65536", "--gpus", "8", "--json")
    chunked = run(*base)
    standard = run(*base, "--loss-impl", "standard")
    assert chunked.returncode == 0 == standard.returncode, chunked.stderr + standard.stderr
    chunked, standard = json.loads(chunked.stdout), json.loads(standard.stdout)
    # llama3_8b.yaml leaves loss_impl at the default (chunked) and the chunk size auto.
    assert (chunked["loss_impl"], chunked["loss_chunk_tokens"]) == ("chunked", None)
    assert standard["loss_impl"] == "standard"
    for out in (chunked, standard):
        for row in out["layouts"]:
            loss = row["loss"]
            assert loss["logits_gb"][out["loss_impl"]] == row["memory_gb"]["logits"]
            assert loss["total_gb"][out["loss_impl"]] == row["memory_gb"]["total"]
            freed = loss["total_gb"]["standard"] - loss["total_gb"]["chunked"]
            assert loss["freed_gb"] == pytest.approx(freed)
            if row["memory_gb"]["logits"] > 0:  # the busiest stage is the last one
                assert loss["logits_gb"]["chunked"] < loss["logits_gb"]["standard"]
    # The standard estimate is today's: the 64k recipe's former layout, 57.3 GB.
    best = standard["recommended"]
    assert (best["tp"], best["cp"], best["dp"], best["recompute"]) == (2, 2, 2, "full")
    assert round(best["memory_gb"]["total"], 1) == 57.3
    assert round(best["memory_gb"]["logits"], 1) == 12.6
    # Each names the other's recommendation.
    keys = ("tp", "pp", "cp", "dp", "recompute", "memory_gb", "step_time_s")
    other = standard["recommended_with_chunked"]
    assert {k: other[k] for k in keys} == {k: chunked["recommended"][k] for k in keys}
    other = chunked["recommended_with_standard"]
    assert {k: other[k] for k in keys} == {k: best[k] for k in keys}


def test_table_shows_freed_memory_and_chunk_override():
    proc = run(
        "--model", "llama3_8b", "--seq-length", "65536", "--gpus", "8", "--top", "3",
        "--loss-chunk-tokens", "4096",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "freed" in proc.stdout.splitlines()[1]
    assert "chunks of 4096 tokens (loss_chunk_tokens)" in proc.stdout
    assert "chunked frees" in proc.stdout and "with loss_impl=standard" in proc.stdout
    bad = run("--model", "tiny", "--seq-length", "4096", "--gpus", "2", "--loss-chunk-tokens", "0")
    assert bad.returncode == 2 and "loss_chunk_tokens" in bad.stderr
