"""Run a worker script under torchrun from pytest, and read back what its ranks wrote.

Workers live in tests/<package>/workers/ (`run_and_read` looks in tests/parallel/workers/)
and import shared code as `tests.helpers.<module>`: `worker_env` puts the repository
root on their PYTHONPATH. Each rank writes `<out>/rank<R>.json`; the
pytest side merges and compares. Workers run with OMP_NUM_THREADS=1 because the CI
machine has two cores shared by up to four ranks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORKERS = REPO / "tests" / "parallel" / "workers"

# Variables a parent torchrun (or a distributed pytest run) could leak into the child.
_DIST_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def worker_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _DIST_VARS and not k.startswith("TORCHELASTIC_")
    }
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONWARNINGS"] = "ignore"
    # The package is installed editable, but be explicit so a plain checkout works too;
    # the root also makes `tests.helpers` importable in the workers.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def run_workers(
    script: Path, nproc: int, args: list[str], timeout: int = 300
) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node nproc script args...`; raises
    RuntimeError with the captured output if it fails or times out."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        str(script),
        *args,
    ]
    try:
        result = subprocess.run(
            command,
            env=worker_env(),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as err:
        raise RuntimeError(
            f"{script.name} (nproc={nproc}) timed out after {timeout}s\n"
            f"--- stdout ---\n{_text(err.stdout)}\n--- stderr ---\n{_text(err.stderr)}"
        ) from err
    if result.returncode != 0:
        raise RuntimeError(
            f"{script.name} (nproc={nproc}) exited with {result.returncode}\n"
            f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
        )
    return result


def _text(stream: bytes | str | None) -> str:
    if isinstance(stream, bytes):
        return stream.decode(errors="replace")
    return stream or ""


def read_rank_results(out_dir: Path) -> list[dict]:
    """Every rank's JSON result, ordered by global rank."""
    paths = sorted(out_dir.glob("rank*.json"), key=lambda p: int(p.stem[len("rank") :]))
    if not paths:
        raise FileNotFoundError(f"no rank*.json in {out_dir}")
    return [json.loads(p.read_text()) for p in paths]


def run_and_read(
    script_name: str, nproc: int, out_dir: Path, args: Sequence[str] = (), timeout: int = 300
) -> list[dict]:
    """Run workers/<script_name> with `--out out_dir` and return the rank results."""
    run_workers(WORKERS / script_name, nproc, ["--out", str(out_dir), *args], timeout)
    return read_rank_results(out_dir)
