"""Model hyperparameters (Hydra group `model`, conf/model/*.yaml) for the Llama-2/3,
Mistral and Qwen2/2.5 families: pre-norm decoder, RMSNorm, SwiGLU MLP, RoPE, GQA, no
linear biases except Qwen's QKV bias. Field names follow the Hugging Face config.json
names where one exists, so the YAMLs can be checked against a published config.

`to_transformer_config()` is the one place these become megatron-core's
`TransformerConfig`; parallelism and precision come in as overrides from the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from megatron_longalign.model.backends import ATTENTION_BACKENDS


@dataclass
class RopeScalingConfig:
    """Llama-3.1 style RoPE frequency scaling (HF `rope_scaling` with rope_type "llama3").
    Wavelengths above original_max_position_embeddings / low_freq_factor are divided by
    `factor`, those below original / high_freq_factor are kept, and the band between is
    interpolated smoothly (see `gpt.llama3_scaled_inv_freq`)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass
class ModelConfig:
    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 128
    num_attention_heads: int = 4
    # KV heads (GQA). None = as many as attention heads (MHA, e.g. Llama-2-7B).
    num_query_groups: int | None = None
    vocab_size: int = 2048
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: RopeScalingConfig | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2/2.5
    norm_epsilon: float = 1e-5
    # Head dimension; None = hidden_size / num_attention_heads (true for all four families).
    kv_channels: int | None = None
    init_method_std: float = 0.02
    # megatron pads the embedding/output vocab to a multiple of this x TP (extra rows are
    # never labels). 128 keeps all four families' published vocab sizes unpadded at TP=1.
    make_vocab_size_divisible_by: int = 128
    attention_backend: str = "auto"  # auto | te | flash | flex | sdpa
    name: str = "custom"  # for logs only

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tensor_parallel_size: int = 1) -> int:
        multiple = self.make_vocab_size_divisible_by * tensor_parallel_size
        return -(-self.vocab_size // multiple) * multiple

    def validate(self, tensor_parallel_size: int = 1) -> None:
        """Raise ValueError naming the field to change if the model cannot be built."""
        _check_positive(self)
        _check_heads(self, tensor_parallel_size)
        _check_rope(self)
        if self.attention_backend not in ATTENTION_BACKENDS:
            _fail(
                f"attention_backend={self.attention_backend!r}; choose one of {ATTENTION_BACKENDS}"
            )

    def to_transformer_config(self, **overrides: Any):
        """megatron-core TransformerConfig for this model. `overrides` are any other
        TransformerConfig fields (tensor_model_parallel_size, sequence_parallel, bf16,
        params_dtype, recompute_*, ...). RoPE fusion stays off: the fused TE kernels
        derive positions from cu_seqlens and would ignore our explicit position ids."""
        from megatron.core.transformer.transformer_config import TransformerConfig

        self.validate(overrides.get("tensor_model_parallel_size", 1))
        if overrides.get("apply_rope_fusion"):
            _fail(
                "apply_rope_fusion=True is not supported: RoPE must come from position_ids "
                "(the fused kernels restart positions per document)"
            )
        fields = dict(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            ffn_hidden_size=self.ffn_hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.query_groups,
            kv_channels=self.head_dim,
            normalization="RMSNorm",
            layernorm_epsilon=self.norm_epsilon,
            gated_linear_unit=True,  # SwiGLU: silu(x W_gate) * (x W_up)
            activation_func=torch.nn.functional.silu,
            add_bias_linear=False,
            add_qkv_bias=self.qkv_bias,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            init_method_std=self.init_method_std,
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


def _fail(message: str) -> None:
    raise ValueError(f"model config: {message}")


def _check_positive(cfg: ModelConfig) -> None:
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
            _fail(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.num_query_groups is not None and cfg.num_query_groups < 1:
        _fail(f"num_query_groups must be >= 1 (or null for MHA), got {cfg.num_query_groups}")
    if cfg.norm_epsilon <= 0 or cfg.rope_theta <= 0 or cfg.init_method_std <= 0:
        _fail("norm_epsilon, rope_theta and init_method_std must be > 0")


def _check_heads(cfg: ModelConfig, tp: int) -> None:
    heads, groups = cfg.num_attention_heads, cfg.query_groups
    if cfg.kv_channels is None and cfg.hidden_size % heads:
        _fail(
            f"hidden_size ({cfg.hidden_size}) must be divisible by num_attention_heads "
            f"({heads}), or set kv_channels"
        )
    if cfg.head_dim % 2:
        _fail(f"head dimension {cfg.head_dim} must be even for RoPE")
    if heads % groups:
        _fail(
            f"num_attention_heads ({heads}) must be divisible by num_query_groups ({groups}): "
            "each KV head serves a whole group of query heads"
        )
    if tp < 1:
        _fail(f"tensor_parallel_size must be >= 1, got {tp}")
    for name, value in (
        ("num_attention_heads", heads),
        ("num_query_groups (KV heads)", groups),
        ("ffn_hidden_size", cfg.ffn_hidden_size),
    ):
        if value % tp:
            _fail(
                f"tensor parallel size {tp} must divide {name} ({value}); choose a TP size "
                f"that divides it"
            )


def _check_rope(cfg: ModelConfig) -> None:
    scaling = cfg.rope_scaling
    if scaling is None:
        return
    if scaling.factor < 1:
        _fail(f"rope_scaling.factor must be >= 1, got {scaling.factor}")
    if not 0 < scaling.low_freq_factor < scaling.high_freq_factor:
        _fail(
            "rope_scaling needs 0 < low_freq_factor < high_freq_factor, got "
            f"{scaling.low_freq_factor} and {scaling.high_freq_factor}"
        )
    if scaling.original_max_position_embeddings < 1:
        _fail("rope_scaling.original_max_position_embeddings must be >= 1")
