"""The held-out split of `data.valid_fraction`: which training-source samples are kept
out of training for validation.

A sample is held out when a hash of (its index within its own dataset, a fixed salt),
read as a number in [0, 1), is below the fraction. The decision depends on nothing else:
not on data.seed, the data-parallel size, the mixture weights, the order of the sources
or the epoch, so every rank (and every later run on the same sets) agrees on the split,
and the training planner, which plans from the other samples only, never sees a held-out
one. Sample i of every source gets the same draw: the split of one source does not move
when another source is added.

The hash is SplitMix64's finaliser (Steele, Lea and Flood, "Fast splittable
pseudorandom number generators", OOPSLA 2014), vectorised in numpy's wrapping uint64
arithmetic; its top 53 bits give the number in [0, 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Fixed for good: changing it would move samples between the training and held-out sets
# of every existing run.
HOLDOUT_SALT = 0x4C6F6E67416C6967  # "LongAlig"

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def holdout_draw(indices: np.ndarray, salt: int = HOLDOUT_SALT) -> np.ndarray:
    """float64 in [0, 1) for each sample index (index within its dataset)."""
    with np.errstate(over="ignore"):
        z = (np.asarray(indices, dtype=np.uint64) + np.uint64(salt)) * _GOLDEN
        z ^= z >> np.uint64(30)
        z *= _MIX1
        z ^= z >> np.uint64(27)
        z *= _MIX2
        z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def held_out_mask(sizes: Sequence[int], fraction: float) -> np.ndarray:
    """bool per global sample id (datasets of `sizes` concatenated, as
    data/mixture.py numbers them): True for held-out samples."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"data.valid_fraction must be in [0, 1), got {fraction}")
    parts = [holdout_draw(np.arange(size, dtype=np.int64)) < fraction for size in sizes]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=bool)
