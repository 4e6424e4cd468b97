"""A small trainer: megatron-core model chunks under DDP, megatron's distributed
optimizer and LR scheduler, the global batch planner, and megatron's
forward-backward schedules.

    trainer = Trainer(config)        # validates, joins the job, builds everything
    history = trainer.train()        # list[StepResult], one per step

One step (`train_step`):
1. the planner's GlobalBatch gives this DP rank its micro-batch plans; the builder turns
   them into THD MicroBatches (every pipeline stage builds them: each needs
   position_ids and cu_seqlens);
2. `get_forward_backward_func()` runs them with `loss_func` (training/loss.py);
3. loss and gradient norm are checked: a non-finite step is skipped (gradients zeroed,
   no optimizer or scheduler update), and `train.max_consecutive_bad_steps` bad steps
   in a row stop the run with `NonFiniteTrainingError`;
4. otherwise: clip, scheduler step, optimizer update.

`train()` adds, around the steps (docs/TRAINING.md, "Resume and logging"):
- checkpoints (training/checkpoint.py) every `train.save_interval` steps and at the end,
  into `train.checkpoint_dir`; `Trainer(...)` resumes first (`train.resume`): model,
  optimizer, scheduler, RNG, data position and consumed samples, so the run continues
  the exact same stream;
- the DESIGN.md metrics (training/metrics.py) every `logging.log_interval` steps and at
  the last one, through MetricsLogger (training/logger.py: console line + wandb, rank 0).
- preemption (training/preemption.py): after SIGUSR1/SIGTERM on any rank
  (`train.preemption_signals`), every rank stops at the same step boundary, saves, and
  `preempted` is set (the entry point exits with PREEMPTED_EXIT_CODE).

The loss/gradient contract (docs/TRAINING.md, "The path we use"):
`calculate_per_token_loss=True` is set before DDP is built, `loss_func` returns
(sum_t w_t nll_t, num_targets, report), and `finalize_grads_as_sum` calls megatron's
`finalize_model_grads` without num_tokens. Nothing divides: the applied gradient is
grad(sum_t w_t nll_t) over the global batch for any DP / micro-batch / PP layout.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_longalign.config.training import LongAlignConfig
from megatron_longalign.data.indexed import DataFileError
from megatron_longalign.data.microbatch import (
    MicroBatch,
    MicroBatchBuilder,
    shard_for_context_parallel,
)
from megatron_longalign.data.mixture import DatasetMixture
from megatron_longalign.data.planner import GlobalBatch, GlobalBatchPlanner, PlanPosition
from megatron_longalign.model.config import to_transformer_config
from megatron_longalign.parallel.distributed import (
    context_parallel_rank,
    data_parallel_rank,
    data_parallel_size,
    initialize_distributed,
)
from megatron_longalign.training import loss as loss_keys
from megatron_longalign.training import metrics as metrics_lib
from megatron_longalign.training import preemption
from megatron_longalign.training.checkpoint import (
    MARKER,
    CheckpointError,
    CheckpointManager,
    TrainingState,
    read_marker,
    resolve_resume,
)
from megatron_longalign.training.logger import MetricsLogger
from megatron_longalign.training.loss import loss_func
from megatron_longalign.training.schedule import build_scheduler, current_lr
from megatron_longalign.training.validate import (
    ConfigError,
    document_multiple,
    empty_plan_problem,
    overlength_warnings,
    validate_config,
)

log = logging.getLogger("megatron_longalign.train")


class NonFiniteTrainingError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient norm."""


