"""Process groups: torch.distributed plus megatron-core's model-parallel layout.

`initialize_distributed` is the one place a process joins the job. It reads the
torchrun environment, starts torch.distributed (NCCL on GPU, gloo in CPU mode), asks
megatron-core's `parallel_state` for the TP/PP/CP/DP groups and seeds the RNGs the
way megatron expects. Everything else asks `parallel_state` (or the thin wrappers
below) for ranks and groups.

megatron-core is imported inside the functions: importing it takes seconds, and
`parallel_problems` is used by config validation, which should stay cheap. The layout's
schema, `ParallelConfig`, is in megatron_longalign/config/parallel.py.
"""

from __future__ import annotations

import os
import pickle
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from megatron_longalign.config.errors import raise_if_problems
from megatron_longalign.config.parallel import CP_COMM_TYPES, ParallelConfig

T = TypeVar("T")


def parallel_problems(parallel: ParallelConfig, world_size: int) -> list[str]:
    """What keeps `parallel` from running on `world_size` processes (empty when nothing),
    saying what to change. The start-up validator and `initialize_distributed` call it."""
    problems = []
    for name in (
        "tensor_model_parallel_size",
        "pipeline_model_parallel_size",
        "context_parallel_size",
    ):
        value = getattr(parallel, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            problems.append(f"parallel.{name} must be an integer >= 1, got {value!r}")
    if problems:
        return problems  # the checks below multiply the sizes
    if world_size < 1:
        problems.append(f"world size must be >= 1, got {world_size}")
    elif world_size % parallel.ranks_per_replica != 0:
        problems.append(
            f"world size {world_size} is not divisible by tensor_model_parallel_size "
            f"({parallel.tensor_model_parallel_size}) * pipeline_model_parallel_size "
            f"({parallel.pipeline_model_parallel_size}) * context_parallel_size "
            f"({parallel.context_parallel_size}) = {parallel.ranks_per_replica}; change the "
            f"parallel sizes or launch a multiple of {parallel.ranks_per_replica} processes"
        )
    if parallel.cp_comm_type not in CP_COMM_TYPES:
        problems.append(
            f"parallel.cp_comm_type={parallel.cp_comm_type!r}; choose one of {CP_COMM_TYPES}"
        )
    if parallel.sequence_parallel and parallel.tensor_model_parallel_size == 1:
        problems.append(
            "parallel.sequence_parallel=true needs tensor_model_parallel_size > 1 "
            "(it splits activations over the tensor-parallel group); set "
            "sequence_parallel=false or increase tensor_model_parallel_size"
        )
    return problems


@dataclass(frozen=True)
class _LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    init_method: str


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch_env() -> _LaunchEnv:
    """Rank and rendezvous from the torchrun environment, or a lone process."""
    env = os.environ
    rank = int(env.get("RANK", "0"))
    world_size = int(env.get("WORLD_SIZE", "1"))
    local_rank = int(env.get("LOCAL_RANK", "0"))
    if "MASTER_ADDR" in env and "MASTER_PORT" in env:
        # env:// joins the store torchrun's agent already serves on MASTER_PORT;
        # a tcp:// URL would make rank 0 try to bind that port a second time.
        return _LaunchEnv(rank, world_size, local_rank, "env://")
    if world_size != 1:
        raise RuntimeError(
            f"WORLD_SIZE={world_size} but MASTER_ADDR/MASTER_PORT are not set; "
            "launch with torchrun, or unset WORLD_SIZE for a single process"
        )
    addr = env.get("MASTER_ADDR", "127.0.0.1")
    return _LaunchEnv(0, 1, local_rank, f"tcp://{addr}:{free_port()}")


def _resolve_cpu(cpu: bool | None) -> bool:
    if cpu is None:
        return not torch.cuda.is_available()
    if not cpu and not torch.cuda.is_available():
        raise RuntimeError("cpu=False was requested but CUDA is not available")
    return cpu


def _current_layout() -> tuple[int, int, int]:
    from megatron.core import parallel_state

    return (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_context_parallel_world_size(),
    )


def _requested_layout(parallel: ParallelConfig) -> tuple[int, int, int]:
    return (
        parallel.tensor_model_parallel_size,
        parallel.pipeline_model_parallel_size,
        parallel.context_parallel_size,
    )


def _enable_cpu_mode() -> None:
    # Imported only here: the GPU path must never depend on the CPU shim.
    from megatron_longalign.parallel.cpu_mode import enable_cpu_mode

    enable_cpu_mode()


def _init_process_group(cpu: bool, launch: _LaunchEnv) -> None:
    if not cpu:
        torch.cuda.set_device(launch.local_rank)
    torch.distributed.init_process_group(
        backend="gloo" if cpu else "nccl",
        init_method=launch.init_method,
        rank=launch.rank,
        world_size=launch.world_size,
    )


def seed_everything(seed: int) -> None:
    """Seed torch and megatron's CUDA RNG tracker (in CPU mode, the CPU generator).

    As megatron's own trainer does, each pipeline stage adds 100 * its rank, so stages
    holding different layers do not draw identical dropout masks. megatron then gives
    each TP rank its own tracker stream for tensor-parallel regions, and all DP ranks
    the same default stream.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    torch.manual_seed(stage_seed)
    model_parallel_cuda_manual_seed(stage_seed)


def initialize_distributed(parallel: ParallelConfig, seed: int, cpu: bool | None = None) -> None:
    """Join the job and build megatron's process groups for `parallel`.

    cpu=None picks CPU mode (gloo, `enable_cpu_mode()`) when CUDA is absent. Calling it
    again with the same layout only re-seeds; a different layout is an error (call
    `destroy_distributed()` first).
    """
    cpu = _resolve_cpu(cpu)
    if cpu:
        _enable_cpu_mode()  # before megatron-core builds any group or tensor
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        if _current_layout() != _requested_layout(parallel):
            raise RuntimeError(
                f"megatron parallel state is already initialized with (tp, pp, cp) = "
                f"{_current_layout()}, not {_requested_layout(parallel)}; call "
                "destroy_distributed() before changing the layout"
            )
        seed_everything(seed)
        return

    launch = _launch_env()
    world_size = (
        torch.distributed.get_world_size()
        if torch.distributed.is_initialized()
        else launch.world_size
    )
    raise_if_problems(parallel_problems(parallel, world_size))
    if not torch.distributed.is_initialized():
        _init_process_group(cpu, launch)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
    )
    seed_everything(seed)


def destroy_distributed() -> None:
    """Tear down megatron's groups and the default process group (CPU mode, once
    enabled, stays on for the life of the process)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def data_parallel_rank() -> int:
    """Rank in the data-parallel group (without context parallelism)."""
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_rank()


