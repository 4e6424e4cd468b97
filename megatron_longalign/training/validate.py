"""Start-up validation of a whole `LongAlignConfig`: the one validator.

It collects every problem into one `ConfigError`, so a run that cannot work says
everything to change at once, before any process group or model is built. Every message
names the field (`group.field`). Each rule is written once: the rules a component also
applies to its own arguments live next to it, as functions that return problems, and are
called from here (`parallel_problems`, `model_problems`, `sequence_parallel_problems`,
`data_problems`, `loss_reduction_problems`, `skipalign_problems` through
`data_problems`, `keep_last_problems`, `optimizer_format_problems`); the others, and the
checks that need several groups or the file system, are here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron_longalign.config.errors import ConfigError, raise_if_problems
from megatron_longalign.config.model import ATTENTION_BACKENDS
from megatron_longalign.config.training import (
    LR_DECAY_STYLES,
    OPTIMIZERS,
    PRECISIONS,
    RECOMPUTE_GRANULARITIES,
    RECOMPUTE_METHODS,
    RESUME_KEYWORDS,
    RUN_ID_PATTERN,
    WANDB_MODES,
    LoggingConfig,
    LongAlignConfig,
)
from megatron_longalign.data.planner import data_problems, loss_reduction_problems
from megatron_longalign.model.backends import sequence_parallel_problems, unavailable_reason
from megatron_longalign.model.config import model_problems
from megatron_longalign.parallel.context_parallel import document_multiple
from megatron_longalign.parallel.distributed import parallel_problems
from megatron_longalign.utils.signals import signal_number

__all__ = [
    "ConfigError",
    "config_problems",
    "empty_plan_problem",
    "empty_validation_problem",
    "logging_problems",
    "overlength_warnings",
    "validate_config",
]


def validate_config(
    config: LongAlignConfig, world_size: int = 1, *, check_files: bool = True
) -> None:
    """Raise ConfigError listing every problem of `config` for a job of `world_size`
    processes. `check_files=False` skips the checks that read the dataset files."""
    raise_if_problems(config_problems(config, world_size, check_files=check_files))


def config_problems(
    config: LongAlignConfig, world_size: int = 1, *, check_files: bool = True
) -> list[str]:
    problems: list[str] = []
    checks: list[Callable[[LongAlignConfig, int], list[str]]] = [
        _parallel_problems,
        _model_problems,
        _data_problems,
        _position_problems,
        _optim_problems,
        _train_problems,
        _logging_problems,
    ]
    if check_files:
        checks.append(_file_problems)
    for check in checks:
        problems += check(config, world_size)
    return problems


def _caught(validate: Callable[[], object], prefix: str = "") -> list[str]:
    """The ValueError `validate` raises, as a problem."""
    try:
        validate()
    except ValueError as err:
        return [f"{prefix}{err}"]
    return []


# ---- parallel layout ---------------------------------------------------------------------


def _parallel_problems(config: LongAlignConfig, world_size: int) -> list[str]:
    parallel, model = config.parallel, config.model
    problems = [f"parallel config: {p}" for p in parallel_problems(parallel, world_size)]
    pp = parallel.pipeline_model_parallel_size
    if isinstance(pp, int) and pp >= 1 and model.num_layers % pp:
        problems.append(
            f"model.num_layers ({model.num_layers}) must be divisible by "
            f"parallel.pipeline_model_parallel_size ({pp}): every stage holds as many layers"
        )
    problems += sequence_parallel_problems(model.attention_backend, parallel.sequence_parallel)
    return problems


def _data_parallel_size(config: LongAlignConfig, world_size: int) -> int | None:
    if parallel_problems(config.parallel, world_size):
        return None  # reported by _parallel_problems
    return config.parallel.data_parallel_size_for(world_size)


# ---- model -------------------------------------------------------------------------------


def _model_problems(config: LongAlignConfig, world_size: int) -> list[str]:
    model = config.model
    tp = config.parallel.tensor_model_parallel_size
    # An invalid TP size is reported by _parallel_problems.
    valid_tp = isinstance(tp, int) and not isinstance(tp, bool) and tp >= 1
    problems = model_problems(model, tp if valid_tp else 1, prefix="model.")
    backend = model.attention_backend
    if backend not in ATTENTION_BACKENDS:
        return problems
    reason = unavailable_reason(backend)
    if reason is not None:
        problems.append(f"model.attention_backend={backend}: {reason}")
    elif backend == "flex" and not torch.cuda.is_available():
        problems.append(
            "model.attention_backend=flex cannot train on CPU (torch has no flex_attention "
            "backward there); use sdpa or auto"
        )
    return problems


# ---- data --------------------------------------------------------------------------------


def _pad_multiple_needed(config: LongAlignConfig) -> tuple[int, list[str]]:
    """The token-count multiple every micro-batch needs: 2*CP for context parallelism
    (each document in 2*CP chunks), and TP x CP for sequence parallelism (each CP rank's
    1 / CP share is split again over TP)."""
    parallel = config.parallel
    tp, cp = parallel.tensor_model_parallel_size, parallel.context_parallel_size
    needs, why = 1, []
    if parallel.sequence_parallel:
        needs = math.lcm(needs, tp * cp)
        why.append(f"TP x CP = {tp * cp} for sequence parallelism")
    if cp > 1:
        needs = math.lcm(needs, 2 * cp)
        why.append(f"2 x CP = {2 * cp} for context parallelism")
    doc_pad = config.data.pad_documents_to_multiple_of
    if doc_pad > 1:
        # The alignment pad is a document too, padded like the others.
        needs = math.lcm(needs, doc_pad)
        why.append(f"data.pad_documents_to_multiple_of={doc_pad}")
    return needs, why


def _data_problems(config: LongAlignConfig, world_size: int) -> list[str]:
    data = config.data
    dp = _data_parallel_size(config, world_size)
    problems = data_problems(data, dp or 1)
    needs, why = _pad_multiple_needed(config)
    pad = data.pad_to_multiple_of
    if pad >= 1 and pad % needs:
        problems.append(
            f"data.pad_to_multiple_of={pad} must be a multiple of {needs} ({' and '.join(why)}); "
            f"set data.pad_to_multiple_of={math.lcm(pad, needs)}"
        )
    doc_multiple = (
        document_multiple(data.pad_documents_to_multiple_of, config.parallel.context_parallel_size)
        if data.pad_documents_to_multiple_of >= 1
        else 1
    )
    if data.seq_length >= 1 and data.seq_length % doc_multiple:
        problems.append(
            f"data.seq_length={data.seq_length} must be a multiple of the document padding "
            f"multiple {doc_multiple} (lcm of data.pad_documents_to_multiple_of and 2 x "
            "context_parallel_size): packs hold padded documents; set "
            f"data.seq_length={-(-data.seq_length // doc_multiple) * doc_multiple}"
        )
    problems += loss_reduction_problems(config.train.loss_reduction)
    return problems


def _position_problems(config: LongAlignConfig, world_size: int) -> list[str]:
    """Positions reach seq_length - 1 (one document filling a pack), or
    target_context_length - 1 with SkipAlign: the model must be configured for them."""
    model, data = config.model, config.data
    problems = []
    if model.max_position_embeddings < data.seq_length:
        problems.append(
            f"model.max_position_embeddings ({model.max_position_embeddings}) is below "
            f"data.seq_length ({data.seq_length}); raise max_position_embeddings (and extend "
            "RoPE with model.rope_theta or model.rope_scaling) or lower data.seq_length"
        )
    skip = data.skipalign
    if skip.enabled and model.max_position_embeddings < skip.target_context_length:
        problems.append(
            f"model.max_position_embeddings ({model.max_position_embeddings}) is below "
            f"data.skipalign.target_context_length ({skip.target_context_length}); SkipAlign "
            "positions reach target_context_length - 1: lower the target or raise "
            "max_position_embeddings"
        )
    return problems


def _file_problems(config: LongAlignConfig, world_size: int) -> list[str]:
    """The preprocessed sets of data.sources and data.valid_sources, read before anything
    is built: each P.json valid and in the current format, every file it names present
    with its recorded size, indexes that agree with their data (data/indexed.py
    `open_dataset_files`); one tokenizer for all of them, a vocabulary that fits the
    model, and samples that fit data.seq_length."""
    from megatron_longalign.data.indexed import DataFileError, open_dataset_files

    problems = []
    vocab_sizes: dict[str, int] = {}
    tokenizers: dict[str, list[str]] = {}  # tokenizer sha256 -> P.json files
    lengths: dict[int, Any] = {}  # source index -> tokens per sample
    valid_lengths: list[Any] = []
    named = [("data.sources", i, s) for i, s in enumerate(config.data.sources)]
    named += [("data.valid_sources", i, s) for i, s in enumerate(config.data.valid_sources)]
    for field_name, i, source in named:
        if not source.prefix:
            continue  # reported by data_problems
        try:
            files = open_dataset_files(source.prefix)
        except DataFileError as err:
            problems.append(f"{field_name}[{i}].prefix={source.prefix!r}: {err}")
            continue
        try:
            tokenizer = files.metadata["tokenizer"]
            vocab_sizes[source.prefix] = int(tokenizer["vocab_size"])
            digest = str(tokenizer["sha256"])
        except (ValueError, KeyError, TypeError) as err:
            problems.append(
                f"{field_name}[{i}].prefix={source.prefix!r}: {files.manifest} has no usable "
                f"tokenizer record ({type(err).__name__}: {err}); rerun tools/preprocess.py "
                f"--output-prefix {source.prefix} --overwrite"
            )
            continue
        where = f"{files.manifest} ({tokenizer.get('path') or tokenizer.get('kind', '?')})"
        tokenizers.setdefault(digest, []).append(where)
        if field_name == "data.sources":
            lengths[i] = files.lengths
        else:
            valid_lengths.append(files.lengths)
    if len(tokenizers) > 1:
        which = "data.sources and data.valid_sources" if valid_lengths else "data.sources"
        problems.append(
            f"{which} were preprocessed with different tokenizers (their token ids mean "
            "different things): "
            + "; ".join(f"tokenizer {h[:12]}: {', '.join(w)}" for h, w in tokenizers.items())
            + ". Preprocess every source with the model's own tokenizer (tools/preprocess.py "
            "--tokenizer ... --overwrite)"
        )
    too_big = {p: v for p, v in vocab_sizes.items() if v > config.model.vocab_size}
    if too_big:
        largest = max(too_big.values())
        problems.append(
            f"model.vocab_size ({config.model.vocab_size}) is smaller than the vocabulary "
            f"({largest}) of the tokenizer that preprocessed {', '.join(too_big)}; set "
            f"model.vocab_size >= {largest} or preprocess with the model's own tokenizer"
        )
    if len(lengths) == len(config.data.sources):
        problems += _length_problems(config, [lengths[i] for i in range(len(lengths))])
    if valid_lengths and len(valid_lengths) == len(config.data.valid_sources):
        problems += _valid_length_problems(config, valid_lengths)
    return problems


def _valid_length_problems(config: LongAlignConfig, lengths: list[Any]) -> list[str]:
    """data.valid_sources: samples longer than data.seq_length are an error with
    data.on_overlength=error (as for training), and some sample must fit."""
    counts = _overlength_counts(config, lengths)
    too_long, total = sum(c[0] for c in counts), sum(c[1] for c in counts)
    if too_long and config.data.on_overlength == "error":
        return [
            f"{too_long} validation sample(s) of data.valid_sources are longer than "
            f"data.seq_length={config.data.seq_length} and data.on_overlength=error; set "
            f"data.on_overlength=drop, or {_overlength_fix(config)}"
        ]
    if too_long == total:
        return [empty_validation_problem(config)]
    return []


def _overlength_counts(config: LongAlignConfig, lengths: list[Any]) -> list[tuple[int, int, int]]:
    """(samples longer than data.seq_length, samples, longest) per source."""
    limit = config.data.seq_length
    arrays = [np.asarray(x) for x in lengths]
    return [(int((x > limit).sum()), int(x.size), int(x.max()) if x.size else 0) for x in arrays]


def _overlength_fix(config: LongAlignConfig) -> str:
    limit = config.data.seq_length
    return (
        f"raise data.seq_length, or rerun tools/preprocess.py with --max-length {limit} "
        "--on-overlength truncate-middle --overwrite (truncated samples keep their answers)"
    )


def _length_problems(config: LongAlignConfig, lengths: list[Any]) -> list[str]:
    """No sample fits data.seq_length (nothing to train on), or some do not while
    data.on_overlength=error."""
    data = config.data
    if data.seq_length < 2:
        return []  # reported by the data group
    counts = _overlength_counts(config, lengths)
    too_long, total = sum(c[0] for c in counts), sum(c[1] for c in counts)
    if not too_long:
        return []
    detail = "; ".join(
        f"data.sources[{i}] ({data.sources[i].prefix}): {n} of {size} (longest {longest} tokens)"
        for i, (n, size, longest) in enumerate(counts)
        if n
    )
    if data.on_overlength == "error":
        return [
            f"{too_long} sample(s) are longer than data.seq_length={data.seq_length} and "
            f"data.on_overlength=error: {detail}. Set data.on_overlength=drop to leave them "
            f"out (reported at start-up), or {_overlength_fix(config)}"
        ]
    if too_long == total:
        shortest = min(int(np.min(x)) for x in lengths if np.asarray(x).size)
        return [
            f"every sample is longer than data.seq_length={data.seq_length}: all {total} "
            f"would be dropped and nothing is left to train on ({detail}; the shortest has "
            f"{shortest} tokens). Set data.seq_length >= {shortest}, or "
            f"{_overlength_fix(config)}"
        ]
    return []


def overlength_warnings(config: LongAlignConfig, lengths: list[Any]) -> list[str]:
    """One line per source with samples longer than data.seq_length, which the planner
    leaves out (data.on_overlength=drop): never a silent drop."""
    return [
        f"data.sources[{i}] ({config.data.sources[i].prefix}): {n} of {size} samples are "
        f"longer than data.seq_length={config.data.seq_length} (longest {longest} tokens) "
        f"and are dropped; to keep them, {_overlength_fix(config)}"
        for i, (n, size, longest) in enumerate(_overlength_counts(config, lengths))
        if n
    ]


def empty_plan_problem(config: LongAlignConfig, lengths: list[Any]) -> str:
    """Why the data plan has no step, and what to change."""
    counts = _overlength_counts(config, lengths)
    detail = "; ".join(
        f"data.sources[{i}] ({s.prefix}, weight {s.weight:g}): {size} samples, {n} longer than "
        f"data.seq_length={config.data.seq_length}"
        for i, (s, (n, size, _)) in enumerate(zip(config.data.sources, counts, strict=True))
    )
    return (
        f"the data plan is empty: no sample can be trained on ({detail}). Give a source "
        f"with samples that fit a weight > 0, or {_overlength_fix(config)}"
    )


def empty_validation_problem(config: LongAlignConfig) -> str:
    """Why validation has no sample, and what to change."""
    data = config.data
    if data.valid_sources:
        what = f"data.valid_sources ({', '.join(s.prefix for s in data.valid_sources)})"
    else:
        what = f"data.valid_fraction={data.valid_fraction:g} of the training sources"
    return (
        f"the validation set is empty: {what} gives no sample of at most data.seq_length="
        f"{data.seq_length} tokens. Raise data.valid_fraction, give data.valid_sources "
        "with samples that fit, or turn validation off (data.valid_fraction=0, "
        "data.valid_sources=[])"
    )


# ---- optimizer, schedule, train, logging -------------------------------------------------


def _optim_problems(config: LongAlignConfig, world_size: int) -> list[str]:
    optim, train = config.optim, config.train
    problems = []
    if optim.optimizer not in OPTIMIZERS:
        problems.append(f"optim.optimizer={optim.optimizer!r}; choose one of {OPTIMIZERS}")
    if optim.lr_decay_style not in LR_DECAY_STYLES:
        problems.append(
            f"optim.lr_decay_style={optim.lr_decay_style!r}; choose one of {LR_DECAY_STYLES}"
        )
    if not optim.lr > 0:
        problems.append(f"optim.lr must be > 0, got {optim.lr}")
    if not 0 <= optim.min_lr <= optim.lr:
        problems.append(f"optim.min_lr ({optim.min_lr}) must be in [0, optim.lr = {optim.lr}]")
    if not 0 <= optim.lr_warmup_init <= optim.lr:
        problems.append(
            f"optim.lr_warmup_init ({optim.lr_warmup_init}) must be in [0, optim.lr = {optim.lr}]"
        )
    if optim.lr_warmup_steps < 0:
        problems.append(f"optim.lr_warmup_steps must be >= 0, got {optim.lr_warmup_steps}")
    fraction = optim.lr_warmup_fraction
    if fraction is not None:
        if not 0 <= fraction < 1:
            problems.append(f"optim.lr_warmup_fraction must be in [0, 1), got {fraction}")
        if optim.lr_warmup_steps:
            problems.append(
                f"optim.lr_warmup_fraction ({fraction}) and optim.lr_warmup_steps "
                f"({optim.lr_warmup_steps}) are both set; set optim.lr_warmup_steps=0 (or "
                "optim.lr_warmup_fraction=null)"
            )
    decay_steps = optim.lr_decay_steps if optim.lr_decay_steps is not None else train.max_steps
    if decay_steps is not None and optim.lr_warmup_steps >= decay_steps:
        problems.append(
            f"optim.lr_warmup_steps ({optim.lr_warmup_steps}) must be smaller than the number "
            f"of decay steps, {decay_steps} (optim.lr_decay_steps, or train.max_steps when "
            "lr_decay_steps is null)"
        )
    if optim.weight_decay < 0:
        problems.append(f"optim.weight_decay must be >= 0, got {optim.weight_decay}")
    if optim.clip_grad < 0:
        problems.append(f"optim.clip_grad must be >= 0 (0 = no clipping), got {optim.clip_grad}")
    return problems


def _train_problems(config: LongAlignConfig, world_size: int) -> list[str]:
    train = config.train
    problems = []
    if (train.max_steps is None) == (train.epochs is None):
        problems.append(
            "set exactly one of train.max_steps and train.epochs (the other null); got "
            f"max_steps={train.max_steps}, epochs={train.epochs}"
        )
    for name in ("max_steps", "epochs"):
        value = getattr(train, name)
        if value is not None and value < 1:
            problems.append(f"train.{name} must be >= 1, got {value}")
    if train.precision not in PRECISIONS:
        problems.append(f"train.precision={train.precision!r}; choose one of {PRECISIONS}")
    if train.max_consecutive_bad_steps < 1:
        problems.append(
            "train.max_consecutive_bad_steps must be >= 1 (1 = stop at the first non-finite "
            f"step), got {train.max_consecutive_bad_steps}"
        )
    if train.save_interval < 0:
        problems.append(
            f"train.save_interval must be >= 0 (0 = save at the end only), got "
            f"{train.save_interval}"
        )
    from megatron_longalign.training.checkpoint import (
        keep_last_problems,
        optimizer_format_problems,
    )

    problems += keep_last_problems(train.keep_last)
    problems += optimizer_format_problems(train.checkpoint_optimizer_format)
    problems += _resume_problems(train.resume)
    for name in train.preemption_signals:
        problems += _caught(lambda name=name: signal_number(name), "train.preemption_signals: ")
    if train.checkpoint_dir is None and train.save_interval:
        problems.append(
            f"train.save_interval={train.save_interval} needs train.checkpoint_dir (null: "
            "checkpointing is off)"
        )
    problems += _recompute_problems(config)
    problems += _eval_problems(config)
    return problems


def _eval_problems(config: LongAlignConfig) -> list[str]:
    """train.eval_interval (0/null: validate at the end only) and train.eval_iters
    (null: the whole validation set)."""
    train = config.train
    problems = []
    if train.eval_interval is not None and train.eval_interval < 0:
        problems.append(
            f"train.eval_interval must be >= 0 (0 or null = validate at the end only), got "
            f"{train.eval_interval}"
        )
    if train.eval_iters is not None and train.eval_iters < 1:
        problems.append(
            f"train.eval_iters must be >= 1 validation global batches (null = the whole "
            f"validation set), got {train.eval_iters}"
        )
    return problems


def _resume_problems(resume: str | None) -> list[str]:
    """train.resume: a keyword, null, or a path that exists (a typo such as `Auto` or a
    mistyped directory is reported here, before anything is built)."""
    if resume is None or resume in RESUME_KEYWORDS:
        return []
    choices = (
        "auto (checkpoint_dir/latest, else the newest complete step_<N>), never/none/null "
        "(start fresh), or the path of a step_<N> checkpoint directory or a checkpoint root"
    )
    if not resume.strip():
        return [f"train.resume must be one of: {choices}; got {resume!r}"]
    if not Path(resume).exists():
        return [f"train.resume={resume!r}: no such file or directory; use {choices}"]
    return []


def _recompute_problems(config: LongAlignConfig) -> list[str]:
    recompute = config.train.recompute
    granularity = recompute.granularity
    if granularity is None:
        return []
    if granularity not in RECOMPUTE_GRANULARITIES:
        return [
            f"train.recompute.granularity={granularity!r}; choose null or one of "
            f"{RECOMPUTE_GRANULARITIES}"
        ]
    if granularity == "selective":
        if recompute.method is not None or recompute.num_layers is not None:
            return [
                "train.recompute.method and train.recompute.num_layers apply to granularity "
                "full only; set them to null for selective recomputation"
            ]
        return []
    layers_per_stage = config.model.num_layers // max(
        config.parallel.pipeline_model_parallel_size, 1
    )
    problems = []
    if recompute.method not in RECOMPUTE_METHODS:
        problems.append(
            f"train.recompute.method={recompute.method!r}; granularity full needs one of "
            f"{RECOMPUTE_METHODS}"
        )
    if recompute.num_layers is None or not 1 <= recompute.num_layers <= layers_per_stage:
        problems.append(
            f"train.recompute.num_layers={recompute.num_layers!r}; granularity full needs "
            f"1..{layers_per_stage} (layers per pipeline stage)"
        )
    return problems


def _logging_problems(config: LongAlignConfig, world_size: int) -> list[str]:
    return logging_problems(config.logging)


def logging_problems(logging: LoggingConfig) -> list[str]:
    """The `logging` group's problems (MetricsLogger takes it as validated)."""
    problems = []
    if logging.log_interval < 1:
        problems.append(f"logging.log_interval must be >= 1, got {logging.log_interval}")
    if logging.wandb.mode not in WANDB_MODES:
        problems.append(f"logging.wandb.mode={logging.wandb.mode!r}; choose one of {WANDB_MODES}")
    run_id = logging.wandb.run_id
    if run_id is not None and not RUN_ID_PATTERN.match(run_id):
        problems.append(
            f"logging.wandb.run_id={run_id!r}: use 1-128 letters, digits, '-', '_' or '.'"
        )
    return problems
