"""The megatron-core assembly, usable without a Trainer: precision, TransformerConfig,
model chunks (under DDP for training, or bare and forward-only from a checkpoint for
scoring and evaluation), and megatron's optimizer.

    model = build_model(config, build_transformer_config(config, dtype, cpu), device)
    optimizer = build_optimizer(config, model, dtype)

    chunks = build_inference_model(config, "ckpt/")   # eval mode, weights of `latest`

Every function here needs the process group and megatron's parallel state
(`parallel/distributed.py: initialize_distributed`).

The loss/gradient contract (docs/TRAINING.md, "The path we use"):
`calculate_per_token_loss=True` is set before DDP is built, `loss_func` returns
(sum_t w_t nll_t, num_targets, report), and `finalize_grads_as_sum` calls megatron's
`finalize_model_grads` without num_tokens. Nothing divides: the applied gradient is
grad(sum_t w_t nll_t) over the global batch for any DP / micro-batch / PP layout.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from megatron_longalign.config.training import LongAlignConfig
from megatron_longalign.model.config import to_transformer_config
from megatron_longalign.training.checkpoint import CheckpointManager, resolve_checkpoint


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


def build_model_chunks(
    config: LongAlignConfig,
    transformer_config: Any,
    device: torch.device,
    init_weights: Callable[[list[torch.nn.Module]], None] | None = None,
) -> list[torch.nn.Module]:
    """This rank's model chunks (one per rank: no virtual pipeline) on `device`, in
    megatron's Float16Module when bf16; no DDP. `init_weights(chunks)` sees the bare
    chunks first (e.g. to load pretrained weights)."""
    from megatron.core import parallel_state
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
    return chunks


def build_model(
    config: LongAlignConfig,
    transformer_config: Any,
    device: torch.device,
    init_weights: Callable[[list[torch.nn.Module]], None] | None = None,
) -> list[torch.nn.Module]:
    """This rank's model chunks (`build_model_chunks`), wrapped in megatron DDP with SUM
    gradient reduction, and `transformer_config` wired to them."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
    )

    chunks = build_model_chunks(config, transformer_config, device, init_weights)
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


def default_device() -> torch.device:
    """This process's CUDA device, or the CPU (CPU mode)."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def build_inference_model(
    config: LongAlignConfig,
    checkpoint: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
) -> list[torch.nn.Module]:
    """Forward-only model chunks of this rank (no DDP, no optimizer) with the weights of
    `checkpoint`: a checkpoint directory, or a checkpoint root (the one `latest` names).
    The checkpoint may have been saved in any TP/PP/DP layout: megatron reshards it into
    the current one. In eval mode; run them under `torch.no_grad()`.

    For GATEAU scoring, evaluation and validation. `dtype` defaults to
    `train.precision`'s (`resolve_precision`), `device` to this process's. Collective:
    every rank of the job calls it (after `initialize_distributed`)."""
    path = resolve_checkpoint(checkpoint)
    device = default_device() if device is None else device
    dtype = resolve_precision(config.train.precision) if dtype is None else dtype
    transformer_config = build_transformer_config(config, dtype, cpu=device.type == "cpu")
    chunks = build_model_chunks(config, transformer_config, device)
    # Model only: the optimizer and scheduler states stay on disk.
    CheckpointManager(path.parent).load(path, chunks, None, None)
    for chunk in chunks:
        chunk.eval()
    return chunks
