"""The model: megatron-core GPTModel with pluggable packed (THD) attention backends and
RoPE from explicit position ids.

    from megatron_longalign.model import build_gpt_model, packed_seq_params_from

Names are resolved lazily, so importing the package does not import megatron-core. The
schema (`ModelConfig`, `RopeScalingConfig`, `ATTENTION_BACKENDS`) is in
megatron_longalign/config/model.py.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "model_problems": "config",
    "to_transformer_config": "config",
    "BackendUnavailableError": "backends",
    "resolve_attention_backend": "backends",
    "LongAlignGPTModel": "gpt",
    "build_gpt_model": "gpt",
    "gpt_layer_spec": "gpt",
    "model_inputs": "gpt",
    "packed_seq_params_from": "attention",
    "AttentionProbe": "attention_probe",
    "ProbeRequest": "attention_probe",
    "attach_probe": "attention_probe",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
    return getattr(module, name)
