"""The Trainer's metrics: the documented keys (training/metrics.py METRIC_KEYS) every
log_interval steps through a MetricsLogger, and wandb offline into a temporary directory."""

from __future__ import annotations

import math
import socket

import pytest

from megatron_longalign.training.metrics import (
    GRAD_NORM,
    LOSS,
    LOSS_BY_LEN_PREFIX,
    LR,
    METRIC_KEYS,
    SKIPPED_STEPS,
    TOKEN_MEAN_LOSS,
)
from megatron_longalign.training.trainer import Trainer
from tests.helpers.tiny_training import Recorder, tiny_training_config

pytestmark = pytest.mark.usefixtures("distributed_teardown")


def test_metrics_are_logged_every_interval_with_the_stable_keys(sample_prefixes):
    config = tiny_training_config(sample_prefixes, max_steps=5)
    config.logging.log_interval = 2
    recorder = Recorder()
    trainer = Trainer(config, metrics_logger=recorder)
    history = trainer.train()
    assert [step for step, _ in recorder.logged] == [2, 4, 5]  # and the last step
    expected = [k for k in METRIC_KEYS if k != "perf/mfu"]  # no known peak on CPU
    for step, metrics in recorder.logged:
        assert list(metrics)[: len(expected)] == expected
        assert "perf/mfu" not in metrics
        result = history[step - 1]
        assert metrics["train/loss"] == result.loss
        assert metrics["train/lr"] == result.lr
        assert metrics["data/rank_imbalance"] == result.rank_imbalance
        assert metrics["perf/tokens_per_sec"] > 0 and metrics["perf/tflops_per_gpu"] > 0
        assert 0 < metrics["data/packing_efficiency"] <= 1
        assert metrics["mem/peak_gb"] > 0 and metrics["perf/step_time_s"] > 0
        buckets = {k: v for k, v in metrics.items() if k.startswith(LOSS_BY_LEN_PREFIX)}
        assert buckets and all(math.isfinite(v) and v > 0 for v in buckets.values())
    # The window of step 4 is steps 3 and 4: tokens/s is their real tokens / time.
    window = history[2:4]
    tokens = sum(r.real_tokens for r in window)
    seconds = sum(r.step_time for r in window)
    assert recorder.logged[1][1]["perf/tokens_per_sec"] == pytest.approx(tokens / seconds)
    flops = sum(r.flops for r in window)
    assert recorder.logged[1][1]["perf/tflops_per_gpu"] == pytest.approx(flops / seconds / 1e12)


def test_a_skipped_logging_step_still_logs_its_window(sample_prefixes):
    """Step 2 (a logging step) is skipped: its window is logged anyway, with the good
    step's loss by length and the throughput of both steps, without the non-finite loss
    and gradient norm; the next window starts after it."""
    config = tiny_training_config(sample_prefixes, max_steps=4)
    config.logging.log_interval = 2
    recorder = Recorder()
    trainer = Trainer(config, metrics_logger=recorder)

    def poison(module, inputs, output):  # non-finite loss and gradients in step 2
        return output * math.inf if trainer.state.step == 1 else output

    trainer.unwrapped_model[0].decoder.final_layernorm.register_forward_hook(poison)
    history = trainer.train()
    assert [r.skipped for r in history] == [False, True, False, False]
    assert [step for step, _ in recorder.logged] == [2, 4]
    metrics = recorder.logged[0][1]
    assert LOSS not in metrics and GRAD_NORM not in metrics and TOKEN_MEAN_LOSS not in metrics
    assert metrics[LR] == history[1].lr and metrics[SKIPPED_STEPS] == 1.0
    buckets = {k: v for k, v in metrics.items() if k.startswith(LOSS_BY_LEN_PREFIX)}
    assert buckets and all(math.isfinite(v) and v > 0 for v in buckets.values())
    tokens = sum(r.real_tokens for r in history[:2])
    seconds = sum(r.step_time for r in history[:2])
    assert metrics["perf/tokens_per_sec"] == pytest.approx(tokens / seconds)
    last = recorder.logged[1][1]
    assert last[LOSS] == history[3].loss and math.isfinite(last[GRAD_NORM])
    tokens = sum(r.real_tokens for r in history[2:])
    seconds = sum(r.step_time for r in history[2:])
    assert last["perf/tokens_per_sec"] == pytest.approx(tokens / seconds)


def test_console_line_with_wandb_disabled(sample_prefixes, caplog):
    config = tiny_training_config(sample_prefixes, max_steps=2)
    config.logging.wandb.mode = "disabled"
    trainer = Trainer(config)
    with caplog.at_level("INFO", logger="megatron_longalign.train"):
        trainer.train()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert len(lines) == 2, lines
    for part in ("loss ", "lr ", "grad ", "tok/s", "TFLOP/s/GPU", "MFU n/a", "fill ", "imb "):
        assert part in lines[-1], lines[-1]


def test_wandb_offline_writes_a_run_directory_without_network(
    sample_prefixes, tmp_path, monkeypatch
):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)

    def no_network(*args, **kwargs):
        raise AssertionError(f"network use: {args}")

    monkeypatch.setattr(socket, "create_connection", no_network)
    config = tiny_training_config(
        sample_prefixes, max_steps=2, checkpoint_dir=str(tmp_path / "ckpt")
    )
    config.logging.wandb.mode = "auto"  # offline: no API key, WANDB_MODE=offline
    config.logging.wandb.dir = str(tmp_path)
    trainer = Trainer(config)
    trainer.train()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list(tmp_path.rglob("*"))
    run_id = trainer.wandb_run_id
    assert run_id and runs[0].name.endswith(run_id)
    assert list(runs[0].glob("*.wandb")), "no wandb history file"
    from megatron_longalign.training.checkpoint import read_marker

    assert read_marker(tmp_path / "ckpt" / "step_00000002")["extra"]["wandb_run_id"] == run_id
