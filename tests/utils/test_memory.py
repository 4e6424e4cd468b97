"""utils/memory.py against what the process really does: a touched buffer raises the
current and peak RSS by its size, freeing it lowers the current one only, and a reset
brings the peak back down to the current RSS."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from megatron_longalign.utils.memory import (
    available_memory_bytes,
    current_rss_bytes,
    peak_rss_bytes,
    reset_peak_rss,
)

SIZE = 256 * 2**20

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc (Linux)")


def test_peak_current_and_reset_follow_a_buffer():
    reset_peak_rss()
    before = current_rss_bytes()
    buffer = np.ones(SIZE, dtype=np.uint8)  # touched: resident, not just reserved
    held = current_rss_bytes()
    assert held - before >= 0.9 * SIZE
    del buffer  # numpy returns a buffer this large to the OS (mmap)
    assert current_rss_bytes() < held - 0.9 * SIZE
    assert peak_rss_bytes() >= before + 0.9 * SIZE  # the peak remembers it
    reset_peak_rss()
    assert peak_rss_bytes() < held - 0.9 * SIZE


def test_available_memory_is_some_of_the_machine():
    available = available_memory_bytes()
    assert 0 < available < 2**50