@dataclass
class StepResult:
    step: int  # 1-based iteration number (skipped steps count)
    epoch: int
    loss: float  # sum_t w_t * nll_t over the global batch: the objective
    token_mean_loss: float  # unweighted mean nll over the global batch's target tokens
    target_tokens: int
    real_tokens: int
    lr: float  # the lr of this step's update (or of the update it would have been)
    grad_norm: float  # before clipping
    skipped: bool
    step_time: float  # seconds
    rank_imbalance: float  # max / mean estimated rank cost of the global batch
    flops: float = 0.0  # model FLOPs of the step, whole job (metrics.training_flops)
    packing_efficiency: float = 0.0  # real tokens / token budget of the global batch

    @property
    def tokens_per_sec(self) -> float:
        """Real (non-padding) tokens of the global batch per second, all ranks together."""
        return self.real_tokens / self.step_time if self.step_time > 0 else 0.0

    def metrics(self) -> dict[str, float]:
        """The documented metric names (DESIGN.md)."""
        return {
            "train/loss": self.loss,
            "train/token_mean_loss": self.token_mean_loss,
            "train/lr": self.lr,
            "train/grad_norm": self.grad_norm,
            "train/skipped": float(self.skipped),
            "perf/tokens_per_sec": self.tokens_per_sec,
            "data/rank_imbalance": self.rank_imbalance,
            "data/packing_efficiency": self.packing_efficiency,
        }


@dataclass
class TrainData:
    """This rank's view of the data: every rank plans the same global batches."""

    mixture: DatasetMixture
    planner: GlobalBatchPlanner
    builder: MicroBatchBuilder
    dp_rank: int
    cp_size: int = 1
    cp_rank: int = 0

    def micro_batches(self, batch: GlobalBatch) -> list[MicroBatch]:
        """This rank's micro-batches: its DP rank's plans, built whole (cheap) and cut to
        its context-parallel share."""
        plans = batch.micro_batches[self.dp_rank]
        return [
            shard_for_context_parallel(
                self.builder.build(plan, batch.epoch), self.cp_size, self.cp_rank
            )
            for plan in plans
        ]


@dataclass
class _StepStats:
    """Sums over the global batch, identical on every rank after `_reduce_stats`."""

    loss: float = 0.0
    nll_sum: float = 0.0
    num_targets: float = 0.0


# ---- building blocks ---------------------------------------------------------------------


def _launch_world_size() -> int:
    if torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_precision(precision: str) -> torch.dtype:
    """auto: bf16 on GPU (megatron's usual mixed precision), fp32 on CPU (where bf16 is
    slow and the tests compare runs exactly)."""
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]


def build_transformer_config(config: LongAlignConfig, dtype: torch.dtype, cpu: bool):
    parallel, recompute = config.parallel, config.train.recompute
    bf16 = dtype == torch.bfloat16
    overrides: dict[str, Any] = dict(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        bf16=bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        # The contract: the schedule must not divide the loss (docs/TRAINING.md).
        calculate_per_token_loss=True,
        # THD micro-batches differ in length: pipeline stages exchange shapes first.
        variable_seq_lengths=parallel.pipeline_model_parallel_size > 1,
        # On CPU, initialise full weights and then split them: the same model for any TP.
        use_cpu_initialization=cpu,
        recompute_granularity=recompute.granularity,
        recompute_method=recompute.method,
        recompute_num_layers=recompute.num_layers,
    )
    if recompute.granularity == "selective":
        overrides["recompute_modules"] = list(recompute.modules)
    if parallel.context_parallel_size > 1:
        # Read by TE's attention only; flex and sdpa always all-gather K/V.
        overrides["cp_comm_type"] = parallel.cp_comm_type
    if overrides["variable_seq_lengths"]:
        # megatron rejects variable lengths with its default MoE dispatcher ("allgather")
        # even when the model has no experts.
        overrides["moe_token_dispatcher_type"] = "alltoall"
    return to_transformer_config(config.model, **overrides)


def finalize_grads_as_sum(
    model: list[torch.nn.Module],
    num_tokens: torch.Tensor | None,
    pg_collection: Any = None,
    force_all_reduce: bool = False,
) -> None:
    """`config.finalize_model_grads_func`: megatron's finalize (DP reduce-scatter or
    all-reduce, pipeline embedding sync) WITHOUT its division by the all-reduced token
    count. The per-token weights already carry the global normalisation."""
    from megatron.core.distributed import finalize_model_grads

    del num_tokens
    finalize_model_grads(
        model, None, pg_collection=pg_collection, force_all_reduce=force_all_reduce
    )


