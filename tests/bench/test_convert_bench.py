"""bench/convert_bench.py end to end on a small model, in a subprocess: every
measurement runs and the table reports each step (memory figures are for the bench to
report on a real size, not for a test to assert: at this size they are mostly noise)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_convert_bench_runs_every_measurement():
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "convert_bench.py"),
            "--hidden",
            "256",
            "--layers",
            "2",
            "--vocab",
            "1000",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = {line.split("  ")[0].strip() for line in result.stdout.splitlines()}
    for step in ("baseline", "naive import", "import (streaming)", "export (streaming)"):
        assert step in rows, result.stdout
