"""The model: megatron-core GPTModel with pluggable packed (THD) attention backends and
RoPE from explicit position ids.

    from megatron_longalign.model import ModelConfig, build_gpt_model, packed_seq_params_from

Names are resolved lazily, so importing the package (e.g. for `ModelConfig` in Hydra
configs) does not import megatron-core.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ModelConfig": "config",
    "RopeScalingConfig": "config",
    "ATTENTION_BACKENDS": "backends",
    "BackendUnavailableError": "backends",
    "resolve_attention_backend": "backends",
    "LongAlignGPTModel": "gpt",
    "build_gpt_model": "gpt",
    "gpt_layer_spec": "gpt",
    "model_inputs": "gpt",
    "packed_seq_params_from": "attention",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
    return getattr(module, name)
