"""Helpers shared by the trainer tests and their torchrun workers: a tiny training config
on small preprocessed datasets (tests/conftest.py `sample_prefixes`), sized so a step
takes well under a second on one CPU core; and MetricsLogger stand-ins (in memory, or a
JSON-lines file a test reads back with `read_losses`).

Workers and pytest modules import this as `tests.helpers.tiny_training`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path

from megatron_longalign.config.data import DataConfig, DatasetSource
from megatron_longalign.config.parallel import ParallelConfig
from megatron_longalign.config.training import (
    LoggingConfig,
    LongAlignConfig,
    OptimConfig,
    TrainConfig,
)
from tests.helpers.tiny_model import tiny_model_config

# The session tokenizer of tests/conftest.py has 600 pieces.
VOCAB = 640


def tiny_training_config(
    prefixes: dict[str, str],
    *,
    max_steps: int = 4,
    global_batch_size: int = 2,
    micro_batch_size: int = 1,
    seq_length: int = 1024,
    loss_reduction: str = "sequence",
    tp: int = 1,
    pp: int = 1,
    **train_changes,
) -> LongAlignConfig:
    """Tiny Llama-style model (2 layers, hidden 64, GQA 4:2) on the test datasets: packs
    of `seq_length` tokens, longer samples dropped; fp32, no progress bar."""
    model = tiny_model_config(
        name="tiny-test",
        vocab_size=VOCAB,
        # 640 is a multiple of 64 x TP for TP 1 and 2: the same padded vocabulary (and
        # softmax) on every layout.
        make_vocab_size_divisible_by=64,
    )
    data = DataConfig(
        sources=[DatasetSource(prefix, 1.0) for prefix in prefixes.values()],
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        global_batch_size=global_batch_size,
        on_overlength="drop",
        seed=5,
    )
    optim = OptimConfig(
        lr=3e-3,
        min_lr=3e-4,
        lr_warmup_steps=min(2, max_steps - 1) if max_steps else 0,
        lr_decay_style="cosine",
        clip_grad=1.0,
    )
    train = TrainConfig(
        max_steps=max_steps, loss_reduction=loss_reduction, precision="fp32", seed=11
    )
    train = replace(train, **train_changes)
    return LongAlignConfig(
        name="test",
        model=model,
        data=data,
        parallel=ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp),
        optim=optim,
        train=train,
        logging=LoggingConfig(log_interval=1, progress_bar=False),
    )


class Recorder:
    """A MetricsLogger stand-in that keeps what it is given (in-process tests)."""

    def __init__(self, run_id: str | None = None) -> None:
        self.run_id = run_id
        self.logged: list[tuple[int, dict]] = []

    def log(self, step, metrics, force=False) -> bool:
        self.logged.append((step, dict(metrics)))
        return True

    def close(self) -> None:
        pass


class JsonLinesLogger:
    """A MetricsLogger stand-in for worker processes: every logged step's values as one
    JSON line appended to `path`, flushed and fsynced (a SIGKILL loses nothing already
    written), then `sleep` seconds (a slower step: room for a test's signal)."""

    def __init__(self, path: Path, run_id: str, sleep: float = 0.0) -> None:
        self.path, self.run_id, self.sleep = path, run_id, sleep

    def log(self, step, metrics, force=False) -> bool:
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.sleep:
            time.sleep(self.sleep)
        return True

    def close(self) -> None:
        pass


def read_losses(path: Path) -> dict[int, dict]:
    """step -> logged values, from a JsonLinesLogger file ({} before the first step)."""
    if not path.exists():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["step"]: r for r in records}
