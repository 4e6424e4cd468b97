"""Signal names as the config writes them (`train.preemption_signals`)."""

from __future__ import annotations

import signal


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
