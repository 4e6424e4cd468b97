"""A small trainer: it validates the config, joins the job, builds everything (data:
data/train_data.py; megatron's model, optimizer and scheduler: training/builders.py) and
runs the steps (training/step.py).

    trainer = Trainer(config)        # validates, joins the job, builds everything
    history = trainer.train()        # list[StepResult], one per step

`train()` adds, around the steps (docs/TRAINING.md, "Resume and logging"):
- checkpoints (training/checkpoint.py) every `train.save_interval` steps and at the end,
  into `train.checkpoint_dir`; `Trainer(...)` resumes first (`train.resume`): model,
  optimizer, scheduler, RNG, data position and consumed samples, so the run continues
  the exact same stream;
- the documented metrics (training/metrics.py) every `logging.log_interval` steps and at
  the last one, through MetricsLogger (training/logger.py: console line + wandb, rank 0)
  and into `logging.metrics_file` (training/metrics_file.py: metrics.jsonl);
- validation (training/validation.py) on data.valid_sources or data.valid_fraction,
  every `train.eval_interval` steps and at the end, forward only, before the step's
  checkpoint is saved (a run killed in between repeats both);
- preemption (training/preemption.py): after SIGUSR1/SIGTERM on any rank
  (`train.preemption_signals`), every rank stops at the same step boundary, saves, and
  `preempted` is set (the entry point exits with PREEMPTED_EXIT_CODE).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from megatron_longalign.config.training import LongAlignConfig
from megatron_longalign.data.indexed import DataFileError
from megatron_longalign.data.planner import GlobalBatch, PlanPosition
from megatron_longalign.data.train_data import build_data, build_validation_data
from megatron_longalign.parallel.distributed import (
    context_parallel_rank,
    data_parallel_rank,
    data_parallel_size,
    initialize_distributed,
    rank0_then_broadcast,
)
from megatron_longalign.training import metrics as metrics_lib
from megatron_longalign.training import preemption
from megatron_longalign.training.builders import (
    build_model,
    build_optimizer,
    build_transformer_config,
    default_device,
    resolve_precision,
)
from megatron_longalign.training.checkpoint import (
    CheckpointError,
    CheckpointManager,
    TrainingState,
    read_marker,
    resolve_checkpoint,
    resolve_resume,
)
from megatron_longalign.training.logger import MetricsLogger
from megatron_longalign.training.metrics_file import TRAIN, VALID, MetricsFile
from megatron_longalign.training.schedule import build_scheduler
from megatron_longalign.training.step import StepResult, TrainStep, count_bad_steps
from megatron_longalign.training.validate import (
    ConfigError,
    empty_plan_problem,
    empty_validation_problem,
    overlength_warnings,
    validate_config,
)
from megatron_longalign.training.validation import Validator, is_validation_step

log = logging.getLogger("megatron_longalign.train")


# ---- the trainer -------------------------------------------------------------------------


def _launch_world_size() -> int:
    if torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


class Trainer:
    """Builds everything from a LongAlignConfig and trains.

    `init_weights(chunks)` is called on the bare model chunks before DDP and the
    optimizer are built (e.g. to load pretrained weights). `check_files=False` skips the
    dataset-file checks of the validation (the data must still load). `metrics_logger`
    replaces the MetricsLogger that `train()` would open from `config.logging` (tests,
    benchmarks); the caller closes it.

    The constructor resumes from a checkpoint when `train.resume` says so
    (`resumed_from` is then its path).
    """

    def __init__(
        self,
        config: LongAlignConfig,
        *,
        init_weights: Callable[[list[torch.nn.Module]], None] | None = None,
        check_files: bool = True,
        metrics_logger: MetricsLogger | None = None,
    ) -> None:
        # Config mistakes surface before anything joins the job or loads data.
        validate_config(config, _launch_world_size(), check_files=check_files)
        self.config = config
        initialize_distributed(config.parallel, seed=config.train.seed)
        self.cpu = not torch.cuda.is_available()
        self.device = default_device()
        self.dtype = resolve_precision(config.train.precision)
        self.is_rank0 = torch.distributed.get_rank() == 0
        try:
            ranks = data_parallel_rank(), data_parallel_size(), context_parallel_rank()
            self.data = build_data(config, *ranks)
            valid_data = build_validation_data(config, *ranks, train_mixture=self.data.mixture)
        except DataFileError as err:  # changed since the validation, or check_files=False
            raise ConfigError([str(err)]) from err
        self._check_data_plan()  # before the model is built
        if valid_data is not None and not valid_data.batches:
            raise ConfigError([empty_validation_problem(config)])
        self.total_steps = self._total_steps()
        self.transformer_config = build_transformer_config(config, self.dtype, self.cpu)
        self.model = build_model(config, self.transformer_config, self.device, init_weights)
        self.optimizer = build_optimizer(config, self.model, self.dtype)
        self.scheduler = build_scheduler(self.optimizer, config.optim, self.total_steps)
        self.state = TrainingState()
        self.stepper = TrainStep(
            config, self.data, self.model, self.optimizer, self.scheduler, self.device
        )
        self.validator = (
            Validator(config, valid_data, self.model, self.device) if valid_data else None
        )
        self.last_validated_step: int | None = None
        self.last_valid_metrics: dict[str, float] = {}
        self.metrics_file: MetricsFile | None = None
        # Metrics: global step values, per GPU over every rank of the job.
        peak = metrics_lib.peak_flops(
            metrics_lib.detect_device_name(), metrics_lib.matmul_dtype(self.dtype)
        )
        self.throughput = metrics_lib.ThroughputMeter(torch.distributed.get_world_size(), peak)
        self.loss_by_length = metrics_lib.LossByLength()
        self.last_metrics: dict[str, float] = {}
        self.metrics_logger = metrics_logger
        self._own_metrics_logger = False
        # Checkpoints.
        ckpt_dir = config.train.checkpoint_dir
        self.checkpoints = (
            CheckpointManager(
                ckpt_dir,
                keep_last=config.train.keep_last,
                optimizer_format=config.train.checkpoint_optimizer_format,
            )
            if ckpt_dir
            else None
        )
        self.last_saved_step: int | None = None
        self.preempted = False  # train() stopped early on a preemption signal (and saved)
        self.wandb_run_id: str | None = config.logging.wandb.run_id
        # Where the weights came from (train.init_from), carried into every checkpoint.
        self.init_record: dict[str, Any] = {}
        self._log_setup()
        self.resumed_from = self._resume()

    # ---- setup helpers -------------------------------------------------------------------

    def _check_data_plan(self) -> None:
        """Samples longer than data.seq_length are reported per source (rank 0), and a
        plan without a single step stops the run here, before the model is built."""
        lengths = [dataset.lengths for dataset in self.data.mixture.datasets]
        if self.is_rank0:
            for message in overlength_warnings(self.config, lengths):
                log.warning("%s", message)
        if self.data.planner.num_steps(0) == 0:
            raise ConfigError([empty_plan_problem(self.config, lengths)])

    def _total_steps(self) -> int:
        train = self.config.train
        if train.max_steps is not None:
            return train.max_steps
        return sum(self.data.planner.num_steps(epoch) for epoch in range(train.epochs))

    def _log_setup(self) -> None:
        if not self.is_rank0:
            return
        report = self.data.planner.report
        params = sum(p.numel() for chunk in self.model for p in chunk.parameters())
        log.info(
            "model %s: %d parameters on this rank, attention backend %s, %s; %d steps; "
            "data: %d samples from %s, %d dropped as longer than data.seq_length",
            self.config.model.name,
            params,
            getattr(self.unwrapped_model[0], "attention_backend", "?"),
            str(self.dtype).replace("torch.", ""),
            self.total_steps,
            len(self.data.mixture),
            ", ".join(f"{s.prefix} (weight {s.weight:g})" for s in self.data.mixture.sources),
            report.dropped_overlength,
        )
        if self.validator is not None:
            log.info("%s", self.validator.describe())

    @property
    def unwrapped_model(self) -> list[torch.nn.Module]:
        """The LongAlignGPTModel chunks inside DDP (and Float16Module)."""
        from megatron.core.utils import unwrap_model

        return unwrap_model(self.model)

    # ---- checkpoints ---------------------------------------------------------------------

    def _find_resume_path(self) -> Path | None:
        """Rank 0's reading of `train.resume` (checkpoint.resolve_resume): auto -> the
        checkpoint `latest` names, else the newest complete step_<N> (said in the log);
        never/none/null -> None; else a checkpoint directory or root. Refuses damaged
        checkpoints and, so that no complete checkpoint is ever overwritten, a resume
        point older than a complete checkpoint in checkpoint_dir."""
        root = self.checkpoints.root if self.checkpoints is not None else None
        return resolve_resume(self.config.train.resume, root)

    def _resume(self) -> Path | None:
        """Restore model, optimizer, scheduler, RNG and data position if `train.resume`
        finds a checkpoint; otherwise load `train.init_from`'s weights, if set.
        Collective (rank 0 decides, every rank loads)."""
        # Rank 0 decides (its CheckpointError is raised on every rank).
        found = rank0_then_broadcast(self._find_resume_path)
        if found is None:
            if self.config.train.init_from:
                self._load_initial_weights(self.config.train.init_from)
            return None
        path = Path(found)
        manager = self.checkpoints or CheckpointManager(path.parent)
        saved = manager.load(path, self.model, self.optimizer, self.scheduler)
        extra = saved.extra
        self.state = saved  # with the bad-step counters (in `extra`)
        if self.wandb_run_id is None:
            self.wandb_run_id = extra.get("wandb_run_id")
        self.init_record = {k: extra[k] for k in ("init_from", "hf_import") if k in extra}
        self.last_saved_step = saved.step  # nothing new to save until a step runs
        if self.is_rank0:
            log.info(
                "resumed from %s: step %d, data position %s, %d samples consumed",
                path,
                saved.step,
                saved.plan_position,
                saved.consumed_samples,
            )
        return path

    def _load_initial_weights(self, source: str) -> None:
        """Model weights from a checkpoint directory (or a root with `latest`) in any
        layout; the optimizer's fp32 main copies are refreshed from them."""
        path = resolve_checkpoint(source, name="train.init_from")
        CheckpointManager(path.parent).load(path, self.model, None, None)
        # The (distributed) optimizer copied the weights into its main params when it was
        # built; without this the first update would start from the random init.
        self.optimizer.reload_model_params()
        # Provenance for every later checkpoint (export reads the HF source and tokenizer).
        self.init_record = {"init_from": str(path)}
        hf_import = read_marker(path).get("extra", {}).get("hf_import")
        if hf_import:
            self.init_record["hf_import"] = hf_import
        if self.is_rank0:
            log.info("initial weights from %s (model only: optimizer and data start fresh)", path)

    def save_checkpoint(self) -> Path:
        """Save the current state to `train.checkpoint_dir`. Collective."""
        if self.checkpoints is None:
            raise CheckpointError("train.checkpoint_dir is null: checkpointing is off")
        state = self.state
        logger_id = self.metrics_logger.run_id if self.metrics_logger is not None else None
        extra = {
            "wandb_run_id": logger_id or self.wandb_run_id,
            "skipped_steps": state.skipped_steps,
            "consecutive_bad_steps": state.consecutive_bad_steps,
            "name": self.config.name,
            # What the weights are (tools/convert_hf.py export builds the HF config from it).
            "model_config": dataclasses.asdict(self.config.model),
            # What the token ids mean (export writes the tokenizer and chat template).
            "data": self.data.mixture.provenance(),
            **self.init_record,
        }
        path = self.checkpoints.save(
            dataclasses.replace(state, extra=extra),
            self.model,
            self.optimizer,
            self.scheduler,
        )
        self.last_saved_step = state.step
        return path

    def _maybe_save(self, final: bool) -> None:
        if self.checkpoints is None or self.state.step == 0:
            return
        if self.last_saved_step == self.state.step:
            return  # the last periodic save (or the resumed checkpoint) is this step
        interval = self.config.train.save_interval
        if final or (interval and self.state.step % interval == 0):
            self.save_checkpoint()

    # ---- metrics -------------------------------------------------------------------------

    def _open_metrics_logger(self) -> None:
        path = self.config.logging.metrics_file
        if path and self.is_rank0 and self.metrics_file is None:
            # Lines beyond the step this run starts from are dropped (metrics_file.py).
            self.metrics_file = MetricsFile(path, start_step=self.state.step)
        if self.metrics_logger is not None:
            return
        self.metrics_logger = MetricsLogger(
            self.config.logging,
            run_config=dataclasses.asdict(self.config),
            stream=_LogStream(),
            run_id=self.wandb_run_id,
        )
        self._own_metrics_logger = True
        self.wandb_run_id = self.metrics_logger.run_id or self.wandb_run_id

    def close_metrics_logger(self) -> None:
        if self.metrics_file is not None:
            self.metrics_file.close()
            self.metrics_file = None
        if self._own_metrics_logger and self.metrics_logger is not None:
            self.metrics_logger.close()
            self.metrics_logger = None
            self._own_metrics_logger = False

    def _record_metrics(self, result: StepResult) -> None:
        """Accumulate the step; on a logging step (every log_interval steps and the last
        one: the same decision on every rank) reduce and log the window. Collective on
        logging steps (loss by length is summed over the job).

        A skipped logging step still logs its window (throughput over all its steps,
        loss by length over the good ones, its lr and the skipped-step count), without
        its non-finite loss and gradient norm (docs/TRAINING.md, "Metrics")."""
        self.throughput.update(result.real_tokens, result.flops, result.step_time)
        step = result.step
        if step % self.config.logging.log_interval and step != self.total_steps:
            return
        # Every rank's documents; non-last pipeline stages add zeros, TP duplicates scale
        # sums and counts alike, so the means are right.
        self.loss_by_length.all_reduce()
        loss_by_len = self.loss_by_length.means()
        self.loss_by_length.reset()
        throughput = self.throughput.summary()
        self.throughput.reset()
        metrics = metrics_lib.step_metrics(
            loss=result.loss,
            lr=result.lr,
            grad_norm=result.grad_norm,
            throughput=throughput,
            packing_efficiency=result.packing_efficiency,
            rank_imbalance=result.rank_imbalance,
            peak_memory_gb=metrics_lib.peak_memory_gb(),
            loss_by_len=loss_by_len,
        )
        metrics[metrics_lib.TOKEN_MEAN_LOSS] = result.token_mean_loss
        metrics[metrics_lib.EPOCH] = float(result.epoch)
        metrics[metrics_lib.CONSUMED_SAMPLES] = float(self.state.consumed_samples)
        metrics[metrics_lib.SKIPPED_STEPS] = float(self.state.skipped_steps)
        if result.skipped:  # not finite; the step is reported as a warning
            for key in (metrics_lib.LOSS, metrics_lib.TOKEN_MEAN_LOSS, metrics_lib.GRAD_NORM):
                del metrics[key]
        self.last_metrics = metrics
        self._log(step, TRAIN, metrics)

    def _log(self, step: int, split: str, metrics: dict[str, float]) -> None:
        """Console + wandb (MetricsLogger) and metrics.jsonl; both rank 0 only."""
        if self.metrics_logger is not None:
            self.metrics_logger.log(step, metrics, force=True)
        if self.metrics_file is not None:
            self.metrics_file.append(step, split, metrics)

    # ---- validation ----------------------------------------------------------------------

    def validate(self) -> dict[str, float]:
        """Validation metrics of the current model (training/validation.py); the same on
        every rank. Collective. Changes nothing of the training state."""
        if self.validator is None:
            raise ConfigError(["validation needs data.valid_sources or data.valid_fraction > 0"])
        return self.validator.run()

    def _maybe_validate(self, final: bool) -> None:
        """Validate and log after this step: every train.eval_interval steps and at the
        end (`final`, or the last planned step), once per step."""
        step = self.state.step
        if self.validator is None or step == self.last_validated_step:
            return
        last = step if final else self.total_steps
        if not is_validation_step(step, self.config.train.eval_interval, last):
            return
        metrics = self.validate()
        self.last_validated_step = step
        self.last_valid_metrics = metrics
        self._log(step, VALID, metrics)

    # ---- training ------------------------------------------------------------------------

    def batches(self) -> Iterator[GlobalBatch]:
        """Global batches from the current position on."""
        epochs = self.config.train.epochs if self.config.train.max_steps is None else None
        return self.data.planner.iterate(start=self.state.plan_position, epochs=epochs)

    def train(self) -> list[StepResult]:
        """Run until `total_steps`; returns every step's result."""
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        history: list[StepResult] = []
        show_bar = self.is_rank0 and self.config.logging.progress_bar
        self._open_metrics_logger()
        self.throughput.reset()
        self.loss_by_length.reset()
        with (
            # Console handlers of the root logger (Hydra's) write through tqdm, so log
            # lines do not tear the bar.
            logging_redirect_tqdm(),
            tqdm(
                total=self.total_steps,
                initial=self.state.step,
                disable=not show_bar,
                desc="train",
                unit="step",
                dynamic_ncols=True,
            ) as bar,
            preemption.handling(self.config.train.preemption_signals),
        ):
            try:
                batches = self.batches()
                while self.state.step < self.total_steps:
                    # Collective: a signal on any rank stops every rank here; the save
                    # below then checkpoints the last finished step (training/preemption.py).
                    if preemption.stop_requested(self.device, step=self.state.step):
                        self.preempted = True
                        break
                    batch = next(batches, None)
                    if batch is None:  # epochs mode: the planned epochs are done
                        break
                    result = self.train_step(batch)
                    history.append(result)
                    bar.update(1)
                    bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{result.lr:.2e}")
                    self._record_metrics(result)
                    self._maybe_validate(final=False)
                    self._maybe_save(final=False)
                if history and not self.preempted:  # epochs mode may end before total_steps
                    self._maybe_validate(final=True)
                self._maybe_save(final=True)
            finally:
                self.close_metrics_logger()
        return history

    def train_step(self, batch: GlobalBatch) -> StepResult:
        """One optimizer step on `batch` (normally the next one from `batches()`)."""
        result = self.stepper(batch, self.state.step + 1)
        if not result.skipped:  # a skipped step's losses are not finite
            self.loss_by_length.merge(self.stepper.loss_by_length)
        # The batch is consumed even when the update was skipped.
        self.state.step += 1
        self.state.plan_position = PlanPosition(batch.epoch, batch.step + 1)
        self.state.consumed_samples += batch.num_samples
        limit = self.config.train.max_consecutive_bad_steps
        count_bad_steps(self.state, result, limit, self.is_rank0)  # may stop the run
        return result


class _LogStream:
    """A text stream for MetricsLogger's console line: whole lines go to the
    `megatron_longalign.train` logger (Hydra's console and log file; written through
    tqdm while the bar is shown)."""

    def __init__(self) -> None:
        self._buffer = ""

    def write(self, text: str) -> int:
        self._buffer += text
        while "\n" in self._buffer:
            line, self._buffer = self._buffer.split("\n", 1)
            if line:
                log.info("%s", line)
        return len(text)

    def flush(self) -> None:
        pass