def data_parallel_size() -> int:
    """Size of the data-parallel group (without context parallelism)."""
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_world_size()


def is_last_pipeline_stage() -> bool:
    """True on the stage that holds the output layer and computes the loss."""
    from megatron.core import parallel_state

    return parallel_state.is_pipeline_last_stage()


def context_parallel_rank() -> int:
    """Rank in the context-parallel group (which share of each document this rank holds)."""
    from megatron.core import parallel_state

    return parallel_state.get_context_parallel_rank()


def rank0_then_broadcast(fn: Callable[[], T]) -> T:
    """Run `fn()` on global rank 0 only and give every rank its result (it must pickle).

    If `fn` raises (an Exception), every rank raises: rank 0 its own exception, the
    others a copy of the same type and message, so no rank goes on into a collective
    that the others never join. An exception that does not survive pickling arrives as
    a RuntimeError naming its type. Collective over the default process group."""
    holder: list = [None]
    error: Exception | None = None
    if torch.distributed.get_rank() == 0:
        try:
            holder[0] = (True, fn())
        except Exception as err:
            error = err
            holder[0] = (False, _portable_exception(err))
    torch.distributed.broadcast_object_list(holder, src=0)
    ok, value = holder[0]
    if ok:
        return value
    if error is not None:
        raise error
    raise value


def _portable_exception(err: Exception) -> Exception:
    """`err` if a pickle round trip keeps its type and message, else a RuntimeError that
    names them."""
    try:
        copy = pickle.loads(pickle.dumps(err))
        if type(copy) is type(err) and str(copy) == str(err):
            return err
    except Exception:  # any failure to pickle or unpickle: send a plain copy
        pass
    return RuntimeError(f"{type(err).__name__} on rank 0: {err}")
