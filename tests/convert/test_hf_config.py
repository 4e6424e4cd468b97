"""config.json <-> ModelConfig: each family, what is refused and why, and the model YAML."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from megatron_longalign.config.model import ModelConfig, RopeScalingConfig
from megatron_longalign.convert.errors import UnsupportedModelError
from megatron_longalign.convert.hf_config import (
    config_from_hf,
    default_model_type,
    hf_config_from,
    model_config_from_dict,
    model_config_from_yaml,
    model_yaml,
)

REPO = Path(__file__).resolve().parents[2]

LLAMA31_8B = {  # meta-llama/Llama-3.1-8B config.json (transformers 4 spelling)
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 128256,
}
QWEN25_7B = {
    "architectures": ["Qwen2ForCausalLM"],
    "hidden_act": "silu",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "max_position_embeddings": 131072,
    "max_window_layers": 28,
    "model_type": "qwen2",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 131072,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_sliding_window": False,
    "vocab_size": 152064,
}


def _conf_model(name: str) -> ModelConfig:
    return model_config_from_yaml(str(REPO / "conf" / "model" / f"{name}.yaml"))


@pytest.mark.parametrize(
    ("hf", "conf_name"), [(LLAMA31_8B, "llama3_8b"), (QWEN25_7B, "qwen2_5_7b")]
)
def test_published_configs_match_the_bundled_model_yamls(hf, conf_name):
    converted = config_from_hf(hf, name=conf_name)
    bundled = _conf_model(conf_name)
    # init_method_std is a training choice the YAMLs leave at the default.
    assert dataclasses.replace(converted, init_method_std=0.02) == bundled


def test_transformers5_rope_parameters_spelling():
    hf = {k: v for k, v in LLAMA31_8B.items() if k not in ("rope_theta", "rope_scaling")}
    hf["rope_parameters"] = {**LLAMA31_8B["rope_scaling"], "rope_theta": 500000.0}
    assert config_from_hf(hf) == config_from_hf(LLAMA31_8B)
    default = {**QWEN25_7B, "rope_parameters": {"rope_type": "default", "rope_theta": 5.0}}
    del default["rope_theta"]
    assert config_from_hf(default).rope_theta == 5.0
    assert config_from_hf(default).rope_scaling is None


def test_head_dim_other_than_hidden_over_heads_becomes_kv_channels():
    assert config_from_hf({**LLAMA31_8B, "head_dim": 128}).kv_channels is None
    assert config_from_hf({**LLAMA31_8B, "head_dim": 64}).kv_channels == 64


@pytest.mark.parametrize(
    ("change", "names"),
    [
        ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, ["model_type", "gpt2"]),
        ({"architectures": ["LlamaForSequenceClassification"]}, ["architectures"]),
        ({"hidden_act": "gelu"}, ["hidden_act", "gelu"]),
        ({"attention_bias": True}, ["attention_bias"]),
        ({"mlp_bias": True}, ["mlp_bias"]),
        (
            {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
            ["rope_scaling.rope_type", "yarn"],
        ),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, ["linear"]),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, ["low_freq_factor"]),
        ({"partial_rotary_factor": 0.5}, ["partial_rotary_factor"]),
        ({"quantization_config": {"quant_method": "gptq"}}, ["quantization_config", "gptq"]),
        ({"num_key_value_heads": 5}, ["num_query_groups"]),
    ],
)
def test_unsupported_llama_settings_are_named(change, names):
    with pytest.raises(UnsupportedModelError) as err:
        config_from_hf({**LLAMA31_8B, **change})
    message = str(err.value)
    assert message.startswith("config.json")
    for name in names:
        assert name in message


def test_sliding_windows_are_refused():
    mistral = {
        **LLAMA31_8B,
        "model_type": "mistral",
        "architectures": ["MistralForCausalLM"],
        "rope_scaling": None,
        "max_position_embeddings": 32768,
    }
    assert config_from_hf({**mistral, "sliding_window": None}).num_layers == 32
    assert config_from_hf({**mistral, "sliding_window": 32768}).num_layers == 32
    with pytest.raises(UnsupportedModelError, match="sliding_window=4096"):
        config_from_hf({**mistral, "sliding_window": 4096})
    with pytest.raises(UnsupportedModelError, match="use_sliding_window"):
        config_from_hf({**QWEN25_7B, "use_sliding_window": True})


def test_missing_required_key_is_named():
    hf = dict(QWEN25_7B)
    del hf["intermediate_size"]
    with pytest.raises(UnsupportedModelError, match="'intermediate_size'"):
        config_from_hf(hf)


@pytest.mark.parametrize("hf", [LLAMA31_8B, QWEN25_7B])
def test_export_config_round_trips(hf):
    config = config_from_hf(hf)
    model_type = default_model_type(config)
    exported = hf_config_from(config, model_type, "bfloat16", base=hf)
    assert config_from_hf(exported) == config
    assert exported["vocab_size"] == hf["vocab_size"]
    assert exported.get("bos_token_id") == hf.get("bos_token_id")
    assert exported["torch_dtype"] == "bfloat16"
    assert exported["architectures"] == hf["architectures"]


def test_export_config_loads_in_transformers():
    from transformers import AutoConfig

    config = config_from_hf(LLAMA31_8B)
    exported = hf_config_from(config, "llama", "float32")
    loaded = AutoConfig.for_model(**exported)
    assert loaded.num_key_value_heads == 8
    assert loaded.rope_parameters["rope_type"] == "llama3"
    assert loaded.rope_parameters["rope_theta"] == 500000.0


def test_export_refuses_bias_the_architecture_cannot_hold():
    config = config_from_hf(QWEN25_7B)
    with pytest.raises(UnsupportedModelError, match="qkv_bias"):
        hf_config_from(config, "llama", "bfloat16")
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        hf_config_from(config, "gpt2", "bfloat16")


def test_model_yaml_and_dict_round_trip(tmp_path):
    config = ModelConfig(
        name="x",
        vocab_size=300,
        rope_scaling=RopeScalingConfig(factor=4.0, original_max_position_embeddings=64),
        make_vocab_size_divisible_by=64,
    )
    path = tmp_path / "x.yaml"
    path.write_text(model_yaml(config, "line one\nline two"))
    assert path.read_text().startswith("# line one\n# line two\n")
    assert model_config_from_yaml(str(path)) == config
    assert model_config_from_dict(dataclasses.asdict(config)) == config
    # A whole run config (e.g. .hydra/config.yaml) works too.
    run = tmp_path / "config.yaml"
    run.write_text(
        "name: run\nmodel:\n" + "".join(f"  {line}\n" for line in path.read_text().splitlines())
    )
    assert model_config_from_yaml(str(run)) == config
