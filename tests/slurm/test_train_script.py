"""slurm/train_64k.sh under a simulated Slurm cluster (tests/slurm/conftest.py): two
"nodes" as local process groups, the tiny smoke model in CPU mode, the launch, the
per-job logs, the wandb run id, and the signal trap that saves and requeues."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_longalign.training.checkpoint import read_marker
from megatron_longalign.training.preemption import PREEMPTED_EXIT_CODE
from tests.helpers.launch import REPO
from tests.slurm.conftest import FakeCluster, free_job_id

SCRIPT = REPO / "slurm" / "train_64k.sh"
FAKE_TRAINER = Path(__file__).resolve().parent / "fake_trainer.py"
JOB_NAME = "longalign-64k"  # the script's #SBATCH --job-name
TINY = ("data.seq_length=1024", "optim.lr_warmup_steps=1", "logging.log_interval=1")


def submit(cluster: FakeCluster, env: dict, *args: str) -> subprocess.Popen:
    """`sbatch [args]` from the submit directory; the fake runs the job in the foreground
    and its pid is the batch shell's."""
    command = [str(cluster.bin / "sbatch"), *args]
    return subprocess.Popen(
        command, cwd=cluster.submit_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def finish(proc: subprocess.Popen, timeout: float = 150) -> tuple[int, str]:
    """The job's status and sbatch's own output (the script's goes to logs/)."""
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()  # the batch shell; the fixture kills srun and the tasks
        output, _ = proc.communicate()
        raise AssertionError(f"the job ran over {timeout}s:\n{output.decode()}") from None
    return proc.returncode, output.decode(errors="replace")


def wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and text in path.read_text(errors="replace")):
        if proc.poll() is not None:
            raise AssertionError(f"the job ended before {text!r} appeared in {path}")
        assert time.monotonic() < deadline, f"{text!r} never appeared in {path}"
        time.sleep(0.1)


