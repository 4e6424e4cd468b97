"""What to do with samples longer than `--max-length` tokens.

- ``drop``: skip the sample (counted, and listed in P.rejects.jsonl).
- ``truncate-left``: keep the last `max_length` tokens (the final answer survives).
- ``truncate-middle``: keep the first max_length//2 and the last max_length - max_length//2
  tokens, cutting out the middle of the (usually long-context) prompt, as LongBench does.
- ``error``: stop with an error naming the file and line.

Regions are cut with the tokens, so the loss mask stays aligned. A truncated sample that
has no target token left is dropped with reason ``no_target_after_truncation``.
"""

from __future__ import annotations

import numpy as np

from megatron_longalign.data.encoding import REGION_DTYPE, EncodedSample

OVERLENGTH_POLICIES = ("drop", "truncate-left", "truncate-middle", "error")


def kept_ranges(length: int, max_length: int, policy: str) -> list[tuple[int, int]]:
    """Half-open token ranges of the original sample that survive truncation."""
    if policy == "truncate-left":
        return [(length - max_length, length)]
    if policy == "truncate-middle":
        head = max_length // 2
        return [(0, head), (length - (max_length - head), length)]
    raise ValueError(f"{policy!r} does not truncate")


def truncate(sample: EncodedSample, max_length: int, policy: str) -> EncodedSample:
    ranges = kept_ranges(len(sample), max_length, policy)
    tokens = np.concatenate([sample.tokens[a:b] for a, b in ranges])
    regions: list[list[int]] = []
    offset = 0
    for keep_start, keep_end in ranges:
        for start, end, kind in sample.regions.tolist():
            lo, hi = max(start, keep_start), min(end, keep_end)
            if lo >= hi:
                continue
            new_start, new_end = lo - keep_start + offset, hi - keep_start + offset
            if regions and regions[-1][2] == kind and regions[-1][1] == new_start:
                regions[-1][1] = new_end
            else:
                regions.append([new_start, new_end, kind])
        offset += keep_end - keep_start
    return EncodedSample(tokens, np.asarray(regions, dtype=REGION_DTYPE).reshape(-1, 3))
