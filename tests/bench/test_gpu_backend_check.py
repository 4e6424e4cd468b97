"""bench/gpu_backend_check.py: its pass/fail rule on hand-made rows, and its CPU smoke run
(the code path the GPU run takes, with sdpa in bf16 against the fp32 reference)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu_backend_check.py"
sys.path.insert(0, str(SCRIPT.parent))

import gpu_backend_check as check  # noqa: E402


def _row(backend: str, dtype: str, grad: float, loss_diff: float = 0.0) -> dict:
    return {
        "backend": backend,
        "dtype": dtype,
        "loss": 9.0,
        "loss_rel_diff": loss_diff,
        "grad_rel_error": grad,
    }


def test_flex_bf16_is_judged_against_sdpa_bf16():
    sdpa = _row("sdpa", "bfloat16", 0.012)
    # limit = 1.5 x 0.012 + 0.002 = 0.020
    assert check.judge([sdpa, _row("flex", "bfloat16", 0.0199)]) == []
    failures = check.judge([sdpa, _row("flex", "bfloat16", 0.0201)])
    assert len(failures) == 1 and failures[0].startswith("flex bfloat16")


def test_fp32_loss_and_nan_rules():
    assert check.judge([_row("flex", "float32", 5e-5)]) == []
    assert check.judge([_row("flex", "float32", 2e-4)])  # over 1e-4
    assert check.judge([_row("flex", "float32", float("nan"))])  # NaN never passes
    assert check.judge([_row("flex", "float32", 0.0, loss_diff=0.02)])  # loss over 1e-2


def test_cpu_smoke_run(tmp_path):
    out = tmp_path / "check.json"
    command = [sys.executable, str(SCRIPT), "--device", "cpu", "--tokens", "300"]
    command += ["--backends", "sdpa", "--output-json", str(out)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    (row,) = report["rows"]
    assert (row["backend"], row["dtype"]) == ("sdpa", "bfloat16")
    # bf16 differs from the fp32 reference by bf16's rounding, no more and not zero.
    assert 1e-4 < row["grad_rel_error"] < 5e-2
    assert report["failures"] == [] and report["max_position"] > 300  # positions skipped
