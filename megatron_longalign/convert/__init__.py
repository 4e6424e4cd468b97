"""Hugging Face <-> trainer checkpoint conversion (tools/convert_hf.py, docs/HF_CONVERSION.md).

- hf_config: config.json <-> ModelConfig, supported families, the Hydra model YAML
- hf_names: which HF rows make up each megatron parameter (QKV per group, SwiGLU, vocab)
- hf_reader: streaming reader over safetensors / .bin shards (slices only)
- safetensors_writer: streaming safetensors writer (one tensor at a time)
- hf_import / hf_export: the two directions; model_io: what they share

megatron-core is imported lazily (inside functions), so importing this package is cheap.
"""

from megatron_longalign.convert.errors import ConversionError, UnsupportedModelError

__all__ = ["ConversionError", "UnsupportedModelError"]