def build_model(
    config: LongAlignConfig,
    transformer_config: Any,
    device: torch.device,
    init_weights: Callable[[list[torch.nn.Module]], None] | None = None,
) -> list[torch.nn.Module]:
    """This rank's model chunks (one per rank: no virtual pipeline), wrapped in megatron
    DDP with SUM gradient reduction, and `transformer_config` wired to them."""
    from megatron.core import parallel_state
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
    )
    from megatron.core.transformer.module import Float16Module

    from megatron_longalign.model import build_gpt_model

    chunk = build_gpt_model(
        config.model,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        transformer_config=transformer_config,
    )
    chunks: list[torch.nn.Module] = [chunk]
    if init_weights is not None:
        init_weights(chunks)  # e.g. pretrained weights, before DDP copies them into buffers
    chunks = [c.to(device) for c in chunks]
    if transformer_config.bf16:
        # megatron's mixed-precision wrapper: bf16 inside, fp32 loss out.
        chunks = [Float16Module(transformer_config, c) for c in chunks]
    ddp_config = DistributedDataParallelConfig(
        use_distributed_optimizer=config.parallel.use_distributed_optimizer,
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        # Must stay False with calculate_per_token_loss: gradients are SUMMED over DP.
        average_in_collective=False,
        # Non-finite gradients are detected and skipped by the trainer, not raised here.
        check_for_nan_in_grad=False,
    )
    wrapped = [
        DistributedDataParallel(
            config=transformer_config,
            ddp_config=ddp_config,
            module=c,
            disable_bucketing=i > 0,
        )
        for i, c in enumerate(chunks)
    ]
    transformer_config.no_sync_func = wrapped[0].no_sync
    transformer_config.finalize_model_grads_func = finalize_grads_as_sum
    return wrapped


def build_optimizer(config: LongAlignConfig, model: list[torch.nn.Module], dtype: torch.dtype):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    optim = config.optim
    optimizer_config = OptimizerConfig(
        optimizer=optim.optimizer,
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.adam_eps,
        sgd_momentum=optim.sgd_momentum,
        clip_grad=optim.clip_grad,
        bf16=dtype == torch.bfloat16,
        fp16=False,
        params_dtype=dtype,
        use_distributed_optimizer=config.parallel.use_distributed_optimizer,
    )
    return get_megatron_optimizer(optimizer_config, model)


def build_data(config: LongAlignConfig, dp_rank: int, dp_size: int, cp_rank: int = 0) -> TrainData:
    cp_size = config.parallel.context_parallel_size
    # Context parallelism: every document padded to a multiple of 2 x CP (TE's layout).
    doc_multiple = document_multiple(config)
    mixture = DatasetMixture(config.data.sources)
    planner = GlobalBatchPlanner(
        mixture.lengths,
        mixture.target_counts,
        mixture.sizes,
        mixture.weights,
        config.data,
        dp_size=dp_size,
        loss_reduction=config.train.loss_reduction,
        document_multiple=doc_multiple,
    )
    builder = MicroBatchBuilder(
        mixture.__getitem__,
        pad_to_multiple_of=config.data.pad_to_multiple_of,
        # Padding has weight 0 and its own pseudo-document: any valid id will do.
        pad_token_id=0,
        skipalign=config.data.skipalign,
        seed=config.data.seed,
        document_multiple=doc_multiple,
    )
    return TrainData(mixture, planner, builder, dp_rank, cp_size, cp_rank)


def _chained(optimizer: Any) -> list[Any]:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


# ---- the trainer -------------------------------------------------------------------------


