"""Shared helpers for the torchrun workers: a tiny megatron-core GPTModel whose weights
do not depend on the parallel layout, a fixed batch, and TP gather/scatter by full shape.

Worker scripts import this as `tests.helpers.tiny_gpt`.

Layout independence: every parameter is drawn from a generator seeded by its global
name (layer numbers counted over all pipeline stages) at its full, unsharded shape;
each rank then keeps its tensor-parallel slice. Gradients are gathered back to full
shapes the same way, so results from any (TP, PP) layout compare key by key.
"""

from __future__ import annotations

import argparse
import json
import re
import warnings
import zlib
from pathlib import Path

import torch

from megatron_longalign.parallel.distributed import ParallelConfig, initialize_distributed

# megatron warns about missing TE/apex at import; the launcher also sets PYTHONWARNINGS.
warnings.filterwarnings("ignore")

VOCAB = 512
SEQ = 32
HIDDEN = 64


def parse_args(extra: dict[str, type] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True, help="directory for rank*.json")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    for name, kind in (extra or {}).items():
        parser.add_argument(f"--{name}", type=kind, required=True)
    return parser.parse_args()


def setup(tp: int = 1, pp: int = 1, seed: int = 1234) -> None:
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    initialize_distributed(parallel, seed=seed, cpu=True)


def tiny_config(num_layers: int = 2, **overrides):
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = dict(
        num_layers=num_layers,
        hidden_size=HIDDEN,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=128,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        use_cpu_initialization=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
    )
    fields.update(overrides)
    return TransformerConfig(**fields)


def build_model(config, weight_seed: int = 7):
    """GPTModel (local spec, RoPE, untied embeddings) for this rank's pipeline stage,
    with layout-independent weights."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel

    model = GPTModel(
        config,
        get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=VOCAB,
        max_sequence_length=4 * SEQ,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
    )
    set_deterministic_weights(model, weight_seed)
    return model


# ---------------------------------------------------------------- names and shards


def global_names(model) -> dict[str, str]:
    """Local parameter name -> name with the global (all-stage) layer index."""
    offsets = {}
    for name, module in model.named_modules():
        match = re.fullmatch(r"(.*decoder\.layers)\.(\d+)", name)
        if match and hasattr(module, "layer_number"):
            offsets[name + "."] = f"{match.group(1)}.{module.layer_number - 1}."
    result = {}
    for name, _ in model.named_parameters():
        result[name] = name
        for local, global_ in offsets.items():
            if name.startswith(local):
                result[name] = global_ + name[len(local) :]
    return result


def _tp():
    from megatron.core import parallel_state

    return (
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_group(),
    )


def _is_tp_sharded(param) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def full_shape(param) -> tuple[int, ...]:
    shape = list(param.shape)
    if _is_tp_sharded(param):
        shape[param.partition_dim] *= _tp()[1]
    return tuple(shape)


def shard(full: torch.Tensor, param) -> torch.Tensor:
    """This rank's slice of `full`, as megatron lays it out: the partition dim is cut
    into tp * stride pieces and rank r keeps pieces r, r + tp, ... (stride 2 is the
    SwiGLU fc1, whose local weight is [gate_r; up_r])."""
    if not _is_tp_sharded(param):
        return full
    rank, size, _ = _tp()
    stride = getattr(param, "partition_stride", 1)
    pieces = torch.chunk(full, size * stride, dim=param.partition_dim)
    return torch.cat(pieces[rank::size], dim=param.partition_dim)


def gather_full(local: torch.Tensor, param) -> torch.Tensor:
    """Inverse of `shard`: all-gather over the TP group and restore the full layout."""
    if not _is_tp_sharded(param):
        return local
    _, size, group = _tp()
    stride = getattr(param, "partition_stride", 1)
    parts = [torch.empty_like(local) for _ in range(size)]
    torch.distributed.all_gather(parts, local.contiguous(), group=group)
    per_rank = [torch.chunk(p, stride, dim=param.partition_dim) for p in parts]
    ordered = [per_rank[r][s] for s in range(stride) for r in range(size)]
    return torch.cat(ordered, dim=param.partition_dim)


def _full_value(global_name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(global_name.encode()))
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    if global_name.endswith("layernorm.weight"):
        return 1.0 + 0.1 * noise  # norms near 1, but not exactly, so their grads matter
    return 0.1 * noise


def set_deterministic_weights(model, seed: int) -> None:
    names = global_names(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(shard(_full_value(names[name], full_shape(param), seed), param))


def full_tensors(model, attr: str | None = None) -> dict[str, torch.Tensor]:
    """Global name -> full tensor of each parameter (attr=None), or of `param.<attr>`
    (e.g. 'main_grad' under megatron DDP, 'grad' without). Collective over TP."""
    names = global_names(model)
    result = {}
    for name, param in model.named_parameters():
        local = param.detach() if attr is None else getattr(param, attr)
        result[names[name]] = gather_full(local.detach().clone(), param)
    return result


# ---------------------------------------------------------------- data


def make_batches(num: int, micro_batch_size: int, seed: int = 99) -> list[dict[str, torch.Tensor]]:
    """`num` micro-batches of random tokens, next-token labels, a causal mask and a
    random loss mask (at least one target token per sequence). Sequence i of the
    flattened batch is the same whatever `micro_batch_size` is."""
    generator = torch.Generator().manual_seed(seed)
    count = num * micro_batch_size
    tokens = torch.randint(0, VOCAB, (count, SEQ + 1), generator=generator)
    loss_mask = torch.rand(count, SEQ, generator=generator) < 0.6
    loss_mask[:, -1] = True
    causal = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), diagonal=1)[None, None]
    batches = []
    for start in range(0, count, micro_batch_size):
        rows = slice(start, start + micro_batch_size)
        batches.append(
            {
                "tokens": tokens[rows, :-1].contiguous(),
                "labels": tokens[rows, 1:].contiguous(),
                "loss_mask": loss_mask[rows].float(),
                "position_ids": torch.arange(SEQ).expand(micro_batch_size, SEQ).contiguous(),
                "attention_mask": causal,  # True = masked out
            }
        )
    return batches


def run_model(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-token losses [b, s] on the last stage, hidden states elsewhere."""
    return model(
        batch["tokens"],
        batch["position_ids"],
        batch["attention_mask"],
        labels=batch["labels"],
    )


