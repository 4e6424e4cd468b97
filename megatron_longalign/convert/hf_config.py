"""Hugging Face config.json <-> ModelConfig for the supported families, and the Hydra
model YAML an import writes.

Supported: Llama-2/3/3.1 (LlamaForCausalLM), Mistral without a sliding window
(MistralForCausalLM) and Qwen2/2.5 (Qwen2ForCausalLM, bias on Q/K/V only). Anything the
model cannot compute exactly (other activations, biases elsewhere, sliding windows,
RoPE types other than default and llama3, partial rotary, quantised weights) is refused
with an UnsupportedModelError naming the config key, rather than converted into a
model that silently computes something else.

Both spellings of RoPE settings are read: transformers 4 (`rope_theta`, `rope_scaling`)
and transformers 5 (`rope_parameters`). Export writes the transformers 4 spelling, which
transformers 5 still reads, so the directory loads in either.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from megatron_longalign.config.model import ModelConfig, RopeScalingConfig
from megatron_longalign.convert.errors import UnsupportedModelError
from megatron_longalign.model.config import model_problems

# model_type -> (architecture class, defaults of the keys a config.json may omit: the
# transformers config class defaults, which is what transformers itself would use).
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": (
        "LlamaForCausalLM",
        {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0},
    ),
    "mistral": (
        "MistralForCausalLM",
        {"max_position_embeddings": 4096 * 32, "rms_norm_eps": 1e-6, "rope_theta": 10000.0},
    ),
    "qwen2": (
        "Qwen2ForCausalLM",
        {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 10000.0},
    ),
}
ARCHITECTURES = {arch: model_type for model_type, (arch, _) in FAMILIES.items()}
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
# Keys export recomputes from ModelConfig; a source config's values for them are dropped.
_DERIVED_KEYS = (
    "rope_parameters",
    "rope_scaling",
    "rope_theta",
    "dtype",
    "torch_dtype",
    "layer_types",
    "transformers_version",
)


def _unsupported(key: str, value: Any, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"config.json: {key}={value!r}: {why}")


def model_type_of(hf: dict[str, Any]) -> str:
    """The supported family of a config.json, or UnsupportedModelError."""
    model_type = hf.get("model_type")
    architectures = hf.get("architectures") or []
    supported = ", ".join(f"{t} ({a})" for t, (a, _) in FAMILIES.items())
    if model_type not in FAMILIES:
        raise _unsupported(
            "model_type", model_type, f"architectures {architectures}; supported: {supported}"
        )
    expected = FAMILIES[model_type][0]
    if architectures and list(architectures) != [expected]:
        raise _unsupported(
            "architectures", architectures, f"model_type {model_type!r} needs [{expected!r}]"
        )
    return model_type


def rope_settings(
    hf: dict[str, Any], default_theta: float
) -> tuple[float, RopeScalingConfig | None]:
    """(rope_theta, llama3 scaling or None) from either transformers spelling."""
    params = hf.get("rope_parameters")
    if params is None:
        params = dict(hf.get("rope_scaling") or {})
        params.setdefault("rope_theta", hf.get("rope_theta", default_theta))
    key = "rope_parameters" if "rope_parameters" in hf else "rope_scaling"
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", default_theta))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise _unsupported(
            f"{key}.rope_type", rope_type, "only 'default' and 'llama3' RoPE are supported"
        )
    missing = [k for k in _LLAMA3_KEYS if k not in params]
    if missing:
        raise _unsupported(key, params, f"llama3 RoPE scaling needs {missing}")
    return theta, RopeScalingConfig(
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    )


def _check_computation(hf: dict[str, Any], model_type: str) -> None:
    """Refuse settings that change what the model computes and that ModelConfig has no
    field for."""
    if hf.get("hidden_act", "silu") != "silu":
        raise _unsupported("hidden_act", hf["hidden_act"], "only silu (SwiGLU) is supported")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise _unsupported(key, hf[key], "only Qwen2's Q/K/V bias is supported")
    if hf.get("quantization_config"):
        raise _unsupported(
            "quantization_config",
            hf["quantization_config"].get("quant_method", "?"),
            "quantised checkpoints are not supported; use the unquantised weights",
        )
    if float(hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise _unsupported(
            "partial_rotary_factor", hf["partial_rotary_factor"], "RoPE must cover all dims"
        )
    max_positions = hf.get(
        "max_position_embeddings", FAMILIES[model_type][1]["max_position_embeddings"]
    )
    if model_type == "qwen2":
        if hf.get("use_sliding_window"):
            raise _unsupported(
                "use_sliding_window", True, "sliding-window attention is not supported"
            )
        layer_types = set(hf.get("layer_types") or ["full_attention"])
        if layer_types != {"full_attention"}:
            raise _unsupported(
                "layer_types", sorted(layer_types), "only full attention is supported"
            )
    elif model_type == "mistral":
        window = hf.get("sliding_window")
        if window is not None and window < max_positions:
            raise _unsupported(
                "sliding_window",
                window,
                f"sliding-window attention (window < max_position_embeddings="
                f"{max_positions}) is not supported (e.g. Mistral-7B-v0.1; v0.3 has none)",
            )


def config_from_hf(hf: dict[str, Any], name: str = "custom") -> ModelConfig:
    """ModelConfig for a Hugging Face config.json dict; UnsupportedModelError if the
    model cannot be expressed exactly."""
    model_type = model_type_of(hf)
    _check_computation(hf, model_type)
    defaults = FAMILIES[model_type][1]
    try:
        hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        fields = dict(
            num_layers=int(hf["num_hidden_layers"]),
            hidden_size=hidden,
            ffn_hidden_size=int(hf["intermediate_size"]),
            num_attention_heads=heads,
            vocab_size=int(hf["vocab_size"]),
        )
    except KeyError as err:
        raise UnsupportedModelError(
            f"config.json: required key {err.args[0]!r} is missing"
        ) from err
    theta, scaling = rope_settings(hf, defaults["rope_theta"])
    head_dim = hf.get("head_dim")
    config = ModelConfig(
        **fields,
        num_query_groups=int(hf.get("num_key_value_heads") or heads),
        max_position_embeddings=int(
            hf.get("max_position_embeddings", defaults["max_position_embeddings"])
        ),
        rope_theta=theta,
        rope_scaling=scaling,
        # Every family's own default is False (transformers' PretrainedConfig says True,
        # but these classes override it).
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2",
        norm_epsilon=float(hf.get("rms_norm_eps", defaults["rms_norm_eps"])),
        kv_channels=int(head_dim) if head_dim and int(head_dim) != hidden // heads else None,
        init_method_std=float(hf.get("initializer_range", 0.02)),
        name=name,
    )
    problems = model_problems(config)
    if problems:
        raise UnsupportedModelError(f"config.json: model config: {'; '.join(problems)}")
    return config


def hf_config_from(
    config: ModelConfig,
    model_type: str,
    torch_dtype: str,
    base: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """config.json for `config` as a `model_type` model. `base` (the imported source's
    config.json) supplies what ModelConfig does not hold (token ids, initializer range);
    everything that defines the computation comes from `config`."""
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"architecture {model_type!r} is not supported; choose one of {sorted(FAMILIES)}"
        )
    if config.qkv_bias != (model_type == "qwen2"):
        raise UnsupportedModelError(
            f"qkv_bias={config.qkv_bias} cannot be written as a {model_type!r} model "
            "(Qwen2 always has Q/K/V biases, Llama and Mistral never)"
        )
    out = {k: v for k, v in (base or {}).items() if k not in _DERIVED_KEYS}
    if out.get("model_type", model_type) != model_type:
        out = {k: out[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in out}
    scaling = None
    if config.rope_scaling is not None:
        scaling = {"rope_type": "llama3", **dataclasses.asdict(config.rope_scaling)}
    out.update(
        architectures=[FAMILIES[model_type][0]],
        model_type=model_type,
        hidden_size=config.hidden_size,
        intermediate_size=config.ffn_hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.query_groups,
        head_dim=config.head_dim,
        hidden_act="silu",
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.norm_epsilon,
        rope_theta=config.rope_theta,
        rope_scaling=scaling,
        vocab_size=config.vocab_size,  # the real vocab: megatron's padding is dropped
        tie_word_embeddings=config.tie_word_embeddings,
        torch_dtype=torch_dtype,
    )
    if model_type == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    elif model_type == "mistral":
        out["sliding_window"] = None
    else:
        out.update(use_sliding_window=False, sliding_window=None)
    return dict(sorted(out.items()))


def default_model_type(config: ModelConfig) -> str:
    """The family to export as when nothing recorded says: Qwen2 if it has Q/K/V bias,
    else Llama (Mistral computes the same as Llama)."""
    return "qwen2" if config.qkv_bias else "llama"


def model_yaml(config: ModelConfig, header: str = "") -> str:
    """The Hydra `model` group YAML for `config` (every ModelConfig field)."""
    from omegaconf import OmegaConf

    body = OmegaConf.to_yaml(OmegaConf.structured(config))
    comment = "".join(f"# {line}\n".replace("# \n", "#\n") for line in header.splitlines())
    return comment + body


def model_config_from_dict(fields: dict[str, Any]) -> ModelConfig:
    """Inverse of dataclasses.asdict(ModelConfig) (as recorded in a checkpoint)."""
    fields = dict(fields)
    scaling = fields.pop("rope_scaling", None)
    return ModelConfig(**fields, rope_scaling=RopeScalingConfig(**scaling) if scaling else None)


def recorded_model_config(extra: dict[str, Any]) -> ModelConfig | None:
    """The model config a checkpoint's marker `extra` records: the trainer's own first
    (what it trained, e.g. with a raised context), then an import's; None if neither."""
    fields = extra.get("model_config") or (extra.get("hf_import") or {}).get("model_config")
    return model_config_from_dict(fields) if fields else None


def model_config_from_yaml(path: str) -> ModelConfig:
    """A ModelConfig from a model YAML file, or from a whole run config with a `model:` key
    (e.g. a run's .hydra/config.yaml)."""
    from omegaconf import DictConfig, OmegaConf

    node = OmegaConf.load(path)
    if isinstance(node.get("model"), DictConfig):
        node = node.model
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), node)
    return OmegaConf.to_object(merged)
