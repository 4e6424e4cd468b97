"""Run megatron-core on CPU (gloo): for tests and the CPU demo only.

megatron-core assumes CUDA in a few hundred places: `torch.cuda.current_device()` as a
device, `device="cuda"`, `.cuda()`, the CUDA RNG and streams, and type strings such
as 'torch.cuda.FloatTensor'. `enable_cpu_mode()` makes those work on CPU, process-wide:

1. a `TorchFunctionMode` maps CUDA device arguments to CPU, makes `Tensor.cuda()` a
   no-op and reports `Tensor.type()` under its `torch.cuda.*` name;
2. stubs for the `torch.cuda` functions megatron calls (device, RNG, streams, events,
   synchronisation, NVTX, memory statistics), with the CUDA RNG mapped to the CPU one.

Nothing on the GPU path imports this module. It is enabled once, before megatron-core
builds anything, and cannot be disabled in the same process.
"""

from __future__ import annotations

import contextlib
import types

import torch
from torch.overrides import TorchFunctionMode

_MODE: TorchFunctionMode | None = None


def _to_cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int):  # factory functions treat a bare int as a CUDA index
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


def _cuda_type_name(tensor: torch.Tensor) -> str:
    name = torch.Tensor.type.__get__(tensor)()  # e.g. 'torch.FloatTensor'
    return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name


class _CudaToCpuMode(TorchFunctionMode):
    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return _cuda_type_name(args[0])
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if func in (torch.Tensor.to, torch.Tensor.new_empty, torch.Tensor.new_zeros) and args:
            args = (args[0],) + tuple(
                _to_cpu_device(a) if isinstance(a, (str, torch.device)) else a for a in args[1:]
            )
        return func(*args, **kwargs)


class _NullStream:
    """Stands in for torch.cuda.Stream / Event: everything is synchronous on CPU."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def wait_stream(self, *args, **kwargs) -> None:
        pass

    def wait_event(self, *args, **kwargs) -> None:
        pass

    def record_event(self, *args, **kwargs) -> _NullStream:
        return _NullStream()

    def record(self, *args, **kwargs) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other) -> float:
        return 0.0


def _noop():
    """A fresh no-op per stub: torch._dynamo indexes torch.* callables by identity and
    rejects one function object registered under two names."""

    def noop(*args, **kwargs) -> None:
        return None

    return noop


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.device_count = lambda: 1
    cuda.set_device = _noop()
    cuda.synchronize = _noop()
    cuda.empty_cache = _noop()
    # The "CUDA" generator is the CPU one. torch.manual_seed itself calls
    # cuda.manual_seed_all, so that must not call back into torch.manual_seed.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = _noop()
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    cuda.Stream = _NullStream
    cuda.Event = _NullStream
    cuda.current_stream = lambda *a, **k: _NullStream()
    cuda.default_stream = lambda *a, **k: _NullStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.nvtx = types.SimpleNamespace(
        range_push=_noop(),
        range_pop=_noop(),
        range=lambda *a, **k: contextlib.nullcontext(),
        mark=_noop(),
    )
    cuda.memory_stats = lambda *a, **k: {}
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.memory_reserved = lambda *a, **k: 0
    cuda.reset_peak_memory_stats = _noop()
    torch.cuda.random.get_rng_state = cuda.get_rng_state


def _patch_megatron_rng() -> None:
    """megatron's private CUDA RNG helpers index torch.cuda.default_generators."""
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)


def enable_cpu_mode() -> None:
    """Idempotent. Call before megatron-core builds models or process groups."""
    global _MODE
    if _MODE is not None:
        return
    if torch.cuda.is_available():
        raise RuntimeError("CPU mode is for machines without a GPU; a GPU is available")
    _patch_torch_cuda()
    _patch_megatron_rng()
    _MODE = _CudaToCpuMode()
    _MODE.__enter__()


def cpu_mode_enabled() -> bool:
    return _MODE is not None
