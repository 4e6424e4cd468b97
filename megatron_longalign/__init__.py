"""megatron-longalign: long-context instruction tuning on megatron-core."""

from megatron_longalign.version import __version__

__all__ = ["__version__"]
