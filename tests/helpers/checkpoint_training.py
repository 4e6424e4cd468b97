"""Helpers for the checkpoint workers: the tiny GPT of tests/helpers/tiny_gpt.py trained
with megatron DDP, the distributed optimizer (Adam) and megatron's LR scheduler.

Worker scripts import this as `tests.helpers.checkpoint_training`.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from megatron_longalign.training.loss import loss_func
from tests.helpers.tiny_gpt import (
    SEQ,
    build_ddp_model,
    full_tensors,
    make_batches,
    run_model,
    sequence_mean_weights,
    setup,
    tiny_config,
    write_rank_result,
)

GLOBAL_BATCH = 4

__all__ = [
    "GLOBAL_BATCH",
    "build_training",
    "full_tensors",
    "random_draws",
    "seed_host_rngs",
    "setup",
    "train_step",
    "write_rank_result",
]


def build_training(weight_seed: int = 7, lr: float = 1e-2):
    """[DDP(GPTModel)], distributed Adam and a warmup + cosine scheduler (so the LR
    differs every step and a lost scheduler state shows in the losses)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    config = tiny_config(calculate_per_token_loss=True)
    model = build_ddp_model(config, weight_seed, use_distributed_optimizer=True)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=lr,
            min_lr=1e-3,
            weight_decay=0.0,
            use_distributed_optimizer=True,
            bf16=False,
            fp16=False,
            params_dtype=torch.float32,
            clip_grad=1e9,
        ),
        [model],
    )
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=lr,
        min_lr=1e-3,
        lr_warmup_steps=2,
        lr_decay_steps=10,
        lr_decay_style="cosine",
        start_wd=0.0,
        end_wd=0.0,
        wd_incr_steps=10,
        wd_incr_style="constant",
    )
    return [model], optimizer, scheduler


def _local_batches(step: int) -> list[dict[str, torch.Tensor]]:
    """This DP rank's micro-batches (size 1) of global batch `step`: new data each step."""
    from megatron.core import parallel_state

    dp_rank = parallel_state.get_data_parallel_rank()
    per_rank = GLOBAL_BATCH // parallel_state.get_data_parallel_world_size()
    batches = make_batches(GLOBAL_BATCH, 1, seed=1000 + step)
    return batches[dp_rank * per_rank : (dp_rank + 1) * per_rank]


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = run_model(model, batch)
    weights = sequence_mean_weights(batch["loss_mask"], GLOBAL_BATCH)  # mean of sequence means
    return output, lambda token_losses: loss_func(weights, token_losses)


def train_step(model: list, optimizer, scheduler, step: int) -> float:
    """One optimizer step on global batch `step`; returns the global-batch loss."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batches = _local_batches(step)
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    reports = get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=iter(batches),
        model=model,
        num_microbatches=len(batches),
        seq_length=SEQ,
        micro_batch_size=1,
    )
    success, _, _ = optimizer.step()
    assert success, "optimizer step skipped"
    scheduler.step(increment=1)
    total = torch.stack([r["loss"] for r in reports]).sum()
    torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group())
    return total.item()


def seed_host_rngs(seed: int) -> None:
    """Seed python, numpy and torch differently on every rank (as per-rank data
    workers would), so a checkpoint must keep each rank's own RNG state."""
    rank_seed = seed + 1000 * torch.distributed.get_rank()
    random.seed(rank_seed)
    np.random.seed(rank_seed)
    torch.manual_seed(rank_seed)


def random_draws() -> dict[str, list[float]]:
    """A few draws from every RNG a checkpoint restores (advances them)."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    with get_cuda_rng_tracker().fork():
        tracker = torch.rand(3).tolist()
    return {
        "python": [random.random() for _ in range(3)],
        "numpy": np.random.rand(3).tolist(),
        "torch": torch.rand(3).tolist(),
        "tracker": tracker,
    }
