"""Resident memory of this process (peak and current), and the machine's available memory.

Not `resource.getrusage(RUSAGE_SELF).ru_maxrss` on Linux: the kernel carries it across
fork + exec (CPython's subprocess uses vfork), so a child started by a large parent
reports the parent's peak as its own: a child of a 1.5 GB process printed 1.44 GB while
its own peak was 14 MB. `VmHWM` in /proc/self/status belongs to the exec'd address space.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_MEMINFO = Path("/proc/meminfo")


def _kib_field(path: Path, name: str) -> int | None:
    """The `name:` line of a /proc file in bytes (its values are kB), or None."""
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.startswith(f"{name}:"):
                return int(line.split()[1]) * 1024
    return None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process in bytes (VmHWM on Linux; ru_maxrss
    elsewhere, where it is the best there is)."""
    peak = _kib_field(_STATUS, "VmHWM")
    if peak is not None:
        return peak
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB else


def current_rss_bytes() -> int:
    """Resident set size of this process now (VmRSS; Linux only)."""
    rss = _kib_field(_STATUS, "VmRSS")
    if rss is None:
        raise OSError(f"{_STATUS} has no VmRSS: current RSS is read on Linux only")
    return rss


def reset_peak_rss() -> None:
    """Set the peak (VmHWM) to the current RSS, so a later `peak_rss_bytes` measures
    only what follows (Linux: writing 5 to /proc/self/clear_refs)."""
    _CLEAR_REFS.write_text("5")


def available_memory_bytes() -> int:
    """MemAvailable of the machine in bytes (0 where /proc/meminfo is missing)."""
    return _kib_field(_MEMINFO, "MemAvailable") or 0
