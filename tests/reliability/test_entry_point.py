"""`python -m megatron_longalign.train` fails clearly (issue 10).

- Every configuration error exits with status 2 and a message that names the key, with
  no traceback, whoever finds it: Hydra's composition (an unknown key, a value of the
  wrong type, a group option that does not exist, an override it cannot parse), the
  entry point (a key added with `+` that no config class has), OmegaConf's resolution,
  or the start-up validation. Before, Hydra's own errors exited 1.
- SIGUSR1 in the first moments of the process, long before the imports are done,
  ends the run with status 75 (requeue) and a message, and writes no checkpoint; an
  existing checkpoint is left as it was. Before, the process died of the signal at once,
  with no output (status -10), and slurm/train_64k.sh did not requeue.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from megatron_longalign.training.preemption import PREEMPTED_EXIT_CODE
from tests.helpers.launch import REPO, worker_env
from tests.reliability.harness import Case, Setup, digest_tree, python_command, run_case
from tests.slurm.conftest import FakeCluster, cluster, free_job_id  # noqa: F401 (fixture)

CONFIG_EXIT = 2  # train.py CONFIG_ERROR_EXIT_CODE


def train_command(run: Path, *overrides: str) -> list[str]:
    """The smoke experiment (tiny model, CPU), writing under `run`."""
    return python_command(
        "-m",
        "megatron_longalign.train",
        "+experiment=smoke",
        f"train.output_dir={run}",
        "logging.progress_bar=false",
        "logging.wandb.mode=disabled",
        *overrides,
    )


def with_overrides(*overrides: str, env: dict[str, str] | None = None) -> Callable[[Path], Setup]:
    """A case that runs the smoke experiment with `overrides`; it must write no checkpoint."""

    def prepare(directory: Path) -> Setup:
        run = directory / "run"
        return Setup(train_command(run, *overrides), protected=[run / "checkpoints"], env=env or {})

    return prepare


CONFIG_CASES = [
    # Hydra's composition: before, exit 1.
    Case(
        "unknown key",
        with_overrides("optim.lrr=1"),
        CONFIG_EXIT,
        [
            r"invalid configuration",
            r"optim\.lrr: Key 'lrr' not in 'OptimConfig'",
            r"did you mean optim\.lr\?",
        ],
    ),
    Case(
        "unknown key while printing the config (the Slurm script's config step)",
        with_overrides("optim.lrr=1", "--cfg", "job", "--resolve"),
        CONFIG_EXIT,
        [r"optim\.lrr", r"did you mean optim\.lr\?"],
    ),
    Case(
        "unknown key with HYDRA_FULL_ERROR=1: the same status, and the traceback asked for",
        with_overrides("optim.lrr=1", env={"HYDRA_FULL_ERROR": "1"}),
        CONFIG_EXIT,
        [r"Traceback", r"ConfigCompositionException", r"optim\.lrr", r"did you mean optim\.lr\?"],
        traceback_allowed=True,
    ),
    Case(
        "wrong value type",
        with_overrides("train.max_steps=abc"),
        CONFIG_EXIT,
        [r"train\.max_steps: Value 'abc' of type 'str' could not be converted to Integer"],
    ),
    Case(
        "a value where a section belongs",
        with_overrides("train.recompute=3"),
        CONFIG_EXIT,
        [r"train\.recompute: .*RecomputeConfig"],
    ),
    Case(
        "unknown config group option",
        with_overrides("model=nope"),
        CONFIG_EXIT,
        [r"model=nope: no such option; choose one of .*llama3_8b.*tiny"],
    ),
    Case(
        "override that does not parse",
        with_overrides("train.max_steps=[1"),
        CONFIG_EXIT,
        [r"train\.max_steps=\[1: cannot parse this override"],
    ),
    # Inside the task: before, `+` typos were ignored silently and OmegaConf errors
    # exited 1 with a traceback.
    Case(
        "unknown key added with +",
        with_overrides("+optim.lrr=1"),
        CONFIG_EXIT,
        [r"optim\.lrr: OptimConfig has no field 'lrr' \(did you mean optim\.lr\?\)"],
    ),
    Case(
        "interpolation that does not resolve",
        with_overrides("optim.lr=${nope}"),
        CONFIG_EXIT,
        [r"optim\.lr: Interpolation key 'nope' not found"],
    ),
    # The start-up validation (ConfigError): exit 2 already; the same status and form.
    Case(
        "invalid value caught by the validation",
        with_overrides("optim.optimizer=adamw"),
        CONFIG_EXIT,
        [r"invalid configuration", r"optim\.optimizer"],
    ),
]
# The ones that get as far as the task function import the trainer (about 10 s).
SLOW_CASES = {
    "unknown key added with +",
    "interpolation that does not resolve",
    "invalid value caught by the validation",
}


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, id=c.name, marks=[pytest.mark.slow] if c.name in SLOW_CASES else [])
        for c in CONFIG_CASES
    ],
)
def test_config_error(case: Case, tmp_path: Path) -> None:
    result = run_case(case, tmp_path)
    # One message, not Hydra's own report next to ours.
    output = result.stdout + result.stderr
    assert "Set the environment variable HYDRA_FULL_ERROR" not in output, output
    assert output.count("invalid configuration") == 1, output


# ---- SIGUSR1 while the process starts --------------------------------------------------------


def catches(pid: int, signum: int) -> bool:
    """Whether process `pid` has a handler for `signum` (SigCgt in /proc/<pid>/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(mask, 16) >> (signum - 1) & 1)


