"""Table-driven bad-input cases: each case prepares a broken situation in a fresh
directory, runs one command line in a subprocess, and asserts three things:

1. the exit status (non-zero, and the documented one for the kind of failure);
2. a message that names the file or the config field that is wrong, with no traceback;
3. that nothing valid was lost or overwritten: every file listed in `protected` has the
   same bytes after the run as before it.

A case module (tests/reliability/test_<area>.py) builds a list of `Case` and runs
`run_case` on each through pytest parametrisation.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers.launch import REPO, worker_env


@dataclass
class Setup:
    """What a case's `prepare` returns: the command to run and what must survive it."""

    command: Sequence[str]
    protected: Sequence[Path] = ()  # files (or directories, recursively) that must not change
    env: dict[str, str] = field(default_factory=dict)
    # Strings the output must contain that are only known once the case is prepared
    # (e.g. a temporary path). Joined to the case's static `expect`.
    expect: Sequence[str] = ()
    timeout: int = 300


@dataclass
class Case:
    name: str
    prepare: Callable[[Path], Setup]  # gets an empty directory
    exit_code: int  # the status the command must exit with
    expect: Sequence[str] = ()  # regexes the combined output must match (re.search)
    traceback_allowed: bool = False


def python_command(*args: str) -> list[str]:
    return [sys.executable, *args]


def tool(name: str, *args: str) -> list[str]:
    """A command line for tools/<name>.py."""
    return [sys.executable, str(REPO / "tools" / f"{name}.py"), *args]


def digest_tree(paths: Sequence[Path]) -> dict[str, str]:
    """path -> sha256 of every file under `paths` (a missing path is recorded as such)."""
    digests: dict[str, str] = {}
    for root in paths:
        root = Path(root)
        if not root.exists():
            digests[str(root)] = "<missing>"
            continue
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for file in files:
            digests[str(file)] = hashlib.sha256(file.read_bytes()).hexdigest()
    return digests


def run_case(case: Case, directory: Path) -> subprocess.CompletedProcess:
    setup = case.prepare(directory)
    before = digest_tree(setup.protected)
    env = worker_env()
    env.pop("WANDB_API_KEY", None)
    env.update({"WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0"})
    env.update(setup.env)
    result = subprocess.run(
        list(setup.command),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=setup.timeout,
    )
    output = result.stdout + result.stderr
    assert result.returncode == case.exit_code, (
        f"{case.name}: exit {result.returncode}, expected {case.exit_code}\n{output}"
    )
    for pattern in [*case.expect, *(re.escape(s) for s in setup.expect)]:
        assert re.search(pattern, output), f"{case.name}: {pattern!r} not in output\n{output}"
    if not case.traceback_allowed:
        assert "Traceback" not in output, f"{case.name}: printed a traceback\n{output}"
    after = digest_tree(setup.protected)
    assert after == before, f"{case.name}: protected files changed: " + ", ".join(
        sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    )
    return result


def case_ids(cases: Sequence[Case]) -> list[str]:
    return [case.name for case in cases]


__all__ = ["Case", "Setup", "case_ids", "digest_tree", "python_command", "run_case", "tool"]
