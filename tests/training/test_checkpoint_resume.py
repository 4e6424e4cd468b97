"""Checkpointing in the Trainer: an exact resume after SIGKILL (subprocesses), and the
save schedule, data position and wandb run id (in this process)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_longalign.data.planner import PlanPosition
from megatron_longalign.training.checkpoint import (
    MARKER,
    CheckpointError,
    CheckpointManager,
    read_marker,
)
from megatron_longalign.training.trainer import Trainer
from tests.helpers.launch import REPO, worker_env
from tests.helpers.tiny_training import Recorder, read_losses, tiny_training_config

WORKER = Path(__file__).resolve().parent / "workers" / "resume_run.py"
STEPS, SAVE_INTERVAL = 8, 3


pytestmark = pytest.mark.usefixtures("distributed_teardown")


def worker_command(data: Path, ckpt: Path, losses: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(WORKER),
        f"--data={data}",
        f"--ckpt={ckpt}",
        f"--losses={losses}",
        f"--steps={STEPS}",
        f"--save-interval={SAVE_INTERVAL}",
        *extra,
    ]


def run_to_end(command: list[str]) -> str:
    result = subprocess.run(
        command, cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=300
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


def test_resume_after_sigkill_continues_exactly(sample_prefixes, tmp_path):
    data = tmp_path / "prefixes.json"
    data.write_text(json.dumps(sample_prefixes))

    # The uninterrupted reference: steps 1..8, checkpoints at 3, 6 and the end (8).
    reference_losses = tmp_path / "reference.jsonl"
    run_to_end(worker_command(data, tmp_path / "ref_ckpt", reference_losses))
    reference = read_losses(reference_losses)
    assert sorted(reference) == list(range(1, STEPS + 1))

    # The same run, SIGKILLed in the middle of its step-6 save: step_3 is complete and
    # `latest`, steps 4-6 ran past it, step 6's shards are in a temp directory that was
    # never committed.
    ckpt, losses = tmp_path / "ckpt", tmp_path / "killed.jsonl"
    out_path = tmp_path / "killed.out"
    with open(out_path, "w") as out:
        proc = subprocess.Popen(
            worker_command(data, ckpt, losses, "--hang-in-save=6"),
            cwd=REPO,
            env=worker_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 240
        while "HANGING IN SAVE" not in out_path.read_text():
            assert proc.poll() is None, out_path.read_text()
            assert time.monotonic() < deadline, "the worker never reached the step-6 save"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    killed = read_losses(losses)
    assert sorted(killed) == list(range(1, 7))
    assert (ckpt / "latest").read_text().strip() == "step_00000003"
    temps = [p.name for p in ckpt.iterdir() if ".tmp-" in p.name]
    assert any(name.startswith("step_00000006.tmp-") for name in temps), temps
    assert not (ckpt / "step_00000006").exists()
    # Something half-written under a step name too: no marker, so never loadable.
    (ckpt / "step_00000005").mkdir()
    (ckpt / "step_00000005" / "common.pt").write_bytes(b"garbage")

    # Relaunch with resume=auto: it loads step 3 and continues with steps 4..8, bit for
    # bit as the uninterrupted run (fp32 on CPU, one thread: deterministic).
    resumed_losses = tmp_path / "resumed.jsonl"
    output = run_to_end(worker_command(data, ckpt, resumed_losses))
    assert f"RESUMED_FROM {ckpt / 'step_00000003'}" in output, output
    resumed = read_losses(resumed_losses)
    assert sorted(resumed) == list(range(SAVE_INTERVAL + 1, STEPS + 1))
    for step in resumed:
        for key in ("train/loss", "train/token_mean_loss", "train/grad_norm", "train/lr"):
            assert resumed[step][key] == reference[step][key], (
                step,
                key,
            )
    # Steps 4-6 before the kill were the same too (same stream, same model).
    for step in (4, 5, 6):
        assert killed[step]["train/loss"] == reference[step]["train/loss"]

    # The resumed run committed 6 and 8; `latest` names a complete checkpoint; the
    # temp directory is gone and keep_last=2 pruned step 3.
    manager = CheckpointManager(ckpt)
    assert manager.latest() == ckpt / "step_00000008"
    marker = read_marker(ckpt / "step_00000008")
    assert marker["step"] == STEPS and marker["plan_position"]["step"] == STEPS
    assert marker["extra"]["wandb_run_id"] == "resume-test-run"
    assert not [p for p in ckpt.iterdir() if ".tmp-" in p.name]
    complete = sorted(p.name for p in ckpt.iterdir() if (p / MARKER).is_file())
    assert complete == ["step_00000006", "step_00000008"]


def test_save_schedule_position_and_resume_in_process(sample_prefixes, tmp_path):
    ckpt = tmp_path / "ckpt"
    config = tiny_training_config(
        sample_prefixes, max_steps=4, checkpoint_dir=str(ckpt), save_interval=2
    )
    trainer = Trainer(config, metrics_logger=Recorder("abc-123"))
    assert trainer.resumed_from is None
    trainer.train()  # saves 2 and 4; a second save of 4 at the end would raise
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_00000002", "step_00000004"]
    marker = read_marker(ckpt / "step_00000004")
    assert marker["consumed_samples"] == trainer.state.consumed_samples > 0
    assert PlanPosition(**marker["plan_position"]) == trainer.state.plan_position
    assert marker["extra"]["wandb_run_id"] == "abc-123"

    # A longer run resumes from step 4: position, samples and the wandb run id come back.
    config = tiny_training_config(
        sample_prefixes, max_steps=5, checkpoint_dir=str(ckpt), save_interval=2
    )
    config.optim.lr_warmup_steps = 2  # as in the first run: the schedule is restored
    resumed = Trainer(config)
    assert resumed.resumed_from == ckpt / "step_00000004"
    assert resumed.state.step == 4
    assert resumed.state.plan_position == trainer.state.plan_position
    assert resumed.state.consumed_samples == trainer.state.consumed_samples
    assert resumed.wandb_run_id == "abc-123"
    assert resumed.scheduler.num_steps == trainer.scheduler.num_steps

    # resume=never starts from scratch; an explicit path loads that checkpoint. Both into
    # another checkpoint_dir: in this one they would overwrite steps 2 and 4, and the
    # Trainer refuses (tests/training/test_checkpoint_integrity.py).
    config.train.resume = "never"
    with pytest.raises(CheckpointError, match="already has complete checkpoints"):
        Trainer(config)
    config.train.checkpoint_dir = str(tmp_path / "other")
    assert Trainer(config).state.step == 0
    config.train.resume = str(ckpt / "step_00000002")
    assert Trainer(config).state.step == 2


def test_checkpoint_optimizer_format_reaches_the_manager(sample_prefixes, tmp_path):
    config = tiny_training_config(
        sample_prefixes,
        max_steps=1,
        checkpoint_dir=str(tmp_path / "ckpt"),
        checkpoint_optimizer_format="fully_reshardable",
    )
    trainer = Trainer(config, metrics_logger=Recorder())
    assert trainer.checkpoints.optimizer_format == "fully_reshardable"
    trainer.train()
    marker = read_marker(tmp_path / "ckpt" / "step_00000001")
    assert marker["sharding_metadata"]["distrib_optim_sharding_type"] == "fully_reshardable"
