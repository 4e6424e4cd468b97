"""Model hyperparameters (Hydra group `model`, conf/model/*.yaml) for the Llama-2/3,
Mistral and Qwen2/2.5 families: pre-norm decoder, RMSNorm, SwiGLU MLP, RoPE, GQA, no
linear biases except Qwen's QKV bias. Field names follow the Hugging Face config.json
names where one exists, so the YAMLs can be checked against a published config.

The schema only: `megatron_longalign/model/config.py` has the rules a model must satisfy
(`model_problems`) and the conversion to megatron-core's `TransformerConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass

# The attention kernels (megatron_longalign/model/backends.py); auto picks one.
ATTENTION_BACKENDS = ("auto", "te", "flash", "flex", "sdpa")
# How the training loss leaves the last hidden states (model/fused_loss.py).
LOSS_IMPLS = ("chunked", "standard")


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
    # Output layer + cross entropy in training: chunked (fused, vocabulary-parallel: the
    # logits of the micro-batch are never held; model/fused_loss.py) | standard
    # (megatron's output layer, then its vocab-parallel cross entropy on the full logits).
    loss_impl: str = "chunked"
    # Tokens per chunk of the chunked loss; null: auto (fp32 chunk logits of about 256 MiB
    # per TP rank, at least 2048 tokens on a GPU, where each chunk's fp32 weight-gradient
    # accumulation costs ~275/c of its GEMM time on an H200: at TP 1, 2048 tokens on a GPU
    # for a 32k or 128k vocabulary; on the CPU 2048 for 32k, 512 for 128k).
    loss_chunk_tokens: int | None = None
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
