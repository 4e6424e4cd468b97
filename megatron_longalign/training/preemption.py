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

The handlers are process-wide, as signals are. `install` is idempotent. SIGINT is left
alone, so Ctrl-C still interrupts at once.

Start-up. A process that gets SIGUSR1 before it handles it dies at once, with no output
and a status the launcher does not requeue on, and the imports alone (torch, megatron)
take seconds. So the entry point calls `install_early()` as its very first statement,
before those imports: it records the default signals (`DEFAULT_SIGNALS`) while nothing
is known of the config. Once the config is composed, `install(train.preemption_signals)`
settles the set: it catches configured signals that were not caught yet, gives the
others back their previous (default) action, and keeps what was received. A signal that
is recorded but not configured then takes that action, as it would have without the
early handler. A kept signal stops the run at the first step boundary like any other
(nothing to save when no step ran). The Trainer's own `handling()` inside `train()` is
a no-op when the handlers are already installed. This module imports nothing slow
(torch only inside `stop_requested`), so that `install_early` runs within milliseconds
of the interpreter's start.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from megatron_longalign.utils.signals import signal_number

if TYPE_CHECKING:
    import torch

log = logging.getLogger("megatron_longalign.train")

# EX_TEMPFAIL (sysexits.h): "a temporary failure; the user is invited to retry". The
# launcher (slurm/train_64k.sh) requeues the job when the training exits with it.
PREEMPTED_EXIT_CODE = 75
DEFAULT_SIGNALS = ("SIGUSR1", "SIGTERM")

_lock = threading.Lock()
_previous: dict[int, Any] = {}  # signal number -> the handler that install() replaced
_received: list[int] = []  # signals received since install(), in order of arrival
_early = False  # installed by install_early(): the configured set is not known yet


def _on_signal(signum: int, frame: Any) -> None:
    # Record only: the main thread acts on it at the next step boundary.
    _received.append(signum)


def installed() -> bool:
    return bool(_previous)


def install_early(signals: Sequence[str | int] = DEFAULT_SIGNALS) -> bool:
    """Record `signals` from now on, before the config says which signals to handle; the
    next `install` settles the set (see the module docstring). For the entry point's
    first statement. Returns what `install` returns."""
    global _early
    with _lock:
        if _previous:
            return False
    if not install(signals):
        return False
    _early = True
    return True


def install(signals: Sequence[str | int] = DEFAULT_SIGNALS) -> bool:
    """Catch `signals` from now on (recording them for `stop_requested`). Returns False,
    changing nothing, when the handlers are already installed, when `signals` is empty, or
    off the main thread (where Python cannot set handlers).

    After `install_early`, it settles the set instead: `signals` are caught from now on
    (signals already received among them are kept), the early ones not among them get
    their previous handler back, and a received one of those is raised again, to take
    that action now. Returns whether any signal is caught."""
    numbers = list(dict.fromkeys(signal_number(s) for s in signals))
    if _early:
        return _settle(numbers)
    with _lock:
        if _previous or not numbers:
            return False
        if threading.current_thread() is not threading.main_thread():
            log.warning("preemption signals not handled: Trainer.train() is not on the main thread")
            return False
        _received.clear()
        for number in numbers:
            _catch(number)
    return True


def _catch(number: int) -> None:
    _previous[number] = signal.signal(number, _on_signal)
    # Restart system calls the signal interrupts (SA_RESTART), so that blocking calls in
    # C libraries (gloo, NCCL, file I/O) do not fail with EINTR.
    signal.siginterrupt(number, False)


def _settle(numbers: list[int]) -> bool:
    """`install(numbers)` after `install_early`: the configured set replaces the early one."""
    global _early
    if threading.current_thread() is not threading.main_thread():
        log.warning("preemption signals not settled: install() is not on the main thread")
        return bool(_previous)
    with _lock:
        _early = False
        for number in numbers:
            if number not in _previous:
                _catch(number)
            elif signal.getsignal(number) is not _on_signal:  # an import replaced it
                signal.signal(number, _on_signal)
                signal.siginterrupt(number, False)
        released = [number for number in _previous if number not in numbers]
        for number in released:
            previous = _previous.pop(number)
            signal.signal(number, previous if previous is not None else signal.SIG_DFL)
        # In place: the handler may append while this runs (no released signal any more).
        late = [number for number in released if number in _received]
        for number in late:
            while number in _received:
                _received.remove(number)
    if _received:
        log.warning(
            "received %s during start-up: the run stops at the first step boundary (with a "
            "checkpoint save once a step has run) and exits with status %d (requeue and resume)",
            received_signal(),
            PREEMPTED_EXIT_CODE,
        )
    for number in late:
        # Not a preemption signal in this config: what it would have done without the
        # early handler, now (by default: end the process).
        log.warning(
            "received %s during start-up; it is not in train.preemption_signals, so it takes "
            "its default action now",
            signal.Signals(number).name,
        )
        signal.raise_signal(number)
    return bool(_previous)


def pending_before_start() -> str | None:
    """The signal `install_early` recorded when no `install` has settled the set since:
    the process was asked to stop before it knew its config (e.g. while only printing it
    with --cfg)."""
    return received_signal() if _early else None


def uninstall() -> None:
    """Restore the handlers that `install` replaced and forget received signals."""
    global _early
    with _lock:
        _early = False
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
    import torch

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
        if rank == 0 and step == 0:
            log.warning(
                "preemption: stopping before the first step, with no checkpoint to save; "
                "the process exits with status %d (requeue and resume)",
                PREEMPTED_EXIT_CODE,
            )
        elif rank == 0:
            log.warning(
                "preemption: stopping at the step boundary after step %s to save a "
                "checkpoint; the process exits with status %d (requeue and resume)",
                step if step is not None else "?",
                PREEMPTED_EXIT_CODE,
            )
    return stop