# ---------------------------------------------------------------- loss


def sequence_mean_weights(loss_mask: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """w_t = 1 / (N_i * M): each sequence's mean, averaged over the M sequences."""
    return loss_mask / loss_mask.sum(dim=-1, keepdim=True) / num_sequences


def weighted_sum_loss_func(weights: torch.Tensor, token_losses: torch.Tensor):
    """3-tuple loss_func for calculate_per_token_loss=True: sum_t w_t * loss_t, the
    number of weighted tokens, and the loss for the step report."""
    loss = (weights * token_losses).sum()
    num_tokens = (weights > 0).sum().to(torch.int)
    return loss, num_tokens, {"loss": loss.detach().clone()}


# ---------------------------------------------------------------- output


def to_jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {k: to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    return value


def write_rank_result(out_dir: Path, result: dict) -> None:
    """Each rank writes out_dir/rank<R>.json with its layout coordinates added."""
    from megatron.core import parallel_state

    result = dict(result)
    result.update(
        rank=torch.distributed.get_rank(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        last_stage=parallel_state.is_pipeline_last_stage(),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"rank{result['rank']}.json"
    path.write_text(json.dumps(to_jsonable(result)))


# ---------------------------------------------------------------- megatron plumbing


def finalize_grads_as_sum(model, num_tokens, pg_collection=None, force_all_reduce=False):
    """`config.finalize_model_grads_func` for exact sum semantics.

    With `calculate_per_token_loss=True` the schedule leaves the loss untouched and DDP
    reduces with a plain SUM (gradient_scaling_factor 1); megatron's own finalize would
    then divide by the token count. Passing num_tokens=None skips that division, so the
    applied gradient is the gradient of the sum of the returned losses over all
    micro-batches and DP (x CP) ranks.
    """
    from megatron.core.distributed import finalize_model_grads

    del num_tokens
    finalize_model_grads(
        model, None, pg_collection=pg_collection, force_all_reduce=force_all_reduce
    )


def wrap_ddp(model, config, use_distributed_optimizer: bool, sum_gradients: bool):
    """megatron DDP around `model`, wired into `config` the way the schedules expect."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    ddp_config = DistributedDataParallelConfig(
        use_distributed_optimizer=use_distributed_optimizer,
        overlap_grad_reduce=False,
        grad_reduce_in_fp32=True,
    )
    ddp = DistributedDataParallel(config, ddp_config, model)
    config.no_sync_func = ddp.no_sync
    config.finalize_model_grads_func = (
        finalize_grads_as_sum if sum_gradients else finalize_model_grads
    )
    return ddp
