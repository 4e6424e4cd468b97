"""megatron-core on CPU in this one process: the setup the in-process model tests share.

Used by the package-scoped `megatron_cpu` fixtures of tests/model and tests/convert.
The setup does not go through `initialize_distributed` (only its `free_port`), so those
tests depend only on the model package and the CPU shim, not on the launcher logic.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from megatron_longalign.parallel.distributed import free_port


@contextmanager
def megatron_on_cpu(seed: int) -> Iterator[None]:
    """CPU shim + a one-process gloo group + megatron model-parallel state (TP = PP = 1)
    and its RNG tracker seeded with `seed`. On exit it tears down only what it created,
    so a package that uses it (package-scoped fixture) leaves nothing behind and the
    next package can set up its own."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_longalign.parallel.cpu_mode import enable_cpu_mode

    if not torch.cuda.is_available():
        enable_cpu_mode()
    created_pg = not torch.distributed.is_initialized()
    if created_pg:
        torch.distributed.init_process_group(
            "gloo", world_size=1, rank=0, init_method=f"tcp://127.0.0.1:{free_port()}"
        )
    created_mp = not parallel_state.model_parallel_is_initialized()
    if created_mp:
        parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(seed)
    try:
        yield
    finally:
        if created_mp:
            parallel_state.destroy_model_parallel()
        if created_pg:
            torch.distributed.destroy_process_group()
