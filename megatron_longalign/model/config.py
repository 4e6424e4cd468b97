"""What a `ModelConfig` (megatron_longalign/config/model.py) must satisfy to be built
(`model_problems`, which the start-up validator, the converter and the layout planner
call), and `to_transformer_config()`: the one place it becomes megatron-core's
`TransformerConfig`; parallelism and precision come in as overrides from the trainer.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_longalign.config.errors import raise_if_problems
from megatron_longalign.config.model import ATTENTION_BACKENDS, LOSS_IMPLS, ModelConfig


def model_problems(
    model: ModelConfig, tensor_parallel_size: int = 1, *, prefix: str = ""
) -> list[str]:
    """Why `model` cannot be built at tensor parallel size `tensor_parallel_size` (empty
    when it can), each naming the field to change; `prefix` goes before the model's field
    names (the start-up validator passes "model.")."""
    problems = _positive_problems(model, prefix)
    if problems:
        return problems  # the head checks below would divide by them
    problems += _head_problems(model, tensor_parallel_size, prefix)
    problems += _rope_problems(model, prefix)
    if model.attention_backend not in ATTENTION_BACKENDS:
        problems.append(
            f"{prefix}attention_backend={model.attention_backend!r}; choose one of "
            f"{ATTENTION_BACKENDS}"
        )
    if model.loss_impl not in LOSS_IMPLS:
        problems.append(f"{prefix}loss_impl={model.loss_impl!r}; choose one of {LOSS_IMPLS}")
    if model.loss_chunk_tokens is not None and model.loss_chunk_tokens < 1:
        problems.append(
            f"{prefix}loss_chunk_tokens must be >= 1 or null (auto), got {model.loss_chunk_tokens}"
        )
    return problems


def to_transformer_config(model: ModelConfig, **overrides: Any):
    """megatron-core TransformerConfig for `model`. `overrides` are any other
    TransformerConfig fields (tensor_model_parallel_size, sequence_parallel, bf16,
    params_dtype, recompute_*, ...). RoPE fusion stays off: the fused TE kernels
    derive positions from cu_seqlens and would ignore our explicit position ids."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    problems = model_problems(model, overrides.get("tensor_model_parallel_size", 1))
    if overrides.get("apply_rope_fusion"):
        problems.append(
            "apply_rope_fusion=True is not supported: RoPE must come from position_ids "
            "(the fused kernels restart positions per document)"
        )
    raise_if_problems(problems)
    fields = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.query_groups,
        kv_channels=model.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,  # SwiGLU: silu(x W_gate) * (x W_up)
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=model.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        rotary_interleaved=False,  # HF/Meta half-split layout
        apply_rope_fusion=False,
        # Fusions that need TE/apex kernels or bias terms we do not have.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
    )
    fields.update(overrides)
    return TransformerConfig(**fields)


def _positive_problems(cfg: ModelConfig, prefix: str) -> list[str]:
    problems = []
    for name in (
        "num_layers",
        "hidden_size",
        "ffn_hidden_size",
        "num_attention_heads",
        "vocab_size",
        "max_position_embeddings",
        "make_vocab_size_divisible_by",
    ):
        if getattr(cfg, name) < 1:
            problems.append(f"{prefix}{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.num_query_groups is not None and cfg.num_query_groups < 1:
        problems.append(
            f"{prefix}num_query_groups must be >= 1 (or null for MHA), got {cfg.num_query_groups}"
        )
    if cfg.norm_epsilon <= 0 or cfg.rope_theta <= 0 or cfg.init_method_std <= 0:
        problems.append(
            f"{prefix}norm_epsilon, {prefix}rope_theta and {prefix}init_method_std must be > 0"
        )
    return problems


def _head_problems(cfg: ModelConfig, tp: int, prefix: str) -> list[str]:
    heads, groups = cfg.num_attention_heads, cfg.query_groups
    problems = []
    if cfg.kv_channels is None and cfg.hidden_size % heads:
        problems.append(
            f"{prefix}hidden_size ({cfg.hidden_size}) must be divisible by "
            f"{prefix}num_attention_heads ({heads}), or set {prefix}kv_channels"
        )
    if cfg.head_dim % 2:
        problems.append(f"head dimension {cfg.head_dim} must be even for RoPE")
    if heads % groups:
        problems.append(
            f"{prefix}num_attention_heads ({heads}) must be divisible by "
            f"{prefix}num_query_groups ({groups}): each KV head serves a whole group of "
            "query heads"
        )
    if tp < 1:
        return problems + [f"tensor_parallel_size must be >= 1, got {tp}"]
    for name, value in (
        ("num_attention_heads", heads),
        ("num_query_groups (KV heads)", groups),
        ("ffn_hidden_size", cfg.ffn_hidden_size),
    ):
        if value % tp:
            problems.append(
                f"parallel.tensor_model_parallel_size ({tp}) must divide {prefix}{name} "
                f"({value}): each TP rank holds an equal share; choose a TP size that "
                f"divides it (tensor parallel size {tp} does not)"
            )
    return problems


def _rope_problems(cfg: ModelConfig, prefix: str) -> list[str]:
    scaling = cfg.rope_scaling
    if scaling is None:
        return []
    problems = []
    if scaling.factor < 1:
        problems.append(f"{prefix}rope_scaling.factor must be >= 1, got {scaling.factor}")
    if not 0 < scaling.low_freq_factor < scaling.high_freq_factor:
        problems.append(
            f"{prefix}rope_scaling needs 0 < low_freq_factor < high_freq_factor, got "
            f"{scaling.low_freq_factor} and {scaling.high_freq_factor}"
        )
    if scaling.original_max_position_embeddings < 1:
        problems.append(f"{prefix}rope_scaling.original_max_position_embeddings must be >= 1")
    return problems
