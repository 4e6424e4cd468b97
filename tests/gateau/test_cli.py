"""tools/gateau.py: bad input exits 2 with one message naming the file, before any model
or process group is built."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CLI = REPO / "tools" / "gateau.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(CLI), *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_score_names_a_missing_checkpoint(tmp_path):
    missing = tmp_path / "no_such_checkpoint"
    result = _run(
        "score", "--prefix", str(tmp_path / "data"), "--model-a", str(missing),
        "--model-b", str(missing), "--output", str(tmp_path / "scores"),
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"gateau score: {missing}" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "scores").exists()


def test_select_with_missing_inputs_exits_2(tmp_path):
    scores = tmp_path / "scores.jsonl"
    result = _run(
        "select", "--prefix", str(tmp_path / "data"), "--scores", str(scores),
        "--output-prefix", str(tmp_path / "selected"), "--ratio", "0.1",
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert str(tmp_path) in result.stderr  # the missing file is named
    assert not (tmp_path / "selected.json").exists()


def test_select_needs_a_ratio_or_a_top_k(tmp_path):
    result = _run("select", "--prefix", "p", "--scores", "s", "--output-prefix", "o")
    assert result.returncode == 2 and "--ratio" in result.stderr
