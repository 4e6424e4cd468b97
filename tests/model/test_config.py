"""conf/model/*.yaml -> ModelConfig -> megatron TransformerConfig, and validation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from megatron_longalign.config.errors import raise_if_problems
from megatron_longalign.config.model import ModelConfig, RopeScalingConfig
from megatron_longalign.model.config import model_problems, to_transformer_config

CONF = Path(__file__).resolve().parents[2] / "conf" / "model"
YAMLS = sorted(CONF.glob("*.yaml"))


def load(path: Path) -> ModelConfig:
    """As Hydra does for a structured config group: schema merged with the YAML (unknown
    keys and wrong types are errors)."""
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path))
    return OmegaConf.to_object(merged)


def test_all_five_model_configs_exist():
    assert {p.stem for p in YAMLS} == {
        "tiny",
        "llama2_7b",
        "llama3_8b",
        "mistral_7b",
        "qwen2_5_7b",
    }


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.stem)
def test_yaml_loads_validates_and_converts(path):
    config = load(path)
    assert config.name == path.stem
    raise_if_problems(model_problems(config))
    transformer = to_transformer_config(config)
    assert transformer.num_layers == config.num_layers
    assert transformer.num_query_groups == config.query_groups
    assert transformer.kv_channels == config.head_dim
    assert transformer.normalization == "RMSNorm"
    assert transformer.gated_linear_unit and transformer.activation_func is torch.nn.functional.silu
    assert not transformer.add_bias_linear
    assert transformer.add_qkv_bias == config.qkv_bias
    assert transformer.layernorm_epsilon == config.norm_epsilon
    assert transformer.hidden_dropout == 0 and transformer.attention_dropout == 0
    assert not transformer.apply_rope_fusion


def test_published_family_facts():
    """Spot checks against the public config.json files."""
    llama2, llama3 = load(CONF / "llama2_7b.yaml"), load(CONF / "llama3_8b.yaml")
    mistral, qwen = load(CONF / "mistral_7b.yaml"), load(CONF / "qwen2_5_7b.yaml")
    for big in (llama2, llama3, mistral, qwen):
        assert big.head_dim == 128 and not big.tie_word_embeddings
        assert big.padded_vocab_size() == big.vocab_size  # no padding rows at TP 1
    assert llama2.query_groups == 32 and llama2.rope_theta == 10000
    assert llama3.query_groups == 8 and llama3.vocab_size == 128256
    assert llama3.rope_scaling == RopeScalingConfig(8.0, 1.0, 4.0, 8192)
    assert mistral.rope_theta == 1e6 and mistral.rope_scaling is None
    assert qwen.qkv_bias and qwen.query_groups == 4 and qwen.norm_epsilon == 1e-6
    tiny = load(CONF / "tiny.yaml")
    assert (tiny.hidden_size, tiny.num_layers, tiny.num_attention_heads) == (64, 2, 4)
    assert (tiny.query_groups, tiny.vocab_size, tiny.ffn_hidden_size) == (2, 2048, 128)


def test_tiny_yaml_builds_and_runs_forward_and_backward():
    from megatron_longalign.model.attention import packed_seq_params_from
    from megatron_longalign.model.gpt import build_gpt_model

    config = load(CONF / "tiny.yaml")
    model = build_gpt_model(
        config, transformer_config=to_transformer_config(config, use_cpu_initialization=True)
    )
    assert model.attention_backend == "sdpa"  # auto, on a machine without CUDA
    lengths = [3, 1, 5]
    tokens = torch.randint(0, config.vocab_size, (1, sum(lengths)))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0, 3, 4, 9], dtype=torch.int32)
    loss = model(tokens, positions, labels=tokens, packed_seq_params=packed_seq_params_from(cu, 5))
    assert loss.shape == (1, 9) and torch.isfinite(loss).all()
    loss.sum().backward()
    assert model.embedding.word_embeddings.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "changes,tp,message",
    [
        (dict(num_attention_heads=4, num_query_groups=3), 1, "divisible by num_query_groups"),
        (
            dict(num_attention_heads=6, hidden_size=60, num_query_groups=2),
            4,
            "must divide num_attention_heads",
        ),
        (dict(num_attention_heads=8, num_query_groups=2), 4, "must divide num_query_groups"),
        (dict(ffn_hidden_size=130), 4, "must divide ffn_hidden_size"),
        (dict(hidden_size=66), 1, "hidden_size .66. must be divisible by num_attention_heads"),
        (dict(kv_channels=15), 1, "must be even"),
        (dict(attention_backend="cudnn"), 1, "attention_backend"),
        (dict(num_layers=0), 1, "num_layers must be >= 1"),
        (dict(num_query_groups=0), 1, "num_query_groups must be >= 1"),
        (
            dict(rope_scaling=RopeScalingConfig(low_freq_factor=4.0, high_freq_factor=1.0)),
            1,
            "low_freq_factor",
        ),
        (dict(rope_scaling=RopeScalingConfig(factor=0.5)), 1, "factor must be >= 1"),
        (dict(), 0, "tensor_parallel_size must be >= 1"),
    ],
)
def test_validate_names_the_problem(changes, tp, message):
    with pytest.raises(ValueError, match=message):
        raise_if_problems(model_problems(ModelConfig(**changes), tensor_parallel_size=tp))


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_seven_b_models_validate_at_usual_tp_sizes(tp):
    for name in ("llama2_7b", "llama3_8b", "mistral_7b", "qwen2_5_7b"):
        config = load(CONF / f"{name}.yaml")
        if name == "qwen2_5_7b" and tp == 8:  # 4 KV heads, 28 query heads
            with pytest.raises(ValueError, match="tensor parallel size 8"):
                raise_if_problems(model_problems(config, tp))
        else:
            raise_if_problems(model_problems(config, tp))


def test_to_transformer_config_passes_overrides_and_refuses_rope_fusion():
    config = ModelConfig(num_query_groups=2)
    transformer = to_transformer_config(
        config, tensor_model_parallel_size=2, bf16=True, params_dtype=torch.bfloat16
    )
    assert transformer.tensor_model_parallel_size == 2 and transformer.bf16
    with pytest.raises(ValueError, match="apply_rope_fusion"):
        to_transformer_config(config, apply_rope_fusion=True)
    with pytest.raises(ValueError, match="tensor parallel size 8"):
        to_transformer_config(config, tensor_model_parallel_size=8)


def test_padded_vocab_size():
    assert ModelConfig(vocab_size=32000).padded_vocab_size(1) == 32000
    assert ModelConfig(vocab_size=32000).padded_vocab_size(8) == 32768
    assert ModelConfig(vocab_size=2000).padded_vocab_size(1) == 2048


def test_yaml_with_unknown_key_is_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("num_layers: 2\nhidden_dim: 64\n")
    with pytest.raises(Exception, match="hidden_dim"):
        load(bad)
