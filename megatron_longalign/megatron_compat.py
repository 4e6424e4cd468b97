"""Every workaround that depends on megatron-core internals, in one file.

Written against megatron-core 0.16.1 (setup.py pins >=0.16,<0.17). An upgrade of
megatron-core has this one file to audit: each section names what it relies on and why.
docs/MEGATRON_CORE.md summarises them and what a newer release would take.

Sections:
1. Optimizer checkpoints over torch's Adam (`prime_empty_torch_adam`,
   `load_optimizer_state_dict`): DistributedOptimizer bugs around Adam's 'step'.
2. Synchronous torch_dist saves (`SyncTorchDistSaveStrategy`): megatron's async writer
   hangs without psutil and forks processes next to gloo threads.
3. Llama-3 RoPE scaling (`llama3_scale_inv_freq`): `RotaryEmbedding._apply_scaling`
   called unbound, with all four parameters.
4. `GPTModel._preprocess`'s output tuple (`preprocess_rotary_pos_emb`,
   `with_preprocess_rotary_pos_emb`): which element is the rotary embedding.
5. Per-micro-batch cache on `PackedSeqParams` (`cache_on_packed_seq_params`).
6. Optimizer step (`clip_and_step`): `ChainedOptimizer.step` split open around the
   finiteness check, with `is_stub_optimizer` and
   `use_precision_aware_optimizer_no_fp8_or_ds_fp8`.

7. `GPTModel._postprocess` is called by `GPTModel.forward` with keyword arguments
   (`hidden_states`, `labels`, `inference_context`, `mtp_in_postprocess`, ...):
   model/gpt.py overrides it by those names to route the training loss through the
   chunked fused cross entropy. Upgrade check: the call in `GPTModel.forward`.

Layer 0: imports torch and megatron.core, nothing from megatron_longalign but utils.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from megatron.core.packed_seq_params import PackedSeqParams
from torch import Tensor
from torch.distributed.checkpoint import FileSystemWriter

__all__ = [
    "OptimizerStateError",
    "SyncTorchDistSaveStrategy",
    "cache_on_packed_seq_params",
    "clip_and_step",
    "is_dist_torch_adam",
    "llama3_scale_inv_freq",
    "load_optimizer_state_dict",
    "optimizer_parts",
    "preprocess_rotary_pos_emb",
    "prime_empty_torch_adam",
    "with_preprocess_rotary_pos_emb",
]


# ---------------------------------------------------------------------------------------
# 1. Optimizer checkpoints over torch's Adam (megatron-core 0.16.1)
# ---------------------------------------------------------------------------------------
# megatron's DistributedOptimizer falls back to torch's Adam/AdamW without TE/apex (CPU
# runs). Its checkpoint path for that optimizer, in 0.16.1:
# - `DistributedOptimizer.state_dict()`, which `sharded_state_dict(is_loading=True)`
#   calls, asserts that torch's Adam already has per-parameter state with a 'step': a
#   fresh optimizer has none, so a resume fails before reading anything
#   (`prime_empty_torch_adam`);
# - `DistributedOptimizer.load_state_dict` mishandles the per-parameter 'step'
#   (`_load_dist_torch_adam`).
# TE/apex FusedAdam (GPU) keeps the step in param_groups and goes through megatron as is.
# Upgrade check: run tests/training/test_checkpoint_*.py (exact resume on CPU, both formats); if it
# passes with plain `optimizer.load_state_dict`, delete this section.


class OptimizerStateError(RuntimeError):
    """An optimizer state that the torch-Adam load cannot apply (the caller reports it as
    a checkpoint error)."""


def optimizer_parts(optimizer) -> list:
    """The megatron optimizers a (possibly chained) optimizer is made of
    (megatron-core 0.16.1's `ChainedOptimizer.chained_optimizers`)."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def is_dist_torch_adam(part) -> bool:
    """A megatron DistributedOptimizer over torch's Adam/AdamW: megatron's fallback
    without TE/apex (CPU runs). Its checkpoint path needs the fixes below; TE/apex
    FusedAdam (GPU) keeps the step in param_groups and goes through megatron as is."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inner = getattr(part, "optimizer", None)
    return isinstance(part, DistributedOptimizer) and isinstance(inner, torch.optim.Adam)


def prime_empty_torch_adam(optimizer) -> None:
    """Give a fresh distributed optimizer over torch's Adam zero state.

    megatron-core 0.16.1's `DistributedOptimizer.state_dict()`, which its
    `sharded_state_dict(is_loading=True)` calls, asserts that torch's Adam already has
    per-parameter state with a 'step'. A fresh optimizer has none, so a resume would
    fail before reading anything. The load overwrites every value set here.
    """
    for part in filter(is_dist_torch_adam, optimizer_parts(optimizer)):
        inner = part.optimizer
        if inner.state:
            continue
        for group in inner.param_groups:
            for param in group["params"]:
                inner.state[param].update(
                    exp_avg=torch.zeros_like(param),
                    exp_avg_sq=torch.zeros_like(param),
                    step=torch.tensor(0.0),
                )


def load_optimizer_state_dict(optimizer, state) -> None:
    """`optimizer.load_state_dict(state)` for a state built by `sharded_state_dict`
    (megatron's API), with the torch-Adam fixes of `_load_dist_torch_adam`. Raises
    OptimizerStateError for a state it cannot apply."""
    parts = optimizer_parts(optimizer)
    # With fp32 params the distributed optimizer's main params are views of the
    # model's leaf parameters; megatron copies into them in place.
    with torch.no_grad():
        if not any(is_dist_torch_adam(part) for part in parts):
            optimizer.load_state_dict(state)
            return
        # ChainedOptimizer.load_state_dict's own split (megatron-core 0.16.1): one state
        # per part.
        if len(parts) == 1:
            part_states = [state]
        elif isinstance(state, dict):
            part_states = [v for _, v in sorted(state.items())]
        else:
            part_states = list(state)
        for part, part_state in zip(parts, part_states, strict=True):
            if is_dist_torch_adam(part):
                _load_dist_torch_adam(part, part_state)
            else:
                part.load_state_dict(part_state)


# DistributedOptimizer's parameter-state loaders in megatron-core 0.16.1, by
# `param_state_sharding_type`.
_PARAM_STATE_LOADERS = {
    "dp_reshardable": "load_parameter_state_from_dp_reshardable",
    "fully_reshardable": "load_parameter_state_from_fully_reshardable",
}


def _load_dist_torch_adam(part, state: dict) -> None:
    """`DistributedOptimizer.load_state_dict` for torch's Adam, step by step.

    megatron-core 0.16.1 mishandles torch Adam's per-parameter 'step' here:
    - after setting it from the checkpoint, the parameter-state load copies every key
      of the live state from the loaded tensors: "fully_reshardable" has no 'step'
      there (KeyError), and "dp_reshardable" holds the pre-load step (it would undo
      the restore);
    - it puts one and the same step tensor into every parameter's state, which torch's
      Adam then increments once per parameter.
    So: load the common part (param groups, which carry the checkpoint's step), take
    'step' out of the live state, load the parameter state, and give every parameter
    its own tensor with the checkpoint's step.
    """
    state = dict(state)
    param_state = state.pop("param_state")
    sharding_type = state.pop("param_state_sharding_type")
    if sharding_type not in _PARAM_STATE_LOADERS:
        raise OptimizerStateError(f"optimizer state format {sharding_type!r} is not supported")
    part.load_state_dict(state)  # no param_state: groups, step, state allocation only
    inner = part.optimizer
    for param_state_of_one in inner.state.values():
        param_state_of_one.pop("step", None)
    getattr(part, _PARAM_STATE_LOADERS[sharding_type])(param_state)
    for group in inner.param_groups:
        step = group.pop("step", None)  # megatron's load leaves the checkpoint's step here
        if step is None and group["params"]:
            raise OptimizerStateError("the loaded optimizer param group has no Adam 'step'")
        for param in group["params"]:
            inner.state[param]["step"] = torch.tensor(float(step))


# ---------------------------------------------------------------------------------------
# 2. Synchronous torch_dist saves (megatron-core 0.16.1)
# ---------------------------------------------------------------------------------------
# Why not `dist_checkpointing.save` with its default strategy: in 0.16.1 the default
# torch_dist strategy writes through `FileSystemWriterAsync`, even for a synchronous
# save. It starts a `multiprocessing.Manager` (a spawned process) and forks one writer
# process per file bucket. Each writer calls `_process_memory()` before its try block,
# and that raises when psutil is missing (megatron-core does not depend on it). The
# writer then dies without marking its queue task done, and the parent waits in
# `JoinableQueue.join()` forever: the "hang on CPU". Forking a process that runs gloo
# threads is fragile in any case.
#
# `SyncTorchDistSaveStrategy` keeps megatron's translation to PyTorch distributed
# checkpoint (DCP) objects (`_replace_state_dict_keys_with_sharded_keys`, a private
# function, and `mcore_to_pyt_state_dict`) and megatron's save planner. It writes with
# PyTorch's own synchronous `FileSystemWriter`, in the calling process, with no extra
# processes. The result is the same torch_dist checkpoint: `metadata.json` (backend
# torch_dist, version 1), `common.pt`, DCP `.metadata` and `__<rank>_<i>.distcp` files.
# Megatron's default load strategy reads it on GPU or CPU, and it reshards to any TP/PP
# layout. Upgrade check: the private names still exist with the same signatures
# (tests/parallel/test_checkpoint_io.py).

_BACKEND = "torch_dist"
_VERSION = 1


class SyncTorchDistSaveStrategy(TorchDistSaveShardedStrategy):
    """torch_dist save, written synchronously by PyTorch's FileSystemWriter."""

    def __init__(self, thread_count: int = 2) -> None:
        super().__init__(_BACKEND, _VERSION, keep_only_main_replica=True, thread_count=thread_count)

    def save(self, sharded_state_dict, checkpoint_dir) -> None:
        # Same translation as the parent's async_save: key each tensor by its global
        # sharded key and keep only main replicas, so the files match the async writer's.
        sharded_state_dict, _, _ = _replace_state_dict_keys_with_sharded_keys(
            sharded_state_dict, self.keep_only_main_replica
        )
        pyt_state_dict = mcore_to_pyt_state_dict(sharded_state_dict, False)
        torch.distributed.checkpoint.save(
            pyt_state_dict,
            storage_writer=FileSystemWriter(
                str(checkpoint_dir), thread_count=self.thread_count, sync_files=True
            ),
            planner=MCoreSavePlanner(
                dedup_replicated_tensors=not self.keep_only_main_replica,
                flatten_state_dict=False,
            ),
        )


# ---------------------------------------------------------------------------------------
# 3. Llama-3 RoPE scaling (megatron-core 0.16.1)
# ---------------------------------------------------------------------------------------
# megatron's GPTModel exposes only `rope_scaling_factor` (low/high frequency factors and
# the original context fixed at 1, 4, 8192). `RotaryEmbedding._apply_scaling` takes all
# four but is a private method; it does not use `self`, so we call it unbound with None.
# Upgrade check: the method's name, its keyword names, and that it ignores `self`
# (tests/model/test_gpt.py checks it against Meta's published formula).


def llama3_scale_inv_freq(
    inv_freq: Tensor,
    *,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_position_embeddings: int,
) -> Tensor:
    """megatron-core's Llama-3.1 scaling of RoPE inverse frequencies
    (`RotaryEmbedding._apply_scaling`, 0.16.1), with all four parameters."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    return RotaryEmbedding._apply_scaling(
        None,  # the method does not use self
        inv_freq,
        factor=factor,
        low_freq_factor=low_freq_factor,
        high_freq_factor=high_freq_factor,
        original_max_position_embeddings=original_max_position_embeddings,
    )


# ---------------------------------------------------------------------------------------
# 4. GPTModel._preprocess's output (megatron-core 0.16.1)
# ---------------------------------------------------------------------------------------
# `GPTModel._preprocess` (a private method) returns the tuple (decoder_input,
# rotary_pos_emb, rotary_pos_cos, rotary_pos_sin, sequence_len_offset, padding_mask[,
# rotary_pos_cos_sin]), and `GPTModel.forward` unpacks it by position. model/gpt.py
# overrides `_preprocess` to replace the rotary embedding (RoPE from position ids), so
# it must know which element that is. Upgrade check: the tuple's order in
# `_preprocess` and in `forward` (tests/model/test_gpt.py: explicit positions reach RoPE).

_PREPROCESS_ROTARY_POS_EMB = 1


def preprocess_rotary_pos_emb(output: tuple) -> Tensor | None:
    """The rotary embedding in `GPTModel._preprocess`'s output (None when the model
    has no rotary embedding, or megatron skipped it)."""
    return output[_PREPROCESS_ROTARY_POS_EMB]


def with_preprocess_rotary_pos_emb(output: tuple, rotary_pos_emb: Tensor) -> tuple:
    """`GPTModel._preprocess`'s output with the rotary embedding replaced."""
    i = _PREPROCESS_ROTARY_POS_EMB
    return (*output[:i], rotary_pos_emb, *output[i + 1 :])


# ---------------------------------------------------------------------------------------
# 5. Per-micro-batch cache on PackedSeqParams (megatron-core 0.16.1)
# ---------------------------------------------------------------------------------------
# megatron hands every layer's core attention the same `PackedSeqParams` object for one
# micro-batch, and in 0.16.1 it is a plain (not slotted, not frozen) dataclass. The
# attention backends of model/attention.py memoise per-micro-batch data (host copies of
# the boundaries, flex block masks, the CP view) in its instance `__dict__`, under names
# megatron does not use, so they are built once per micro-batch, not once per layer.
# Upgrade check: PackedSeqParams still has a `__dict__` and megatron does not copy it
# between layers (a copy would only cost speed: every layer would build its own).


def cache_on_packed_seq_params(packed: PackedSeqParams, key: str, build: Callable[[], Any]) -> Any:
    """Memoise per-micro-batch data on the PackedSeqParams object itself: every layer
    gets the same object, so host syncs and block masks happen once, not per layer."""
    name = f"_longalign_{key}"
    value = packed.__dict__.get(name)
    if value is None:
        value = build()
        packed.__dict__[name] = value
    return value


# ---------------------------------------------------------------------------------------
# 6. Optimizer step (megatron-core 0.16.1)
# ---------------------------------------------------------------------------------------
# The optimizer half of `ChainedOptimizer.step()` split around the finiteness check
# (`prepare_grads`, `get_grad_norm`, the clip loop over `chained_optimizers` with
# `is_stub_optimizer` and `config.use_precision_aware_optimizer_no_fp8_or_ds_fp8`,
# `step_with_ready_grads`), used by training/step.py. The trainer needs the gradient norm
# before anything is applied, to skip a non-finite step without touching the weights;
# `ChainedOptimizer.step()` clips and steps in one call.
# Upgrade check: megatron-core 0.19 adds per-group gradient norms and a skip threshold to
# `step()`: compare this function with `ChainedOptimizer.step` line by line.


def clip_and_step(optimizer: Any, clip: float, loss_is_finite: bool) -> tuple[bool, float]:
    """megatron-core 0.16.1's `ChainedOptimizer.step()` split open, so that nothing is
    applied when the step is bad: `prepare_grads()`, `get_grad_norm()`, then, only if the
    loss, the gradient norm and fp16's found_inf are all fine, clip every part's gradients
    by the total norm (`clip` > 0) and `step_with_ready_grads()`. Returns (stepped,
    gradient norm before clipping). Uses megatron internals (`is_stub_optimizer`,
    `use_precision_aware_optimizer_no_fp8_or_ds_fp8`)."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    found_inf = optimizer.prepare_grads()  # only fp16 loss scaling sets it
    grad_norm = float(optimizer.get_grad_norm())
    if found_inf or not loss_is_finite or not math.isfinite(grad_norm):
        return False, grad_norm
    if clip > 0:
        for inner in optimizer_parts(optimizer):
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
    return True, grad_norm
