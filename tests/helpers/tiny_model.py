"""The tiny Llama-style model shape the tests share (conf/model/tiny.yaml's layers:
2 layers, hidden 64, SwiGLU ffn 128, GQA 4:2, head dim 16), as a ModelConfig.

pytest modules and torchrun workers (the repository root is on their PYTHONPATH, see
tests/helpers/launch.py `worker_env`) import it as `tests.helpers.tiny_model`.
"""

from __future__ import annotations

from megatron_longalign.config.model import ModelConfig


def tiny_model_config(*, vocab_size: int, **overrides) -> ModelConfig:
    """The tiny shape with `vocab_size` (each test picks its own; it sets the padded
    vocabulary and so the softmax) and any other ModelConfig field in `overrides`.
    Defaults beyond the shape: name "tiny", 4096 positions, the sdpa backend (CPU)."""
    fields = dict(
        name="tiny",
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=vocab_size,
        max_position_embeddings=4096,
        attention_backend="sdpa",
    )
    fields.update(overrides)
    return ModelConfig(**fields)
