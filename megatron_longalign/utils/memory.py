"""Peak resident memory of this process.

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


def peak_rss_bytes() -> int:
    """Peak resident set size of this process in bytes (VmHWM on Linux; ru_maxrss
    elsewhere, where it is the best there is)."""
    if _STATUS.is_file():
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB else
