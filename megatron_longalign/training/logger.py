"""Metrics logging: a compact console line and Weights & Biases, on global rank 0 only.

wandb mode (logging.wandb.mode): "auto" is "online" when WANDB_API_KEY is set and
"offline" otherwise (runs are written under `dir` and can be uploaded later with `wandb
sync`); an explicit WANDB_MODE in the environment wins over "auto". "disabled" never
imports wandb. A requeued Slurm job passes the same run id (logging.wandb.run_id, or the
one its checkpoint stored) and continues the same run (`wandb.init(id=run_id,
resume="allow")`); the trainer stores `logger.run_id` in its checkpoints for that. Charts
use `train/step` as their x-axis rather than wandb's own step counter, so steps repeated
after a resume from an older checkpoint are kept instead of being dropped as out of
order.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from megatron_longalign.config.training import LoggingConfig
from megatron_longalign.training import metrics as metrics_lib
from megatron_longalign.training.metrics import peak_memory_source

STEP_KEY = "train/step"


def resolve_wandb_mode(requested: str, environ: Mapping[str, str] | None = None) -> str:
    """online | offline | disabled. Only an explicit online request or an API key
    reaches the network."""
    environ = os.environ if environ is None else environ
    if requested != "auto":
        return requested
    env_mode = environ.get("WANDB_MODE", "").strip().lower()
    if env_mode == "dryrun":  # wandb's old name for offline
        env_mode = "offline"
    if env_mode in ("online", "offline", "disabled"):
        return env_mode
    return "online" if environ.get("WANDB_API_KEY") else "offline"


def resolve_rank(rank: int | None = None) -> int:
    """Global rank: the argument, else torch.distributed's, else torchrun's RANK, else 0."""
    if rank is not None:
        return rank
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def _format_value(key: str, value: float, memory_label: str) -> str:
    formats = {
        metrics_lib.LOSS: lambda v: f"loss {v:.4f}",
        metrics_lib.LR: lambda v: f"lr {v:.3e}",
        metrics_lib.GRAD_NORM: lambda v: f"grad {v:.3f}",
        metrics_lib.TOKENS_PER_SEC: lambda v: f"{v:,.0f} tok/s",
        metrics_lib.TFLOPS_PER_GPU: lambda v: f"{v:.1f} TFLOP/s/GPU",
        metrics_lib.MFU: lambda v: f"MFU {100 * v:.1f}%",
        metrics_lib.STEP_TIME: lambda v: f"{v:.3f} s/step",
        metrics_lib.PACKING_EFFICIENCY: lambda v: f"fill {100 * v:.1f}%",
        metrics_lib.RANK_IMBALANCE: lambda v: f"imb {v:.3f}",
        metrics_lib.PEAK_MEMORY: lambda v: f"mem {v:.2f} GiB{memory_label}",
        metrics_lib.VALID_LOSS: lambda v: f"valid loss {v:.4f}",
        metrics_lib.VALID_TOKEN_LOSS: lambda v: f"valid token loss {v:.4f}",
        metrics_lib.VALID_SEQUENCES: lambda v: f"{v:.0f} seqs",
        metrics_lib.VALID_TARGET_TOKENS: lambda v: f"{v:.0f} targets",
    }
    return formats[key](value)


def format_console_line(step: int, metrics: Mapping[str, float], memory_label: str = "") -> str:
    """One line per logged step. Keys that are absent are skipped, except MFU, which
    reads "MFU n/a" so an unknown peak is visible rather than silently missing.
    A validation's values (valid/*) follow the training ones. loss_by_len/* go to wandb
    (and metrics.jsonl) only, to keep the line short."""
    parts = [f"step {step}"]
    for key in (*metrics_lib.METRIC_KEYS, *metrics_lib.VALID_KEYS):
        if key in metrics:
            parts.append(_format_value(key, float(metrics[key]), memory_label))
        elif key == metrics_lib.MFU and metrics_lib.TFLOPS_PER_GPU in metrics:
            parts.append("MFU n/a")
    return " | ".join(parts)


class MetricsLogger:
    """Console + wandb on global rank 0; every other rank does nothing (no wandb run,
    no output), so callers need no rank checks.

    `config` is the `logging` group (validated at start-up, training/validate.py); `run_id`
    is the wandb run to continue (None: `config.wandb.run_id`, and without one wandb starts
    a new run); `run_config` is recorded as the wandb run's config (the resolved Hydra
    config)."""

    def __init__(
        self,
        config: LoggingConfig,
        rank: int | None = None,
        run_config: Mapping[str, Any] | None = None,
        stream: TextIO | None = None,
        run_id: str | None = None,
    ) -> None:
        self.config = config
        self.rank = resolve_rank(rank)
        self.enabled = self.rank == 0
        self.mode = resolve_wandb_mode(config.wandb.mode) if self.enabled else "disabled"
        self._stream = stream
        # Say which memory the number is: process RSS on CPU is not GPU tensor memory.
        self._memory_label = "" if peak_memory_source().startswith("cuda") else " (cpu rss)"
        self._run = None
        self._run_id = run_id if run_id is not None else config.wandb.run_id
        if self.mode != "disabled":
            self._start_wandb(run_config)

    def _start_wandb(self, run_config: Mapping[str, Any] | None) -> None:
        try:
            import wandb
        except ImportError as error:
            raise ImportError(
                "wandb is not installed; pip install wandb, or set logging.wandb.mode=disabled"
            ) from error
        wandb_config = self.config.wandb
        if wandb_config.dir is not None:
            Path(wandb_config.dir).mkdir(parents=True, exist_ok=True)
        run_id = self._run_id
        self._run = wandb.init(
            project=wandb_config.project,
            entity=wandb_config.entity,
            name=wandb_config.run_name,
            tags=list(wandb_config.tags) or None,
            dir=wandb_config.dir,
            id=run_id,
            resume="allow" if run_id else None,
            mode=self.mode,
            config=dict(run_config) if run_config else None,
            # The job's stdout already goes to the Slurm log; wandb need not wrap it.
            settings=wandb.Settings(console="off"),
        )
        self._run_id = self._run.id
        self._run.define_metric(STEP_KEY)
        self._run.define_metric("*", step_metric=STEP_KEY)

    @property
    def run_id(self) -> str | None:
        """The wandb run id (generated by wandb when none was given); store it in the
        checkpoint to continue the same run after a requeue."""
        return self._run_id

    def should_log(self, step: int) -> bool:
        return step % self.config.log_interval == 0

    def log(self, step: int, metrics: Mapping[str, float], force: bool = False) -> bool:
        """Log `metrics` for `step` if it is a logging step (or `force`, e.g. the last
        step). Returns whether anything was written."""
        if not self.enabled or not (force or self.should_log(step)):
            return False
        line = format_console_line(step, metrics, self._memory_label)
        print(line, file=self._stream or sys.stdout, flush=True)
        if self._run is not None:
            self._run.log({STEP_KEY: step, **{k: float(v) for k, v in metrics.items()}})
        return True

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
