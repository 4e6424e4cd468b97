"""bench/train_throughput.py end to end in its CPU smoke mode, in a subprocess (it joins a
single-process megatron job of its own): it exits cleanly, reports naive/sorted/packed
with positive finite throughput on identical real tokens, and reports no MFU on CPU."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "train_throughput.py"


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "throughput.json"
    command = [
        sys.executable,
        str(SCRIPT),
        "--device-profile",
        "cpu-smoke",
        # The tightest setting that still runs every code path: one pack length, sdpa.
        "--seq-lengths",
        "256",
        "--backends",
        "sdpa",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--ab-samples",
        "48",
        "--output-json",
        str(out),
    ]
    # Hide any GPU: the smoke mode is a CPU run by definition (and MFU must be absent).
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "NOT meaningful" in proc.stdout  # the CPU disclaimer is printed
    return json.loads(out.read_text())


def _finite(row: dict, keys: tuple[str, ...]) -> None:
    for key in keys:
        assert isinstance(row[key], (int, float)) and math.isfinite(row[key]), (key, row)


def test_batching_modes_are_measured_on_the_same_tokens(report):
    modes = report["batching"]["modes"]
    assert set(modes) == {"naive", "sorted", "packed"}
    for row in modes.values():
        _finite(row, ("tokens_per_sec", "seconds", "tflops_per_gpu", "speedup_vs_naive"))
        assert row["tokens_per_sec"] > 0 and row["steps"] > 0
    # One epoch of the same samples in every mode.
    assert len({row["real_tokens"] for row in modes.values()}) == 1
    # The speed-up is each mode's measured rate over naive's (wall times differ per mode).
    naive_rate = modes["naive"]["tokens_per_sec"]
    for row in modes.values():
        assert row["tokens_per_sec"] == pytest.approx(row["real_tokens"] / row["seconds"])
        assert row["speedup_vs_naive"] == pytest.approx(row["tokens_per_sec"] / naive_rate)
    # Naive pads inside micro-batches; sorted and packed run exactly the real tokens.
    assert modes["naive"]["computed_tokens"] >= modes["naive"]["real_tokens"]
    assert modes["packed"]["computed_tokens"] == modes["packed"]["real_tokens"]


def test_sweep_row_and_no_mfu_on_cpu(report):
    assert report["profile"] == "cpu-smoke"
    (row,) = report["sweep"]
    assert row["status"] == "ok" and row["seq_length"] == 256 and row["backend"] == "sdpa"
    _finite(row, ("tokens_per_sec", "tflops_per_gpu", "step_time_s"))
    assert row["tokens_per_sec"] > 0
    # No accelerator peak on CPU: MFU must be absent, never a made-up number.
    assert row["mfu"] is None
    assert all(r["mfu"] is None for r in report["batching"]["modes"].values())
