"""A simulated Slurm cluster on this machine: fake `sbatch`, `srun` and `scontrol`
(tests/slurm/fake_slurm.py) first in PATH, a submit directory, and the test datasets."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.launch import REPO, worker_env

FAKE_SLURM = Path(__file__).resolve().parent / "fake_slurm.py"


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_job_id() -> int:
    """A job id whose derived rendezvous port (20000 + id % 20000) is free now."""
    rng = random.Random()
    while True:
        job_id = rng.randrange(100_000, 1_000_000)
        if _port_is_free(20000 + job_id % 20000):
            return job_id


@dataclass
class FakeCluster:
    bin: Path
    submit_dir: Path  # the "repository" the job is submitted from (slurm/ linked)
    log: Path  # what the fake commands did (FAKE_SLURM_LOG)
    demo_dir: Path

    def env(self, job_id: int, restart: int = 0, **extra: str) -> dict[str, str]:
        env = worker_env()
        env.pop("WANDB_API_KEY", None)
        env.update(
            PATH=f"{self.bin}{os.pathsep}{env['PATH']}",
            FAKE_SLURM_JOB_ID=str(job_id),
            FAKE_SLURM_RESTART_COUNT=str(restart),
            # 127.0.0.1 and .2: both loopback, so the "first node" is reachable.
            FAKE_SLURM_NODELIST="127.0.0.[1-2]",
            FAKE_SLURM_LOG=str(self.log),
            PYTHON=sys.executable,
            EXPERIMENT="smoke",  # the tiny CPU model on DEMO_OUT's data
            DEMO_OUT=str(self.demo_dir),
            WANDB_MODE="offline",
            WANDB_SILENT="true",
        )
        env.update(extra)
        return env

    def records(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def kill_leftovers(self) -> None:
        """SIGKILL every fake srun and task this test started that is still alive (a
        failed test can leave ranks blocked in a collective; SIGTERM would only ask them
        to save)."""
        for record in self.records():
            words = record.split()
            if words[:2] == ["srun", "pid"] or words[:1] == ["task"]:
                pid = int(words[2] if words[0] == "srun" else words[3])
                with contextlib.suppress(OSError):  # gone already
                    # Still ours, not a reused pid: a fake srun or a training task.
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                    if b"fake_slurm.py" in cmdline or b"megatron_longalign.train" in cmdline:
                        os.kill(pid, signal.SIGKILL)


@pytest.fixture
def cluster(tmp_path, sample_prefixes) -> Iterator[FakeCluster]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for command in ("sbatch", "srun", "scontrol"):
        wrapper = bin_dir / command
        wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_SLURM}" {command} "$@"\n')
        wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    # The submit directory stands in for the repository (REPO_DIR defaults to it): its
    # slurm/ is the real one, logs/ and outputs/ are written there, not in the checkout.
    submit_dir = tmp_path / "repo"
    submit_dir.mkdir()
    (submit_dir / "slurm").symlink_to(REPO / "slurm")
    (submit_dir / "logs").mkdir()  # as the script's usage says: Slurm will not create it
    demo_dir = tmp_path / "demo"
    demo_dir.mkdir()
    for name, prefix in (
        ("long", sample_prefixes["long"]),
        ("short_chat", sample_prefixes["short"]),
    ):
        # P.json names its files relative to its real directory: the link is enough.
        os.symlink(prefix + ".json", demo_dir / (name + ".json"))
    cluster = FakeCluster(bin_dir, submit_dir, tmp_path / "slurm.log", demo_dir)
    yield cluster
    cluster.kill_leftovers()
