"""The grid of a needle-in-a-haystack run: context lengths (tokens) x needle depths (%).

Lengths: an explicit list ("1k,2k,4k,32000"; "k" means 1000, so "64k" is 64000 tokens),
or `num` values evenly spaced from `min` to `max` (rounded to whole tokens), as
THUDM/LongAlign's np.linspace. Default: 1k to 64k, 10 lengths.

Depths: an explicit list of percentages in [0, 100], or `num` evenly spaced values from
`min` to `max`, rounded to whole percents (as LongAlign does). Default: 10% to 90%, 10
depths (10, 19, 28, 37, 46, 54, 63, 72, 81, 90), LongAlign's grid, so heatmaps compare
with the paper's; pass --min-depth 0 --max-depth 100 for the ends as well.
"""

from __future__ import annotations

import re

import numpy as np

DEFAULT_LENGTHS = (1000, 64000, 10)
DEFAULT_DEPTHS = (10.0, 90.0, 10)
_LENGTH = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kK]?)\s*$")


class GridError(ValueError):
    """A length or depth option is malformed; the message names the option."""


def parse_length(text: str, option: str = "--lengths") -> int:
    """ "8k" -> 8000, "1.5k" -> 1500, "700" -> 700."""
    match = _LENGTH.match(text)
    if not match:
        raise GridError(f"{option}: {text!r} is not a token count (e.g. 4000 or 4k)")
    value = float(match.group(1)) * (1000 if match.group(2) else 1)
    if value != int(value) or value <= 0:
        raise GridError(f"{option}: {text!r} is not a positive whole number of tokens")
    return int(value)


def length_grid(
    lengths: str | None = None,
    min_length: str | int | None = None,
    max_length: str | int | None = None,
    num_lengths: int | None = None,
) -> list[int]:
    """Sorted distinct context lengths in tokens."""
    if lengths:
        values = [parse_length(item) for item in lengths.split(",") if item.strip()]
        if not values:
            raise GridError("--lengths: no lengths given")
    else:
        low = _length_or_default(min_length, DEFAULT_LENGTHS[0], "--min-length")
        high = _length_or_default(max_length, DEFAULT_LENGTHS[1], "--max-length")
        count = DEFAULT_LENGTHS[2] if num_lengths is None else num_lengths
        if high < low:
            raise GridError(f"--max-length {high} is below --min-length {low}")
        if count < 1:
            raise GridError(f"--num-lengths must be at least 1, got {count}")
        values = [int(v) for v in np.round(np.linspace(low, high, count))]
    return sorted(set(values))


def _length_or_default(value: str | int | None, default: int, option: str) -> int:
    if value is None:
        return default
    return value if isinstance(value, int) else parse_length(str(value), option)


def depth_grid(
    depths: str | None = None,
    min_depth: float | None = None,
    max_depth: float | None = None,
    num_depths: int | None = None,
) -> list[float]:
    """Sorted distinct depths in percent, each in [0, 100]."""
    if depths:
        try:
            values = [float(item) for item in depths.split(",") if item.strip()]
        except ValueError:
            raise GridError(f"--depths: {depths!r} is not a list of percentages") from None
        option = "--depths"
    else:
        low = DEFAULT_DEPTHS[0] if min_depth is None else float(min_depth)
        high = DEFAULT_DEPTHS[1] if max_depth is None else float(max_depth)
        count = DEFAULT_DEPTHS[2] if num_depths is None else num_depths
        if count < 1:
            raise GridError(f"--num-depths must be at least 1, got {count}")
        if high < low:
            raise GridError(f"--max-depth {high:g} is below --min-depth {low:g}")
        values = [float(v) for v in np.round(np.linspace(low, high, count))]
        option = "--min-depth/--max-depth"
    if not values:
        raise GridError("--depths: no depths given")
    outside = [v for v in values if not 0 <= v <= 100]
    if outside:
        raise GridError(f"{option}: depths must be in [0, 100] percent, got {outside}")
    return sorted(set(values))


def case_key(length: int, depth: float) -> str:
    """The results.jsonl key of one cell: "len8000_depth37"."""
    return f"len{length}_depth{depth:g}"
