"""Structured configs for training (Hydra groups `optim`, `train`, `logging`) and the
top-level `LongAlignConfig` that composes every group:

    model     ModelConfig      conf/model/*.yaml      megatron_longalign/config/model.py
    data      DataConfig       conf/data/*.yaml       megatron_longalign/config/data.py
    parallel  ParallelConfig   conf/parallel/*.yaml   megatron_longalign/config/parallel.py
    optim     OptimConfig      conf/optim/*.yaml      (here)
    train     TrainConfig      conf/train/*.yaml      (here)
    logging   LoggingConfig    conf/logging/*.yaml    (here)

`register_configs()` puts the schema into Hydra's ConfigStore as `longalign_schema`;
conf/config.yaml lists it first in its defaults, so every YAML value is type-checked
against these dataclasses. `training/validate.py` checks every rule at start-up.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from megatron_longalign.config.data import DataConfig
from megatron_longalign.config.model import ModelConfig
from megatron_longalign.config.parallel import ParallelConfig

OPTIMIZERS = ("adam", "sgd")
LR_DECAY_STYLES = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "bf16", "fp32")
RECOMPUTE_GRANULARITIES = ("full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")
# Distributed-optimizer state formats of a checkpoint (training/checkpoint.py, docs/TRAINING.md).
OPTIMIZER_FORMATS = ("dp_reshardable", "fully_reshardable", "fully_reshardable_mem_efficient")


@dataclass
class OptimConfig:
    # megatron-core's optimizers: "adam" is AdamW (decoupled weight decay), "sgd" has momentum.
    optimizer: str = "adam"
    lr: float = 2e-5
    min_lr: float = 0.0
    # Linear warmup from lr_warmup_init to lr over lr_warmup_steps optimizer updates.
    lr_warmup_init: float = 0.0
    lr_warmup_steps: int = 0
    # Or warmup as a fraction of the decay steps (Megatron's --lr-warmup-fraction):
    # floor(lr_warmup_fraction x decay steps) updates, e.g. 0.03 for 3% of the run. null:
    # use lr_warmup_steps; when set, lr_warmup_steps must be 0.
    lr_warmup_fraction: float | None = None
    # After warmup: cosine | linear decay to min_lr at lr_decay_steps, or constant.
    lr_decay_style: str = "cosine"
    # Updates until min_lr is reached; None = the run's total steps.
    lr_decay_steps: int | None = None
    # megatron exempts biases and norm weights from weight decay.
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    sgd_momentum: float = 0.9
    # Clip the global gradient norm to this (0 = no clipping; the norm is still logged).
    clip_grad: float = 1.0


@dataclass
class RecomputeConfig:
    """Activation recomputation, passed to megatron's TransformerConfig as
    recompute_granularity / recompute_method / recompute_num_layers / recompute_modules."""

    # null (off) | full (whole layers) | selective (the listed submodules)
    granularity: str | None = None
    # full only: uniform (every recompute_num_layers layers as one unit) | block (the first
    # num_layers layers of each pipeline stage)
    method: str | None = None
    num_layers: int | None = None
    # selective only: megatron's names, e.g. core_attn, mlp, layernorm
    modules: list[str] = field(default_factory=lambda: ["core_attn"])


@dataclass
class TrainConfig:
    # Length of the run: optimizer steps (max_steps), or whole data epochs (epochs) when
    # max_steps is null. A skipped (non-finite) step counts: it consumed its batch.
    max_steps: int | None = 100
    epochs: int | None = None
    # Seeds model initialisation (the data order has its own data.seed).
    seed: int = 1234
    # Per-token loss weights from the global batch (docs/DATA_PIPELINE.md):
    # sequence (LongAlign: mean of per-sequence means) | token | sqrt
    loss_reduction: str = "sequence"
    # auto: bf16 on GPU, fp32 on CPU
    precision: str = "auto"
    recompute: RecomputeConfig = field(default_factory=RecomputeConfig)
    # A step whose loss or gradient norm is not finite is skipped (no update); this many
    # bad steps in a row stop the run with an error (1 = stop at the first bad step).
    max_consecutive_bad_steps: int = 3
    # Where the run writes its files (Hydra's run directory: resolved config, logs).
    output_dir: str = "outputs/train"
    # Checkpoints (training/checkpoint.py): null = no checkpointing. conf/train/default.yaml
    # sets ${train.output_dir}/checkpoints; programmatic configs opt in.
    checkpoint_dir: str | None = None
    # Save every save_interval steps (0 = only at the end) and at the end of the run (a
    # final save that would repeat the last periodic one is skipped).
    save_interval: int = 0
    # Complete checkpoints to keep (null = all).
    keep_last: int | None = 3
    # Distributed-optimizer state format (training/checkpoint.py, docs/TRAINING.md):
    # dp_reshardable (fast, reshards in DP only) | fully_reshardable (reshards in TP, PP
    # and DP; gathers each DP group's optimizer state at save) |
    # fully_reshardable_mem_efficient (the same, gathered on the host over gloo).
    checkpoint_optimizer_format: str = "dp_reshardable"
    # Where the run continues from (training/checkpoint.py resolve_resume, docs/TRAINING.md):
    # auto: the checkpoint checkpoint_dir/latest names, else the newest complete step_<N>
    #   there (said in the log), else a fresh start |
    # never (or none, or null): a fresh start |
    # a path: a step_<N> checkpoint directory, or a checkpoint root (resolved as auto).
    # A damaged checkpoint stops the run (exit 1) with the one to use instead; so does a
    # resume point older than a complete checkpoint in checkpoint_dir (it would be
    # overwritten): no complete checkpoint is ever overwritten.
    resume: str | None = "auto"
    # Initial weights for a run that does not resume: a checkpoint directory or root
    # (e.g. `tools/convert_hf.py import` output). Model weights only, any saved layout;
    # optimizer, scheduler and data position start fresh. Ignored when resuming.
    init_from: str | None = None
    # Preemption (training/preemption.py, docs/CLUSTER.md): on any of these signals the run
    # finishes its current step, saves a checkpoint and exits with status 75 (requeue and
    # resume). [] leaves the signals' default actions alone.
    preemption_signals: list[str] = field(default_factory=lambda: ["SIGUSR1", "SIGTERM"])
    # Validation (forward only, on data.valid_sources or data.valid_fraction; off without
    # them): every eval_interval steps (0 or null: only at the end) and at the end of the
    # run, over the first eval_iters validation global batches (null: all of them).
    eval_interval: int | None = 0
    eval_iters: int | None = None


WANDB_MODES = ("auto", "online", "offline", "disabled")
# wandb run ids (logging.wandb.run_id): letters, digits and - _ . (wandb rejects / \ # ? %
# : and spaces).
RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
# train.resume values that are not paths; null means never as well.
RESUME_AUTO = "auto"
RESUME_FRESH = ("never", "none")
RESUME_KEYWORDS = (RESUME_AUTO, *RESUME_FRESH)


@dataclass
class WandbConfig:
    # auto: online with WANDB_API_KEY, offline without (an explicit WANDB_MODE wins) |
    # online | offline | disabled (wandb is not imported)
    mode: str = "disabled"
    project: str = "megatron-longalign"
    entity: str | None = None
    run_name: str | None = None
    tags: list[str] = field(default_factory=list)
    # Parent of wandb's own `wandb/` directory; null: WANDB_DIR, else the working directory.
    dir: str | None = None
    # Continue this run; null: a new run, or the one stored in the resumed checkpoint.
    run_id: str | None = None


@dataclass
class LoggingConfig:
    # Metrics (console line + wandb) every log_interval steps and at the last step (rank 0);
    # skipped steps are always reported as warnings.
    log_interval: int = 1
    # tqdm progress bar on rank 0
    progress_bar: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # Every logged step's metrics (train and valid lines) as JSON lines, rank 0, appended
    # and flushed (training/metrics_file.py). null: not written; conf/logging/console.yaml
    # sets ${train.output_dir}/metrics.jsonl, programmatic configs opt in.
    metrics_file: str | None = None


@dataclass
class LongAlignConfig:
    name: str = "longalign"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


SCHEMA_NAME = "longalign_schema"


def schema_node():
    """LongAlignConfig as an OmegaConf node."""
    from omegaconf import OmegaConf

    return OmegaConf.structured(LongAlignConfig)


def register_configs() -> None:
    """Store the schema in Hydra's ConfigStore (idempotent). Call before `hydra.main`
    composes conf/config.yaml."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=schema_node())


def to_config(cfg) -> LongAlignConfig:
    """A composed Hydra/OmegaConf config -> LongAlignConfig dataclasses (interpolations
    resolved). Lists such as skipalign.boundaries come back as lists."""
    from omegaconf import OmegaConf

    config = OmegaConf.to_object(cfg)
    if not isinstance(config, LongAlignConfig):
        # A config composed without the schema node is a plain dict: type it now.
        config = OmegaConf.to_object(OmegaConf.merge(schema_node(), cfg))
    return config