def wait_for_lines(path: Path, prefix: str, count: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while (
        not path.exists()
        or sum(line.startswith(prefix) for line in path.read_text().splitlines()) < count
    ):
        assert proc.poll() is None, f"the job ended early: {proc.communicate()[0]!r}"
        assert time.monotonic() < deadline, f"fewer than {count} {prefix!r} lines in {path}"
        time.sleep(0.05)


def batch_log(cluster: FakeCluster, job_id: int) -> str:
    return (cluster.submit_dir / "logs" / f"{JOB_NAME}-{job_id}.out").read_text()


def requeues(cluster: FakeCluster) -> list[str]:
    return [r for r in cluster.records() if r.startswith("scontrol requeue")]


def latest(run_dir: Path) -> int:
    return int((run_dir / "checkpoints" / "latest").read_text().strip().split("_")[1])


# ---- without training --------------------------------------------------------------------


def test_dry_run_shows_the_derived_launch(cluster):
    env = cluster.env(
        123,
        SLURM_JOB_ID="123",
        SLURM_JOB_NAME="my run/64k",
        SLURM_JOB_NUM_NODES="2",
        SLURM_JOB_NODELIST="gpu[07-08]",
        SLURM_GPUS_ON_NODE="8",
        SLURM_SUBMIT_DIR=str(cluster.submit_dir),
        SLURM_RESTART_COUNT="2",
        CONTAINER_IMAGE="/images/la.sqsh",
        EXPERIMENT="train_64k",
        DRY_RUN="1",
    )
    result = subprocess.run(
        ["bash", str(SCRIPT), "data.seq_length=32768"], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    repo = cluster.submit_dir
    assert "world size 16, rendezvous gpu07:20123" in out  # first host; 20000 + id % 20000
    assert "wandb run id my-run-64k-123" in out  # the job name made a valid wandb id
    assert f"logs {repo}/logs/my-run-64k-123/attempt-2" in out
    train = next(line for line in out.splitlines() if line.startswith("train:"))
    for part in (
        "--nodes=2",
        "--ntasks-per-node=8",
        "--ntasks=16",
        "--kill-on-bad-exit=0",
        "--gpu-bind=none",
        "--container-image=/images/la.sqsh",
        f"--container-mounts={repo}:{repo}",
        f"{repo}/slurm/srun_task.sh",
        "+experiment=train_64k",
        "train.resume=auto",
        "logging.wandb.run_id=my-run-64k-123",
    ):
        assert part in train, (part, train)
    # Derived overrides first, the command line's last (so they win).
    assert train.rstrip().endswith("data.seq_length=32768")
    assert train.index("train.output_dir=") < train.index("data.seq_length=32768")
    config = next(line for line in out.splitlines() if line.startswith("config:"))
    assert "--ntasks=1" in config and "--cfg job --resolve" in config
    assert cluster.records() == []  # nothing was launched


def test_refuses_to_run_outside_a_job(cluster):
    env = cluster.env(1)
    env.pop("SLURM_JOB_ID", None)
    result = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True)
    assert result.returncode != 0 and "run inside a Slurm job" in result.stderr


def test_a_bad_override_fails_before_training_and_is_not_requeued(cluster):
    job_id = free_job_id()
    proc = submit(cluster, cluster.env(job_id), str(SCRIPT), "train.no_such_field=1")
    status, output = finish(proc, timeout=120)
    assert status not in (0, PREEMPTED_EXIT_CODE), output
    srun_calls = [r for r in cluster.records() if r.startswith("srun --")]
    assert len(srun_calls) == 1 and "--cfg job" in srun_calls[0]  # the config step only
    assert not requeues(cluster)


# ---- the trap, with a stand-in trainer (tests/slurm/fake_trainer.py) --------------------


def fake_trainer_env(cluster: FakeCluster, tmp_path: Path, **extra: str) -> tuple[dict, Path]:
    python = cluster.bin / "fake-python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_TRAINER}" "$@"\n')
    python.chmod(0o755)
    trainer_log = tmp_path / "trainer.log"
    env = cluster.env(free_job_id(), PYTHON=str(python), FAKE_TRAINER_LOG=str(trainer_log))
    env.update(extra)
    return env, trainer_log


def test_sigterm_to_the_batch_shell_reaches_the_tasks_as_sigusr1(cluster, tmp_path):
    # Never SIGTERM to srun: srun (and the fake) would SIGKILL the tasks, losing the save.
    env, trainer_log = fake_trainer_env(cluster, tmp_path)
    proc = submit(cluster, env, "--nodes=2", "--gpus-per-node=2", str(SCRIPT))
    wait_for_lines(trainer_log, "ready", 4, proc)
    proc.send_signal(signal.SIGTERM)
    status, output = finish(proc, timeout=60)
    job_id = env["FAKE_SLURM_JOB_ID"]
    log = batch_log(cluster, int(job_id))
    assert status == PREEMPTED_EXIT_CODE, output + log
    assert "caught SIGTERM" in log
    assert "srun forwards SIGUSR1 as SIGUSR1" in cluster.records()
    got = sorted(line for line in trainer_log.read_text().splitlines() if " got " in line)
    assert got == [f"{rank} got SIGUSR1" for rank in range(4)]
    assert requeues(cluster) == [f"scontrol requeue {job_id}"]


def test_a_signal_before_the_training_starts_requeues_at_once(cluster, tmp_path):
    env, trainer_log = fake_trainer_env(cluster, tmp_path, FAKE_TRAINER_CONFIG_SLEEP="3")
    proc = submit(cluster, env, "--nodes=2", "--gpus-per-node=1", str(SCRIPT))
    deadline = time.monotonic() + 30
    while not any(r.startswith("task 0 ") for r in cluster.records()):  # the config step
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    status, output = finish(proc, timeout=60)
    assert status == PREEMPTED_EXIT_CODE, output
    assert len([r for r in cluster.records() if r.startswith("srun --")]) == 1  # config only
    assert not trainer_log.exists()
    assert requeues(cluster)


def test_requeue_can_be_turned_off(cluster, tmp_path):
    env, trainer_log = fake_trainer_env(cluster, tmp_path, REQUEUE="0")
    proc = submit(cluster, env, "--nodes=1", "--gpus-per-node=1", str(SCRIPT))
    wait_for_lines(trainer_log, "ready", 1, proc)
    proc.send_signal(signal.SIGUSR1)
    status, output = finish(proc, timeout=60)
    assert status == PREEMPTED_EXIT_CODE, output
    assert "not requeued (REQUEUE=0)" in batch_log(cluster, int(env["FAKE_SLURM_JOB_ID"]))
    assert not requeues(cluster)


# ---- training ----------------------------------------------------------------------------


@pytest.mark.slow
def test_two_nodes_train_into_the_per_job_directory(cluster):
    job_id = free_job_id()
    args = ("--nodes=2", "--gpus-per-node=2", str(SCRIPT), *TINY)
    overrides = ("train.max_steps=3", "data.global_batch_size=4")  # DP 4
    status, output = finish(submit(cluster, cluster.env(job_id), *args, *overrides))
    log = batch_log(cluster, job_id)
    assert status == 0, output + log
    assert f"world size 4, rendezvous 127.0.0.1:{20000 + job_id % 20000}" in log

    # Step 0 printed the config (one task); step 1 trained: 2 nodes x 2 tasks, ranks 0-3 on
    # nodes 0, 0, 1, 1.
    tasks = [r.split() for r in cluster.records() if r.startswith("task ")]
    assert [t[7] for t in tasks] == ["0", "1", "1", "1", "1"]
    tasks = tasks[1:]
    assert [(t[1], t[5]) for t in tasks] == [("0", "0"), ("1", "0"), ("2", "1"), ("3", "1")]

    attempt = cluster.submit_dir / "logs" / f"{JOB_NAME}-{job_id}" / "attempt-0"
    assert sorted(p.name for p in attempt.glob("rank*.log")) == [f"rank{r}.log" for r in range(4)]
    rank0 = (attempt / "rank0.log").read_text()
    assert "step 3 | loss" in rank0 and "done: 3 steps (0 skipped)" in rank0, rank0
    config = (attempt / "config.yaml").read_text()  # resolved: no ${...} left
    run_id = f"{JOB_NAME}-{job_id}"
    assert "name: smoke" in config and f"run_id: {run_id}" in config and "${" not in config
    assert (attempt / "hydra" / ".hydra" / "config.yaml").exists()

    run_dir = cluster.submit_dir / "outputs" / JOB_NAME
    assert latest(run_dir) == 3
    marker = read_marker(run_dir / "checkpoints" / "step_00000003")
    assert marker["layout"]["world_size"] == 4
    assert marker["extra"]["wandb_run_id"] == run_id
    assert [p.name.endswith(f"-{run_id}") for p in (run_dir / "wandb").glob("offline-run-*")] == [
        True
    ]
    assert not requeues(cluster)


@pytest.mark.slow
def test_signals_save_requeue_and_resume(cluster):
    """Attempt 0: SIGUSR1 to the batch shell (Slurm's --signal=B:USR1). Attempt 1 (the
    requeued job): SIGTERM to one task only. Attempt 2: runs to the end."""
    job_id, steps = free_job_id(), 30
    args = (
        "--gpus-per-node=1",
        str(SCRIPT),
        *TINY,
        f"train.max_steps={steps}",
        "train.save_interval=0",
    )
    logs = cluster.submit_dir / "logs" / f"{JOB_NAME}-{job_id}"
    run_dir = cluster.submit_dir / "outputs" / JOB_NAME
    run_id = f"{JOB_NAME}-{job_id}"

    # Attempt 0: the trap forwards SIGUSR1 to srun, srun to both tasks; they finish the
    # step, save, exit 75, and the script requeues the job.
    proc = submit(cluster, cluster.env(job_id), *args)
    wait_for(logs / "attempt-0" / "rank0.log", "step 1 |", proc)
    proc.send_signal(signal.SIGUSR1)
    status, output = finish(proc)
    log = batch_log(cluster, job_id)
    assert status == PREEMPTED_EXIT_CODE, output + log
    assert "caught SIGUSR1" in log and f"requeueing job {job_id}" in log
    assert "srun forwards SIGUSR1 as SIGUSR1" in cluster.records()
    assert requeues(cluster) == [f"scontrol requeue {job_id}"]
    first_stop = latest(run_dir)
    assert 1 <= first_stop < steps
    for rank in (0, 1):
        assert "received SIGUSR1" in (logs / "attempt-0" / f"rank{rank}.log").read_text()

    # Attempt 1 resumes; SIGTERM to rank 1's process alone still stops both (the
    # decision is all-reduced), at the same step, with one checkpoint.
    proc = submit(cluster, cluster.env(job_id, restart=1), *args)
    rank0_log = logs / "attempt-1" / "rank0.log"
    wait_for(rank0_log, f"step {first_stop + 1} |", proc)
    rank1_pid = int([r for r in cluster.records() if r.startswith("task 1 ")][-1].split()[3])
    os.kill(rank1_pid, signal.SIGTERM)
    status, output = finish(proc)
    assert status == PREEMPTED_EXIT_CODE, output + batch_log(cluster, job_id)
    assert requeues(cluster) == [f"scontrol requeue {job_id}"] * 2
    rank0, rank1 = rank0_log.read_text(), (logs / "attempt-1" / "rank1.log").read_text()
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{first_stop:08d}'}" in rank0
    assert "rank 1 received SIGTERM" in rank1 and "received SIG" not in rank0
    second_stop = latest(run_dir)
    assert first_stop < second_stop < steps

    # Attempt 2 finishes: no requeue; the same wandb run all along.
    status, output = finish(submit(cluster, cluster.env(job_id, restart=2), *args))
    assert status == 0, output + batch_log(cluster, job_id)
    assert len(requeues(cluster)) == 2
    assert latest(run_dir) == steps
    assert f"done: {steps - second_stop} steps" in (logs / "attempt-2" / "rank0.log").read_text()
    marker = read_marker(run_dir / "checkpoints" / f"step_{steps:08d}")
    assert marker["extra"]["wandb_run_id"] == run_id
    wandb_runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 3 and all(p.name.endswith(f"-{run_id}") for p in wandb_runs)
    assert sorted(p.name for p in logs.iterdir()) == ["attempt-0", "attempt-1", "attempt-2"]
    # The batch log was appended to by every attempt (--open-mode=append).
    assert batch_log(cluster, job_id).count(f"job {job_id} ({JOB_NAME}) attempt") == 3
