"""Preemption (megatron_longalign/training/preemption.py): signal handling, the
collective stop decision, the save and the exit status, and an exact resume after
SIGUSR1 and then SIGTERM (subprocesses, compared bit for bit with an uninterrupted run)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from megatron_longalign.training import preemption
from megatron_longalign.training.checkpoint import CheckpointManager, read_marker
from megatron_longalign.training.schedule import build_scheduler, warmup_steps
from megatron_longalign.training.trainer import Trainer
from megatron_longalign.training.validate import config_problems
from tests.helpers.launch import REPO, worker_env
from tests.helpers.tiny_training import read_losses, tiny_training_config

WORKER = Path(__file__).resolve().parent / "workers" / "preempt_run.py"
STEPS = 8

pytestmark = pytest.mark.usefixtures("distributed_teardown")


@pytest.fixture(autouse=True)
def _no_handlers_left() -> Iterator[None]:
    yield
    preemption.uninstall()


# ---- the handlers ------------------------------------------------------------------------


def test_install_records_signals_and_uninstall_restores():
    before = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    assert preemption.install(["SIGUSR1", "TERM"])
    assert not preemption.install()  # idempotent: already installed
    assert preemption.received_signal() is None
    assert not preemption.stop_requested()  # no process group: the local flag
    os.kill(os.getpid(), signal.SIGUSR1)
    time.sleep(0.01)  # Python runs the handler at the next bytecode boundary
    assert preemption.received_signal() == "SIGUSR1"
    assert preemption.stop_requested()
    preemption.uninstall()
    assert {s: signal.getsignal(s) for s in before} == before
    assert preemption.received_signal() is None


def test_handling_is_a_no_op_inside_an_outer_install():
    preemption.install()
    preemption.request_stop(signal.SIGTERM)  # e.g. during model loading
    with preemption.handling():
        assert preemption.received_signal() == "SIGTERM"  # kept
    assert preemption.installed()  # the outer install still holds
    preemption.uninstall()
    with preemption.handling([]):  # nothing to handle
        assert not preemption.installed()


def test_signal_names_are_checked():
    assert preemption.signal_number("usr1") == signal.SIGUSR1
    assert preemption.signal_number(15) == signal.SIGTERM
    with pytest.raises(ValueError, match="unknown signal 'SIGNOPE'"):
        preemption.signal_number("SIGNOPE")
    config = tiny_training_config({"a": "/nonexistent"})
    config.train.preemption_signals = ["SIGUSR1", "SIGNOPE"]
    problems = config_problems(config, 1, check_files=False)
    assert any("train.preemption_signals" in p and "SIGNOPE" in p for p in problems), problems


def test_exit_code_matches_the_launcher():
    script = (REPO / "slurm" / "train_64k.sh").read_text()
    assert f"readonly PREEMPTED_EXIT_CODE={preemption.PREEMPTED_EXIT_CODE}" in script


# ---- start-up: install_early(), then the configured set ---------------------------------


def handlers(*signums: int) -> dict[int, object]:
    return {s: signal.getsignal(s) for s in signums}


def test_install_early_keeps_a_signal_for_the_configured_set():
    before = handlers(signal.SIGUSR1, signal.SIGTERM, signal.SIGUSR2)
    assert preemption.install_early()  # the defaults: SIGUSR1 and SIGTERM
    assert not preemption.install_early()  # once
    os.kill(os.getpid(), signal.SIGUSR1)  # during the imports
    time.sleep(0.01)
    assert preemption.pending_before_start() == "SIGUSR1"
    # The config handles SIGUSR1 and SIGUSR2, not SIGTERM.
    assert preemption.install(["SIGUSR1", "SIGUSR2"])
    assert preemption.pending_before_start() is None  # settled
    assert preemption.received_signal() == "SIGUSR1"  # kept: stops at the first step boundary
    assert preemption.stop_requested(step=0)
    assert signal.getsignal(signal.SIGTERM) == before[signal.SIGTERM]  # given back
    assert signal.getsignal(signal.SIGUSR2) != before[signal.SIGUSR2]  # caught from now on
    assert not preemption.install(["SIGUSR1"])  # settled: idempotent again
    with preemption.handling():  # the Trainer's: a no-op, the signal is kept
        assert preemption.received_signal() == "SIGUSR1"
    preemption.uninstall()
    assert handlers(*before) == before


def test_an_empty_configured_set_gives_every_signal_back():
    before = handlers(signal.SIGUSR1, signal.SIGTERM)
    preemption.install_early()
    assert not preemption.install([])  # train.preemption_signals=[]: the default actions
    assert not preemption.installed() and handlers(*before) == before
    assert preemption.pending_before_start() is None


def test_a_start_up_signal_the_config_does_not_handle_takes_its_default_action():
    # What the signal would have done without the early handler, once the config is known.
    script = (
        "import os, signal, time\n"
        "from megatron_longalign.training import preemption\n"
        "preemption.install_early()\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(0.05)\n"
        "print('recorded', preemption.pending_before_start(), flush=True)\n"
        "preemption.install(['SIGUSR1'])\n"
        "print('still alive')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=worker_env(), capture_output=True, text=True
    )
    assert result.returncode == -signal.SIGTERM, result
    assert "recorded SIGTERM" in result.stdout and "still alive" not in result.stdout
    assert "SIGTERM during start-up; it is not in train.preemption_signals" in result.stderr


def test_the_early_handlers_come_before_any_slow_import():
    # preemption imports no torch, and importing the entry point (not running it) installs
    # nothing.
    script = (
        "import signal, sys\n"
        "from megatron_longalign.training import preemption\n"
        "assert 'torch' not in sys.modules and 'hydra' not in sys.modules, sorted(sys.modules)\n"
        "import megatron_longalign.train\n"
        "assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL\n"
        "assert not preemption.installed()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=worker_env(), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


# ---- warmup as a fraction ----------------------------------------------------------------


def test_warmup_fraction_of_the_decay_steps():
    config = tiny_training_config({"a": "/nonexistent"}, max_steps=200)
    optim = config.optim
    optim.lr_warmup_steps, optim.lr_warmup_fraction = 0, 0.03
    assert warmup_steps(optim, 200) == 6
    optim.lr_decay_steps = 100
    assert warmup_steps(optim, 200) == 3
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=optim.lr)
    scheduler = build_scheduler(optimizer, optim, 200)
    assert scheduler.lr_warmup_steps == 3
    assert not config_problems(config, 1, check_files=False)
    optim.lr_warmup_steps = 2  # both set: ambiguous
    problems = config_problems(config, 1, check_files=False)
    assert any("lr_warmup_fraction" in p and "lr_warmup_steps" in p for p in problems)
    optim.lr_warmup_steps, optim.lr_warmup_fraction = 0, 1.0
    assert any("[0, 1)" in p for p in config_problems(config, 1, check_files=False))
    optim.lr_warmup_fraction = None  # unset: lr_warmup_steps as before
    optim.lr_warmup_steps = 4
    assert warmup_steps(optim, 200) == 4


# ---- in the Trainer (this process) -------------------------------------------------------


class SignalAtStep:
    """A MetricsLogger stand-in that sends this process `signum` when `step` is logged."""

    run_id = "sig-run"

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum, self.steps = step, signum, []

    def log(self, step, metrics, force=False) -> bool:
        self.steps.append(step)
        if step == self.step:
            os.kill(os.getpid(), self.signum)
        return True

    def close(self) -> None:
        pass


def test_trainer_stops_saves_and_restores_handlers(sample_prefixes, tmp_path):
    ckpt = tmp_path / "ckpt"
    config = tiny_training_config(
        sample_prefixes, max_steps=6, checkpoint_dir=str(ckpt), save_interval=0
    )
    before = signal.getsignal(signal.SIGUSR1)
    logger = SignalAtStep(2, signal.SIGUSR1)
    trainer = Trainer(config, metrics_logger=logger)
    history = trainer.train()
    # Step 2 finished, then the stop: saved at 2, nothing after it ran.
    assert trainer.preempted and trainer.state.step == 2
    assert [r.step for r in history] == [1, 2] and logger.steps == [1, 2]
    assert CheckpointManager(ckpt).latest() == ckpt / "step_00000002"
    assert read_marker(ckpt / "step_00000002")["plan_position"]["step"] == 2
    assert signal.getsignal(signal.SIGUSR1) == before  # train() uninstalled its handlers

    # A signal while the next attempt is being built (the entry point installs the
    # handlers first): it stops at the first step boundary, before any step, and has
    # nothing new to save.
    preemption.install()
    preemption.request_stop(signal.SIGTERM)
    early = Trainer(config, metrics_logger=SignalAtStep(0, signal.SIGUSR1))
    assert early.state.step == 2
    assert early.train() == [] and early.preempted
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_00000002"]
    preemption.uninstall()

    # A later train() starts with no stale request and finishes.
    resumed = Trainer(config, metrics_logger=SignalAtStep(0, signal.SIGUSR1))
    assert resumed.train() and not resumed.preempted and resumed.state.step == 6
    assert CheckpointManager(ckpt).latest() == ckpt / "step_00000006"


# ---- subprocesses: SIGUSR1, then SIGTERM, then the end; exact ----------------------------


def worker(data: Path, ckpt: Path, losses: Path, weights: Path) -> list[str]:
    return [
        sys.executable,
        str(WORKER),
        f"--data={data}",
        f"--ckpt={ckpt}",
        f"--losses={losses}",
        f"--weights={weights}",
        f"--steps={STEPS}",
        "--step-sleep=0.3",
    ]


def run(command: list[str], signum: int | None = None, after_step: int = 0) -> tuple[int, str]:
    """Run a worker; with `signum`, send it once step `after_step` is logged."""
    losses = Path(next(a for a in command if a.startswith("--losses=")).split("=", 1)[1])
    proc = subprocess.Popen(
        command,
        cwd=REPO,
        env=worker_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if signum is not None:
        deadline = time.monotonic() + 120
        while after_step not in read_losses(losses):
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "the worker never reached the step"
            time.sleep(0.05)
        proc.send_signal(signum)
    output, _ = proc.communicate(timeout=180)
    return proc.returncode, output


@pytest.mark.slow
def test_sigusr1_then_sigterm_resume_exactly(sample_prefixes, tmp_path):
    data = tmp_path / "prefixes.json"
    data.write_text(json.dumps(sample_prefixes))

    reference_losses, reference_weights = tmp_path / "ref.jsonl", tmp_path / "ref.pt"
    status, output = run(worker(data, tmp_path / "ref_ckpt", reference_losses, reference_weights))
    assert status == 0, output
    reference = read_losses(reference_losses)
    assert sorted(reference) == list(range(1, STEPS + 1))

    # Attempt 1: SIGUSR1 after step 2. It finishes the step it is in, saves that step and
    # exits with 75; the saved step is the last one it logged.
    ckpt, weights = tmp_path / "ckpt", tmp_path / "weights.pt"
    first = tmp_path / "first.jsonl"
    status, output = run(worker(data, ckpt, first, weights), signal.SIGUSR1, after_step=2)
    assert status == preemption.PREEMPTED_EXIT_CODE, output
    assert "SIGNAL SIGUSR1" in output, output
    stopped = max(read_losses(first))
    assert 2 <= stopped < STEPS
    assert CheckpointManager(ckpt).latest() == ckpt / f"step_{stopped:08d}"

    # Attempt 2 resumes there; SIGTERM after one more step: the same.
    second = tmp_path / "second.jsonl"
    status, output = run(
        worker(data, ckpt, second, weights), signal.SIGTERM, after_step=stopped + 1
    )
    assert status == preemption.PREEMPTED_EXIT_CODE, output
    assert f"RESUMED_FROM {ckpt / f'step_{stopped:08d}'}" in output
    assert "SIGNAL SIGTERM" in output, output
    assert min(read_losses(second)) == stopped + 1
    stopped_again = max(read_losses(second))
    assert stopped_again < STEPS, "the SIGTERM came too late to test anything"
    assert CheckpointManager(ckpt).latest() == ckpt / f"step_{stopped_again:08d}"

    # Attempt 3 runs to the end.
    third = tmp_path / "third.jsonl"
    status, output = run(worker(data, ckpt, third, weights))
    assert status == 0, output
    assert "EXIT 0 STEP 8" in output

    # Together, every step exactly once, each bit for bit the uninterrupted run's; and
    # the same final weights.
    attempts = [read_losses(first), read_losses(second), read_losses(third)]
    steps = [step for attempt in attempts for step in sorted(attempt)]
    assert steps == list(range(1, STEPS + 1))
    for attempt in attempts:
        for step, record in attempt.items():
            for key in ("train/loss", "train/token_mean_loss", "train/grad_norm", "train/lr"):
                assert record[key] == reference[step][key], (step, key)
    final, expected = torch.load(weights), torch.load(reference_weights)
    assert final.keys() == expected.keys()
    for name in expected:
        assert torch.equal(final[name], expected[name]), name