def start_and_signal(
    command: list[str], when: str, signum: int = signal.SIGUSR1, timeout: float = 300
) -> tuple[int, str, float]:
    """Run `command`; send it `signum` at `when`: "earliest" (the moment it has a handler
    for it, polled every 0.5 ms), or a delay in seconds after Popen. Returns the exit
    status, the output and when the signal went (seconds after Popen returned)."""
    env = worker_env()
    env.pop("WANDB_API_KEY", None)
    env.update({"WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0"})
    proc = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    start = time.monotonic()
    try:
        if when == "earliest":
            while not catches(proc.pid, signum):
                assert proc.poll() is None and time.monotonic() - start < 10, "no handler came"
                time.sleep(0.0005)
        else:
            time.sleep(float(when))
        assert proc.poll() is None, "the process ended before the signal"
        sent = time.monotonic() - start
        proc.send_signal(signum)
        output, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, output, sent


def assert_preempted_at_start_up(status: int, output: str, sent: float) -> None:
    assert status == PREEMPTED_EXIT_CODE, f"exit {status}\n{output}"
    assert sent < 0.5, f"the signal went {sent:.3f} s after the start"
    assert "received SIGUSR1 during start-up" in output, output
    assert "Traceback" not in output, output


@pytest.fixture(scope="module")
def checkpointed(sample_prefixes, tmp_path_factory) -> tuple[Path, str]:
    """A run directory with one checkpoint (step 1) of the smoke experiment on the test
    data, and the data prefix."""
    run = tmp_path_factory.mktemp("checkpointed") / "run"
    prefix = sample_prefixes["short"]
    case = Case(
        "one step",
        lambda _: Setup(train_command(run, *data_overrides(prefix), "train.max_steps=1")),
        exit_code=0,
        expect=[r"done: 1 steps"],
    )
    run_case(case, run.parent / "unused")
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000001"
    return run, prefix


def data_overrides(prefix: str) -> list[str]:
    return [
        f"data.sources=[{{prefix:'{prefix}',weight:1.0}}]",
        "data.seq_length=256",
        "optim.lr_warmup_steps=0",
    ]


@pytest.mark.slow
def test_sigusr1_at_the_first_moment_exits_75_without_a_checkpoint(sample_prefixes, tmp_path):
    """A fresh run: nothing to save, so nothing is written under checkpoints/."""
    run = tmp_path / "run"
    command = train_command(run, *data_overrides(sample_prefixes["short"]), "train.max_steps=3")
    status, output, sent = start_and_signal(command, "earliest")
    assert_preempted_at_start_up(status, output, sent)
    assert "stopping before the first step, with no checkpoint to save" in output, output
    assert "the next attempt starts from the beginning" in output, output
    checkpoints = run / "checkpoints"
    assert not checkpoints.exists() or not any(checkpoints.iterdir()), list(checkpoints.iterdir())


@pytest.mark.slow
def test_sigusr1_during_the_imports_exits_75_and_keeps_the_checkpoint(checkpointed, tmp_path):
    """A run that resumes: the signal during the imports (0.3 s in) stops it before its
    first step; the checkpoint it resumed from is unchanged and no other appears."""
    trained, prefix = checkpointed
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for path in (trained / "checkpoints").iterdir():
        target = run / "checkpoints" / path.name
        if path.is_dir():
            shutil.copytree(path, target)
        else:
            shutil.copy2(path, target)
    before = digest_tree([run / "checkpoints"])
    command = train_command(run, *data_overrides(prefix), "train.max_steps=3")
    status, output, sent = start_and_signal(command, "0.3")
    assert_preempted_at_start_up(status, output, sent)
    assert f"resumed from {run / 'checkpoints' / 'step_00000001'}" in output, output
    assert "nothing new to save" in output, output
    assert digest_tree([run / "checkpoints"]) == before


def test_sigusr1_while_printing_the_config_exits_75(tmp_path):
    """The Slurm script's config step (`--cfg job`) trains nothing: it prints the config
    in full, then exits 75 with a message."""
    command = train_command(tmp_path / "run", "--cfg", "job", "--resolve")
    status, output, sent = start_and_signal(command, "earliest", timeout=120)
    assert status == PREEMPTED_EXIT_CODE, f"exit {status}\n{output}"
    assert "name: smoke" in output and "preemption_signals:" in output, output
    assert "received SIGUSR1 before the training started: nothing to save" in output, output
    assert "Traceback" not in output, output


def test_slurm_script_requeues_when_the_config_step_is_preempted(cluster: FakeCluster):  # noqa: F811
    """`scancel --signal=USR1` during slurm/train_64k.sh's config step reaches that task
    (not the batch shell): it exits 75, and the script requeues without starting the
    training. Before, the task died of the signal and the script exited without requeue."""
    job_id = free_job_id()
    proc = subprocess.Popen(
        [str(cluster.bin / "sbatch"), "--gpus-per-node=1", str(REPO / "slurm" / "train_64k.sh")],
        cwd=cluster.submit_dir,
        env=cluster.env(job_id),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        pid = None
        while pid is None:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
            tasks = [r.split() for r in cluster.records() if r.startswith("task 0 pid ")]
            pid = int(tasks[0][3]) if tasks else None
            time.sleep(0.005)
        while not catches(pid, signal.SIGUSR1):
            assert time.monotonic() < deadline, "the config task never handled SIGUSR1"
            time.sleep(0.0005)
        os.kill(pid, signal.SIGUSR1)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    log = (cluster.submit_dir / "logs" / f"longalign-64k-{job_id}.out").read_text()
    assert proc.returncode == PREEMPTED_EXIT_CODE, output + log
    assert "received SIGUSR1 before the training started" in log, log
    assert f"requeueing job {job_id}" in log, log
    assert [r for r in cluster.records() if r.startswith("scontrol requeue")] == [
        f"scontrol requeue {job_id}"
    ]
    assert len([r for r in cluster.records() if r.startswith("srun --")]) == 1  # config only