@dataclass
class TrainState:
    """What a checkpoint must restore to continue the exact same run."""

    step: int = 0  # iterations done (skipped ones included)
    position: PlanPosition = field(default_factory=PlanPosition)  # next global batch
    consumed_samples: int = 0
    consecutive_bad_steps: int = 0
    skipped_steps: int = 0


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
        self.device = (
            torch.device("cpu") if self.cpu else torch.device("cuda", torch.cuda.current_device())
        )
        self.dtype = resolve_precision(config.train.precision)
        self.is_rank0 = torch.distributed.get_rank() == 0
        try:
            self.data = build_data(
                config, data_parallel_rank(), data_parallel_size(), context_parallel_rank()
            )
        except DataFileError as err:  # changed since the validation, or check_files=False
            raise ConfigError([str(err)]) from err
        self._check_data_plan()  # before the model is built
        self.total_steps = self._total_steps()
        self.transformer_config = build_transformer_config(config, self.dtype, self.cpu)
        self.model = build_model(config, self.transformer_config, self.device, init_weights)
        self.optimizer = build_optimizer(config, self.model, self.dtype)
        self.scheduler = build_scheduler(self.optimizer, config.optim, self.total_steps)
        self.state = TrainState()
        # Metrics: global step values, per GPU over every rank of the job.
        peak = metrics_lib.peak_flops(
            metrics_lib.detect_device_name(), metrics_lib.matmul_dtype(self.dtype)
        )
        self.throughput = metrics_lib.ThroughputMeter(torch.distributed.get_world_size(), peak)
        self.loss_by_length = metrics_lib.LossByLength()
        self._step_loss_by_length = metrics_lib.LossByLength()
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
        holder: list[Any] = [None]
        if self.is_rank0:
            try:
                found = self._find_resume_path()
                holder[0] = ("ok", str(found) if found is not None else None)
            except CheckpointError as err:
                holder[0] = ("error", str(err))
        torch.distributed.broadcast_object_list(holder, src=0)
        status, value = holder[0]
        if status == "error":
            raise CheckpointError(value)
        if value is None:
            if self.config.train.init_from:
                self._load_initial_weights(self.config.train.init_from)
            return None
        path = Path(value)
        manager = self.checkpoints or CheckpointManager(path.parent)
        saved = manager.load(path, self.model, self.optimizer, self.scheduler)
        extra = saved.extra
        self.state = TrainState(
            step=saved.step,
            position=saved.plan_position,
            consumed_samples=saved.consumed_samples,
            consecutive_bad_steps=int(extra.get("consecutive_bad_steps", 0)),
            skipped_steps=int(extra.get("skipped_steps", 0)),
        )
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
        path = Path(source)
        if not (path / MARKER).is_file():
            latest = CheckpointManager(path).latest() if (path / "latest").is_file() else None
            if latest is None:
                raise CheckpointError(
                    f"train.init_from={source!r} is neither a complete checkpoint (no "
                    f"{MARKER}) nor a checkpoint root with a `latest` file"
                )
            path = latest
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
            **self.init_record,
        }
        path = self.checkpoints.save(
            TrainingState(state.step, state.consumed_samples, state.position, extra),
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
        if self.metrics_logger is not None:
            return
        try:
            run_config = dataclasses.asdict(self.config)
        except TypeError:  # pragma: no cover - defensive: not every field is a dataclass
            run_config = None
        self.metrics_logger = MetricsLogger(
            self.config.logging,
            run_config=run_config,
            stream=_LogStream(),
            run_id=self.wandb_run_id,
        )
        self._own_metrics_logger = True
        self.wandb_run_id = self.metrics_logger.run_id or self.wandb_run_id

    def close_metrics_logger(self) -> None:
        if self._own_metrics_logger and self.metrics_logger is not None:
            self.metrics_logger.close()
            self.metrics_logger = None
            self._own_metrics_logger = False

    def _record_metrics(self, result: StepResult) -> None:
        """Accumulate the step; on a logging step (every log_interval steps and the last
        one: the same decision on every rank) reduce and log the window. Collective on
        logging steps (loss by length is summed over the job)."""
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
        if result.skipped:
            return  # reported as a warning instead
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
        metrics["train/token_mean_loss"] = result.token_mean_loss
        metrics["train/epoch"] = float(result.epoch)
        metrics["train/consumed_samples"] = float(self.state.consumed_samples)
        metrics["train/skipped_steps"] = float(self.state.skipped_steps)
        self.last_metrics = metrics
        if self.metrics_logger is not None:
            self.metrics_logger.log(step, metrics, force=True)

    # ---- training ------------------------------------------------------------------------

    def batches(self) -> Iterator[GlobalBatch]:
        """Global batches from the current position on."""
        epochs = self.config.train.epochs if self.config.train.max_steps is None else None
        return self.data.planner.iterate(start=self.state.position, epochs=epochs)

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
                    self._maybe_save(final=False)
                self._maybe_save(final=True)
            finally:
                self.close_metrics_logger()
        return history

    def train_step(self, batch: GlobalBatch) -> StepResult:
        """One optimizer step on `batch` (normally the next one from `batches()`)."""
        start = time.perf_counter()
        micro_batches = self.data.micro_batches(batch)
        self._zero_grads()
        self._step_loss_by_length.reset()
        stats = self._forward_backward(micro_batches)
        result = self._update(batch, stats, start)
        if not result.skipped:  # a skipped step's losses are not finite
            _merge_loss_by_length(self.loss_by_length, self._step_loss_by_length)
        # The batch is consumed even when the update was skipped.
        self.state.step += 1
        self.state.position = PlanPosition(batch.epoch, batch.step + 1)
        self.state.consumed_samples += batch.num_samples
        self._count_bad_steps(result)  # may stop the run
        return result

    def _zero_grads(self) -> None:
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()

    def _forward_step(self, data_iterator: Iterator[MicroBatch], model: torch.nn.Module):
        """megatron forward_step_func: the THD micro-batch goes to every stage (the first
        stage reads tokens, every stage needs positions and cu_seqlens, the last one
        labels)."""
        from megatron_longalign.model import model_inputs

        micro_batch = next(data_iterator)
        inputs = model_inputs(micro_batch, self.device)
        weights = torch.as_tensor(micro_batch.loss_weights, device=self.device)
        output = model(**inputs)
        return output, functools.partial(self._loss_func, micro_batch, weights)

    def _loss_func(self, micro_batch: MicroBatch, weights: torch.Tensor, token_nll):
        """`loss_func`, and the per-token losses into this step's loss-by-length buckets
        (merged into the logging window unless the step is skipped)."""
        from megatron.core import parallel_state

        cp_group = parallel_state.get_context_parallel_group() if micro_batch.cp_size > 1 else None
        self._step_loss_by_length.add_microbatch(
            micro_batch,
            token_nll.detach(),
            sample_lengths=self.data.planner.lengths,
            cp_group=cp_group,
        )
        return loss_func(weights, token_nll)

    def _forward_backward(self, micro_batches: list[MicroBatch]) -> _StepStats:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        reports = get_forward_backward_func()(
            forward_step_func=self._forward_step,
            data_iterator=iter(micro_batches),
            model=self.model,
            num_microbatches=len(micro_batches),
            # Only used for fixed pipeline shapes; THD stages exchange shapes instead.
            seq_length=max(mb.num_tokens for mb in micro_batches),
            micro_batch_size=1,  # THD: one packed row per micro-batch
            forward_only=False,
        )
        return self._reduce_stats(reports)

    def _reduce_stats(self, reports: list[dict[str, torch.Tensor]]) -> _StepStats:
        """Sum the micro-batch reports over the whole job. Only last-stage ranks have
        reports; each TP rank of the last stage has the same ones, hence / TP."""
        from megatron.core import parallel_state

        local = torch.zeros(3, dtype=torch.float64, device=self.device)
        for report in reports:
            local[0] += report[loss_keys.LOSS].double()
            local[1] += report[loss_keys.NLL_SUM].double()
            local[2] += report[loss_keys.NUM_TARGETS].double()
        torch.distributed.all_reduce(local)
        local /= parallel_state.get_tensor_model_parallel_world_size()
        loss, nll_sum, num_targets = local.tolist()
        return _StepStats(loss, nll_sum, num_targets)

    def _update(self, batch: GlobalBatch, stats: _StepStats, start: float) -> StepResult:
        """The optimizer half of megatron's ChainedOptimizer.step(), with the finiteness
        check between computing the gradient norm and applying anything."""
        from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

        optimizer, clip = self.optimizer, self.config.optim.clip_grad
        # lr for update number (applied + 1); undone below if the update does not happen.
        self.scheduler.step(1)
        lr = current_lr(optimizer)
        found_inf = optimizer.prepare_grads()  # only fp16 loss scaling sets it
        grad_norm = float(optimizer.get_grad_norm())
        bad = found_inf or not math.isfinite(stats.loss) or not math.isfinite(grad_norm)
        if bad:
            self.scheduler.step(-1)
            self._zero_grads()
        else:
            if clip > 0:
                for inner in _chained(optimizer):
                    params = inner.get_parameters()
                    if params and not getattr(inner, "is_stub_optimizer", False):
                        clip_grad_by_total_norm_fp32(
                            params,
                            clip,
                            grad_norm,
                            inner.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8,
                        )
            if not optimizer.step_with_ready_grads():
                raise RuntimeError("the optimizer reported an unsuccessful step")
        metrics_lib.cuda_synchronize()  # the step's kernels are done before the clock stops
        step_time = time.perf_counter() - start
        planner, data_config = self.data.planner, self.config.data
        result = StepResult(
            step=self.state.step + 1,
            epoch=batch.epoch,
            loss=stats.loss,
            token_mean_loss=stats.nll_sum / max(stats.num_targets, 1.0),
            target_tokens=int(round(stats.num_targets)),
            real_tokens=batch.real_tokens,
            lr=lr,
            grad_norm=grad_norm,
            skipped=bad,
            step_time=step_time,
            rank_imbalance=batch.imbalance,
            flops=metrics_lib.training_flops(
                self.config.model, metrics_lib.batch_document_lengths(batch, planner.lengths)
            ),
            packing_efficiency=metrics_lib.batch_packing_efficiency(
                batch, data_config.micro_batch_size, data_config.seq_length
            ),
        )
        return result

    def _count_bad_steps(self, result: StepResult) -> None:
        state, limit = self.state, self.config.train.max_consecutive_bad_steps
        if not result.skipped:
            state.consecutive_bad_steps = 0
            return
        state.consecutive_bad_steps += 1
        state.skipped_steps += 1
        if self.is_rank0:
            log.warning(
                "step %d skipped: non-finite loss (%s) or gradient norm (%s); no update "
                "(%d bad step(s) in a row, limit train.max_consecutive_bad_steps=%d)",
                result.step,
                result.loss,
                result.grad_norm,
                state.consecutive_bad_steps,
                limit,
            )
        if state.consecutive_bad_steps >= limit:
            raise NonFiniteTrainingError(
                f"{state.consecutive_bad_steps} consecutive steps (the last: step "
                f"{result.step}, epoch {result.epoch}) had a non-finite loss or gradient "
                f"norm, reaching train.max_consecutive_bad_steps={limit}; the model was "
                "not updated by them. Lower optim.lr, keep optim.clip_grad > 0, check the "
                "data, or raise train.max_consecutive_bad_steps"
            )


def _merge_loss_by_length(into: metrics_lib.LossByLength, step: metrics_lib.LossByLength) -> None:
    into._move_to(step._sums.device)
    into._sums += step._sums
    into._counts += step._counts


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
