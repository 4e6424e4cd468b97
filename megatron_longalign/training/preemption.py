"""Preemption: stop at a step boundary on SIGUSR1 or SIGTERM, save a checkpoint, and exit
with `PREEMPTED_EXIT_CODE`, so that the launcher requeues the job and the next attempt
resumes from `latest` (docs/CLUSTER.md).

1. `install(signals)` replaces the handlers of the given signals with one that only records
   which signal arrived. Nothing else happens inside the handler: no logging and no
   collectives, since it runs between two arbitrary bytecodes of the main thread.
2. The trainer calls `stop_requested()` once per step, at the step boundary. It all-reduces
   the local flag with MAX over the whole job (one 1-element all-reduce per step). Ranks
   get the signal at slightly different times, or only some get it; the all-reduce makes
   every rank reach the same decision at the same step.
3. The trainer then leaves its loop and saves through `save_checkpoint` (collective and
   atomic). The entry point (megatron_longalign/train.py) exits with
   `PREEMPTED_EXIT_CODE`.

The handlers are process-wide, as signals are. `install` is idempotent: the entry point
installs them before the Trainer is built, so a signal that arrives while the model or a
checkpoint is loading is kept. The Trainer's own `handling()` inside `train()` is then a
no-op. SIGINT is left alone, so Ctrl-C still interrupts at once.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch

log = logging.getLogger("megatron_longalign.train")

# EX_TEMPFAIL (sysexits.h): "a temporary failure; the user is invited to retry". The
# launcher (slurm/train_64k.sh) requeues the job when the training exits with it.
PREEMPTED_EXIT_CODE = 75
DEFAULT_SIGNALS = ("SIGUSR1", "SIGTERM")

_lock = threading.Lock()
_previous: dict[int, Any] = {}  # signal number -> the handler that install() replaced
_received: list[int] = []  # signals received since install(), in order of arrival


def signal_number(name: str | int) -> int:
    """`SIGUSR1`, `USR1` or 10 -> 10."""
    if isinstance(name, int):
        return int(signal.Signals(name))
    key = name.strip().upper()
    key = key if key.startswith("SIG") else f"SIG{key}"
    try:
        return int(signal.Signals[key])
    except KeyError as err:
        raise ValueError(f"unknown signal {name!r}; use a name such as SIGUSR1 or SIGTERM") from err


def _on_signal(signum: int, frame: Any) -> None:
    # Record only: the main thread acts on it at the next step boundary.
    _received.append(signum)


def installed() -> bool:
    return bool(_previous)


def install(signals: Sequence[str | int] = DEFAULT_SIGNALS) -> bool:
    """Catch `signals` from now on (recording them for `stop_requested`). Returns False,
    changing nothing, when the handlers are already installed, when `signals` is empty, or
    off the main thread (where Python cannot set handlers)."""
    numbers = [signal_number(s) for s in signals]
    with _lock:
        if _previous or not numbers:
            return False
        if threading.current_thread() is not threading.main_thread():
            log.warning("preemption signals not handled: Trainer.train() is not on the main thread")
            return False
        _received.clear()
        for number in numbers:
            _previous[number] = signal.signal(number, _on_signal)
            # Restart system calls the signal interrupts (SA_RESTART), so that blocking
            # calls in C libraries (gloo, NCCL, file I/O) do not fail with EINTR.
            signal.siginterrupt(number, False)
    return True


def uninstall() -> None:
    """Restore the handlers that `install` replaced and forget received signals."""
    with _lock:
        for number, previous in _previous.items():
            signal.signal(number, previous if previous is not None else signal.SIG_DFL)
        _previous.clear()
        _received.clear()


@contextlib.contextmanager
def handling(signals: Sequence[str | int] = DEFAULT_SIGNALS) -> Iterator[None]:
    """`install(signals)` for the duration of the block; a no-op when already installed
    (the outer installer keeps them and any signal already received)."""
    ours = install(signals)
    try:
        yield
    finally:
        if ours:
            uninstall()


def request_stop(signum: int = signal.SIGUSR1) -> None:
    """Record a stop request as if `signum` had arrived (tests, programmatic callers)."""
    _received.append(int(signum))


def received_signal() -> str | None:
    """The first signal this process received since `install`, e.g. "SIGUSR1"."""
    return signal.Signals(_received[0]).name if _received else None


def stop_requested(device: torch.device | str | None = None, step: int | None = None) -> bool:
    """Whether any rank of the job received a preemption signal. Collective when
    torch.distributed is initialized (every rank must call it at the same point, e.g.
    each step boundary): a MAX all-reduce of the local flag on `device` (the device of the
    process group's backend: the current CUDA device for NCCL, CPU for gloo)."""
    local = received_signal()
    flag = torch.tensor([1.0 if local else 0.0], device=device)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed:
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    stop = bool(flag.item() > 0)
    if stop:
        rank = torch.distributed.get_rank() if distributed else 0
        if local:
            log.warning("rank %d received %s", rank, local)
        if rank == 0:
            log.warning(
                "preemption: stopping at the step boundary after step %s to save a "
                "checkpoint; the process exits with status %d (requeue and resume)",
                step if step is not None else "?",
                PREEMPTED_EXIT_CODE,
            )
    return stop
