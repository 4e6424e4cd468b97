"""tools/plan.py end to end (subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
