"""Attention backends: the one place that imports optional GPU packages.

| backend | kernel | needs | THD packing | context parallelism | backward |
|---|---|---|---|---|---|
| `te`    | Transformer Engine `DotProductAttention` (megatron's TE layer spec) | transformer_engine, CUDA | yes (cu_seqlens) | ring (TE) | yes |
| `flash` | `flash_attn_varlen_func` | flash_attn, CUDA | yes (cu_seqlens) | K/V all-gather, a varlen sequence per chunk | yes |
| `flex`  | torch `flex_attention` with a document-causal `BlockMask` | torch >= 2.5 | yes (document ids) | K/V all-gather | CUDA only |
| `sdpa`  | torch `scaled_dot_product_attention`, one call per document | torch | yes (loop) | K/V all-gather | yes |

`auto` picks the first usable of te > flash > flex > sdpa. Without CUDA that is always
`sdpa`: `flex` runs forward on CPU but its backward raises NotImplementedError, so it
cannot train there. Nothing heavy is imported at module import time; the `import_*`
helpers import on first use and raise `BackendUnavailableError` naming the package.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from types import ModuleType

import torch

from megatron_longalign.config.model import ATTENTION_BACKENDS

AUTO_ORDER = ("te", "flash", "flex", "sdpa")

# backend -> (importable module, pip package name shown in errors)
_PACKAGES = {
    "te": ("transformer_engine.pytorch", "transformer_engine"),
    "flash": ("flash_attn", "flash_attn"),
    "flex": ("torch.nn.attention.flex_attention", "torch>=2.5 (flex_attention)"),
}
_NEEDS_CUDA = ("te", "flash")


class BackendUnavailableError(RuntimeError):
    """A named attention backend cannot run here (missing package or no CUDA)."""


@functools.cache
def _try_import(module: str) -> tuple[ModuleType | None, str]:
    """(module, "") if importable, else (None, why). Cached: TE imports are slow."""
    try:
        return importlib.import_module(module), ""
    except Exception as exc:  # a broken install (ImportError, OSError from .so) counts as missing
        return None, f"{type(exc).__name__}: {exc}"


def _cuda_available() -> bool:
    return torch.cuda.is_available()


def unavailable_reason(backend: str) -> str | None:
    """None if `backend` can run on this machine, else a message saying what is missing."""
    _check_name(backend)
    if backend == "auto":
        return None
    if backend in _PACKAGES:
        module, package = _PACKAGES[backend]
        found, why = _try_import(module)
        if found is None:
            return (
                f"attention backend '{backend}' needs the package '{package}', which is not "
                f"importable ({why}). Install it, or set model.attention_backend to 'auto' "
                "or 'sdpa'."
            )
    if backend in _NEEDS_CUDA and not _cuda_available():
        return f"attention backend '{backend}' needs a CUDA GPU; none is available here."
    return None


def sequence_parallel_problems(backend: str, sequence_parallel: bool) -> list[str]:
    """Sequence parallelism runs with the `te` backend only (the start-up validator passes
    the configured model.attention_backend, the model builder the resolved one)."""
    if not sequence_parallel or backend == "te":
        return []
    return [
        f"parallel.sequence_parallel needs the 'te' attention backend (megatron's local "
        f"RMSNorm, used with model.attention_backend='{backend}', does not support it); set "
        "parallel.sequence_parallel=false or model.attention_backend=te"
    ]


def _check_name(backend: str) -> None:
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(
            f"unknown attention backend '{backend}'; choose one of {', '.join(ATTENTION_BACKENDS)}"
        )


def resolve_attention_backend(name: str = "auto") -> str:
    """The concrete backend to use for `name`, for the trainer to build and log.

    A named backend is returned as is if it can run here and raises
    `BackendUnavailableError` otherwise (never a silent fallback). `auto` takes the first
    usable of te > flash > flex > sdpa, where flex counts only with CUDA because it cannot
    train (backward) on CPU.
    """
    _check_name(name)
    if name != "auto":
        reason = unavailable_reason(name)
        if reason is not None:
            raise BackendUnavailableError(reason)
        return name
    for candidate in AUTO_ORDER:
        if candidate == "flex" and not _cuda_available():
            continue
        if unavailable_reason(candidate) is None:
            return candidate
    return "sdpa"


def _require(backend: str) -> ModuleType:
    module, _ = _PACKAGES[backend]
    reason = unavailable_reason(backend)
    found, _ = _try_import(module)
    if found is None:
        raise BackendUnavailableError(reason)
    return found


def import_flash_attn_varlen() -> Callable:
    """`flash_attn.flash_attn_varlen_func`."""
    return _require("flash").flash_attn_varlen_func


def import_flex_attention() -> ModuleType:
    """`torch.nn.attention.flex_attention` (flex_attention, BlockMask, ...)."""
    return _require("flex")


def import_te_layer_spec_fn() -> Callable:
    """megatron-core's `get_gpt_layer_with_transformer_engine_spec`, after checking that
    Transformer Engine itself imports (megatron's module imports even without TE and
    fails later with a less helpful message)."""
    _require("te")
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_with_transformer_engine_spec,
    )

    return get_gpt_layer_with_transformer_engine_spec
