"""One measurement per fresh process, for the benches that report peak memory
(loss_memory_bench.py, gateau_bench.py): a child's peak cannot mix with an earlier
measurement's, and a child the kernel kills for memory is a result, not a crash."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_json_child(script: str, args: list[str], what: str) -> dict:
    """`python script args...` from the repository root; the JSON object on its last
    stdout line. Out of memory (killed by signal 9, or a last stderr line about memory)
    gives {"failed": reason}; any other failure raises RuntimeError naming `what`."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "PYTHONWARNINGS": "ignore",
    }
    proc = subprocess.run(
        [sys.executable, script, *args], capture_output=True, text=True, env=env, cwd=REPO
    )
    if proc.returncode in (-9, 137):
        return {"failed": "killed (out of memory)"}
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["?"]
        if "memory" in tail[0].lower():
            return {"failed": f"out of memory ({tail[0][:120]})"}
        raise RuntimeError(f"{what} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
