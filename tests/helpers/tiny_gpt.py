"""Shared helpers for the torchrun workers: the tiny LongAlignGPTModel (sdpa backend)
whose weights do not depend on the parallel layout, wrapped the way the trainer wraps it,
a fixed batch, and TP gather/scatter by full shape.

Worker scripts import this as `tests.helpers.tiny_gpt`.

Layout independence: every parameter is drawn from a generator seeded by its global
name (layer numbers counted over all pipeline stages) at its full, unsharded shape;
each rank then keeps its tensor-parallel slice. Gradients are gathered back to full
shapes the same way, so results from any (TP, PP) layout compare key by key.

What is under test is the package's own code: the model (`build_gpt_model`), megatron
DDP as the trainer wraps it (`training.trainer.build_model`: SUM over DP and
`finalize_grads_as_sum`), and `training.loss.loss_func`. The workers compare against
references computed without any of that (plain autograd on one process).
"""

from __future__ import annotations

import argparse
import json
import re
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch

from megatron_longalign.config.model import ModelConfig
from megatron_longalign.config.parallel import ParallelConfig
from megatron_longalign.config.training import LongAlignConfig
from megatron_longalign.data.indexed import SFTSample
from megatron_longalign.model.config import to_transformer_config
from megatron_longalign.parallel.distributed import initialize_distributed
from tests.helpers.tiny_model import tiny_model_config

# megatron warns about missing TE/apex at import; the launcher also sets PYTHONWARNINGS.
warnings.filterwarnings("ignore")

VOCAB = 512
SEQ = 32


def parse_args(extra: dict[str, type] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True, help="directory for rank*.json")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    # model.loss_impl of the model under test (default: the schema's)
    parser.add_argument("--loss-impl", default=None, choices=("chunked", "standard"))
    for name, kind in (extra or {}).items():
        parser.add_argument(f"--{name}", type=kind, required=True)
    return parser.parse_args()


def setup(tp: int = 1, pp: int = 1, seed: int = 1234) -> None:
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    initialize_distributed(parallel, seed=seed, cpu=True)


# The tiny shape (2 layers, hidden 64, GQA 4:2); 512 is a multiple of 64 x TP for TP 1
# and 2, so every layout has the same padded vocabulary (and softmax).
MODEL = tiny_model_config(
    name="tiny-gpt",
    vocab_size=VOCAB,
    make_vocab_size_divisible_by=64,
    max_position_embeddings=4 * SEQ,
)


def tiny_config(**overrides):
    """megatron TransformerConfig of MODEL on this rank's (TP, PP) layout, fp32 on CPU."""
    from megatron.core import parallel_state

    fields = dict(
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
    )
    fields.update(overrides)
    return to_transformer_config(MODEL, **fields)


def build_model(config, weight_seed: int = 7):
    """The package's GPT model (MODEL) for this rank's pipeline stage, not wrapped, with
    layout-independent weights: the references (plain autograd) and checkpoint tests."""
    from megatron.core import parallel_state

    from megatron_longalign.model import build_gpt_model

    model = build_gpt_model(
        MODEL,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        transformer_config=config,
    )
    set_deterministic_weights(model, weight_seed)
    return model


def build_ddp_model(
    config,
    weight_seed: int = 7,
    *,
    model_config: ModelConfig = MODEL,
    use_distributed_optimizer: bool = False,
    sum_gradients: bool = True,
    device: torch.device | None = None,
):
    """This rank's model chunk built and wrapped by the trainer's own `build_model`
    (megatron DDP with SUM over DP, `config.no_sync_func`, `finalize_grads_as_sum`),
    with layout-independent weights. sum_gradients=False: megatron's own finalize
    instead (its default averaging, for the comparison with a 2-tuple loss)."""
    from megatron.core import parallel_state

    from megatron_longalign.training.builders import build_model as build_trainer_model

    parallel = ParallelConfig(
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        context_parallel_size=parallel_state.get_context_parallel_world_size(),
        use_distributed_optimizer=use_distributed_optimizer,
    )

    def init_weights(chunks: list[torch.nn.Module]) -> None:
        for chunk in chunks:
            set_deterministic_weights(chunk, weight_seed)

    (model,) = build_trainer_model(
        LongAlignConfig(model=model_config, parallel=parallel),
        config,
        device or torch.device("cpu"),
        init_weights=init_weights,
    )
    if not sum_gradients:
        from megatron.core.distributed import finalize_model_grads

        config.finalize_model_grads_func = finalize_model_grads
    return model


def unwrap(model) -> torch.nn.Module:
    """The GPT model inside DDP (and inside Float16Module in bf16)."""
    from megatron.core.transformer.module import Float16Module

    inner = model.module
    return inner.module if isinstance(inner, Float16Module) else inner


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


def samples_from_regions(
    specs: list[list[tuple[int, int]]], seed: int, vocab_size: int = 512
) -> list[SFTSample]:
    """One SFTSample per spec: its regions are the spec's (kind, length) pieces back to
    back; its tokens are random ids in [1, vocab_size)."""
    rng = np.random.default_rng(seed)
    result = []
    for spec in specs:
        lengths = np.array([n for _, n in spec])
        ends = np.cumsum(lengths)
        regions = np.stack([ends - lengths, ends, [k for k, _ in spec]], axis=1).astype(np.int32)
        result.append(SFTSample(rng.integers(1, vocab_size, size=int(ends[-1])), regions))
    return result
