"""Position ids for packed documents: per-document restart, or SkipAlign skips.

By default every packed document gets positions 0..L-1 (`document_position_ids`).

SkipAlign makes a SHORT sample look like it spans a long context: the sample is cut into
segments at turn and context/question boundaries (read from its regions, see
docs/DATA_FORMAT.md), positions stay contiguous inside a segment and jump forward between
segments. Offsets follow PoSE: k boundaries, slack S = target_context_length - length, draw
k integers uniformly from {0..S}, sort them, and shift segment j by the j-th smallest. The
largest position is then at most length - 1 + S = target_context_length - 1.

Everything random comes from a per-sample generator (`sample_rng`) seeded by
(seed, epoch, sample id), so a resumed run reproduces the same positions. The exact rules
are documented in docs/SKIPALIGN.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from megatron_longalign.config.data import BOUNDARY_KINDS, SkipAlignConfig
from megatron_longalign.data.templates import RegionKind

POSITION_DTYPE = np.int64

# Mixed into every per-sample seed so the SkipAlign stream never coincides with another
# component that also seeds from (seed, epoch, some index), e.g. the batch planner.
_SKIPALIGN_STREAM = 0x5C1BA11
_TEMPLATE = int(RegionKind.TEMPLATE)
_CONTEXT = int(RegionKind.CONTEXT)
_USER = int(RegionKind.USER)


def skipalign_problems(config: SkipAlignConfig, prefix: str = "skipalign.") -> list[str]:
    """What is wrong with `config` (empty when nothing), naming the field (`prefix`: the
    start-up validator passes "data.skipalign.") and what to change."""
    problems = []
    if not _is_int(config.target_context_length) or config.target_context_length < 2:
        problems.append(
            f"{prefix}target_context_length must be an integer >= 2 (the context length "
            f"SkipAlign should simulate, e.g. 65536); got {config.target_context_length!r}"
        )
    if (
        isinstance(config.probability, bool)
        or not isinstance(config.probability, (int, float))
        or not math.isfinite(config.probability)
        or not 0.0 <= config.probability <= 1.0
    ):
        problems.append(
            f"{prefix}probability must be a number in [0, 1] (the fraction of samples that "
            f"get skips); got {config.probability!r}"
        )
    if not _is_int(config.min_segment_tokens) or config.min_segment_tokens < 1:
        problems.append(
            f"{prefix}min_segment_tokens must be an integer >= 1; got {config.min_segment_tokens!r}"
        )
    problems += _boundary_problems(config.boundaries, prefix + "boundaries")
    if config.enabled and not config.boundaries:
        problems.append(
            f"{prefix}boundaries is empty, so no sample would ever get a skip; list at "
            f"least one of {BOUNDARY_KINDS} or set {prefix}enabled=false"
        )
    return problems


def _is_int(value: object) -> bool:
    # bool is an int subclass, but `target_context_length: true` is certainly a mistake.
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _boundary_problems(boundaries: Sequence[str], what: str = "boundaries") -> list[str]:
    # A bare string would otherwise be iterated character by character.
    if isinstance(boundaries, str):
        return [f"{what} must be a list of names, e.g. [{boundaries!r}], not a string"]
    unknown = [name for name in boundaries if name not in BOUNDARY_KINDS]
    if unknown:
        return [f"{what}: unknown boundary kind(s) {unknown}; choose from {BOUNDARY_KINDS}"]
    return []


def _check_boundaries(boundaries: Sequence[str], what: str = "boundaries") -> None:
    problems = _boundary_problems(boundaries, what)
    if problems:
        raise ValueError(problems[0])


def _check_regions(regions: np.ndarray) -> np.ndarray:
    regions = np.asarray(regions)
    if regions.ndim != 2 or regions.shape[1] != 3:
        raise ValueError(
            f"regions must have shape (R, 3) of (start, end, kind); got {regions.shape}"
        )
    regions = regions.astype(np.int64, copy=False)
    if len(regions):
        starts, ends = regions[:, 0], regions[:, 1]
        # Boundaries are read from region starts, so a gap or overlap would misplace them.
        if starts[0] != 0 or (ends <= starts).any() or (starts[1:] != ends[:-1]).any():
            raise ValueError(
                "regions must tile [0, length) in order with non-empty rows "
                "(first start 0, each start = previous end)"
            )
    return regions


def _turn_starts(regions: np.ndarray) -> np.ndarray:
    starts, kinds = regions[:, 0], regions[:, 2]
    prev, cur = kinds[:-1], kinds[1:]
    content = cur != _TEMPLATE
    # Scaffolding that introduces a content ("[INST] ", "<|im_start|>user\n") starts the
    # segment of that content, so the boundary is the start of the template row before it.
    after_template = starts[:-1][content & (prev == _TEMPLATE)]
    # Templates without scaffolding between turns (plain: "...A1</s>Q2") put two contents of
    # different turns side by side; CONTEXT -> USER is one turn and belongs to "context".
    same_turn = (prev == _CONTEXT) & (cur == _USER)
    after_content = starts[1:][content & (prev != _TEMPLATE) & ~same_turn]
    return np.concatenate([after_template, after_content])


def _context_starts(regions: np.ndarray) -> np.ndarray:
    kinds = regions[:, 2]
    return regions[1:, 0][(kinds[:-1] == _CONTEXT) & (kinds[1:] == _USER)]


def _enforce_min_segment(starts: np.ndarray, length: int, min_tokens: int) -> np.ndarray:
    if min_tokens <= 1:
        return starts  # every candidate is a region start, so segments are never empty
    kept: list[int] = []
    previous = 0
    for start in starts.tolist():
        # Keeping `start` must leave both the segment before it and the rest long enough;
        # checking the rest here means the last segment never needs a second pass.
        if start - previous >= min_tokens and length - start >= min_tokens:
            kept.append(start)
            previous = start
    return np.asarray(kept, dtype=POSITION_DTYPE)


def segment_starts(
    regions: np.ndarray, boundaries: Sequence[str], min_segment_tokens: int = 1
) -> np.ndarray:
    """Token offsets (sorted, unique, excluding 0) where a new segment starts.

    `boundaries` names the rules to apply ("turn", "context"); boundaries that would make a
    segment shorter than `min_segment_tokens` are dropped greedily from left to right.
    """
    _check_boundaries(boundaries)
    regions = _check_regions(regions)
    if len(regions) < 2:
        return np.zeros(0, dtype=POSITION_DTYPE)
    found = [np.zeros(0, dtype=POSITION_DTYPE)]
    if "turn" in boundaries:
        found.append(_turn_starts(regions))
    if "context" in boundaries:
        found.append(_context_starts(regions))
    starts = np.unique(np.concatenate(found)).astype(POSITION_DTYPE)
    starts = starts[starts > 0]
    return _enforce_min_segment(starts, int(regions[-1, 1]), min_segment_tokens)


def skipalign_position_ids(
    length: int, regions: np.ndarray, config: SkipAlignConfig, rng: np.random.Generator
) -> np.ndarray:
    """int64 (length,) position ids, with PoSE-style skips at segment boundaries.

    Returns arange(length) when SkipAlign is disabled, the sample has no boundary, it is
    already at least `target_context_length` long, or it is not selected by `probability`.
    """
    positions = np.arange(length, dtype=POSITION_DTYPE)
    if not config.enabled:
        return positions
    regions = np.asarray(regions)
    if len(regions) and int(regions[-1, 1]) != length:
        raise ValueError(f"regions end at {int(regions[-1, 1])} but the sample has {length} tokens")
    starts = segment_starts(regions, config.boundaries, config.min_segment_tokens)
    slack = config.target_context_length - length
    if slack <= 0 or len(starts) == 0:
        return positions
    # Draw the selection first and always, so a sample's offsets do not depend on
    # `probability`: raising it only adds samples, it never changes selected ones.
    if rng.random() >= config.probability:
        return positions
    offsets = np.sort(rng.integers(0, slack, size=len(starts), endpoint=True))
    # Segment j is shifted by offsets[j-1]; write the increments at the boundaries and
    # accumulate, which keeps positions contiguous inside each segment.
    increments = np.zeros(length, dtype=POSITION_DTYPE)
    increments[starts] = np.diff(offsets, prepend=0)
    return positions + np.cumsum(increments)


def sample_rng(seed: int, epoch: int, sample_id: int) -> np.random.Generator:
    """Deterministic generator for one sample's SkipAlign draws in one epoch.

    Re-drawn each epoch, so a sample sees different skips across epochs, and a resumed run
    (same seed, epoch, sample id) sees exactly the same ones.
    """
    for name, value in (("seed", seed), ("epoch", epoch), ("sample_id", sample_id)):
        if not _is_int(value) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer; got {value!r}")
    entropy = [int(seed), int(epoch), int(sample_id), _SKIPALIGN_STREAM]
    return np.random.default_rng(np.random.SeedSequence(entropy))


def document_position_ids(lengths: Sequence[int]) -> np.ndarray:
    """Default packed positions: arange(L) for each document, concatenated (int64)."""
    lengths = np.asarray(lengths, dtype=POSITION_DTYPE).reshape(-1)
    if (lengths < 0).any():
        raise ValueError(f"document lengths must be >= 0; got {lengths.tolist()}")
    document_starts = np.cumsum(lengths) - lengths
    total = int(lengths.sum())
    return np.arange(total, dtype=POSITION_DTYPE) - np.repeat(document_starts, lengths)
