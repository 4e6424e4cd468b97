"""Bin packing of samples (known token lengths) into packs of at most `capacity` tokens.

A pack becomes one packed training sequence: its samples are concatenated and attention
stays inside each sample (per-document `cu_seqlens`), so the only cost of packing is the
padding that fills each pack up to `capacity`. Three algorithms:

- ``next_fit``: LongAlign's. One open pack, in `order`; a sample that does not fit closes
  it. O(n). Keeps the data order (packs are contiguous runs of `order`), wastes the most.
  Unlike LongAlign's code, the last partial pack is kept: we never drop data.
- ``first_fit_decreasing``: longest sample first, each into the lowest-index pack with
  room. O(n log n) with a max-segment tree over pack indices.
- ``best_fit_decreasing``: longest sample first, each into the pack with the least room
  that still fits. O(n log n) with a segment tree over remaining-room values. Among equally
  tight packs it takes the one that reached that room last: such packs are interchangeable
  for every later decision, so the pack count and pack sizes do not depend on this.

The decreasing variants process samples by decreasing length, ties broken by position in
`order`, so a seeded shuffle in `order` still decides which equal-length samples go
together. Pack index = the order in which packs were opened; members keep insertion order.

The decreasing variants also use O(capacity) memory (a counting sort by length, and best
fit's tree over room values): a few MB at 131072 tokens.

The hot loops are numba kernels, compiled on first call (and cached on disk), never at
import.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from megatron_longalign.config.data import PACKING_ALGORITHMS


@dataclass(frozen=True)
class Packs:
    """CSR layout: pack p holds sample indices members[offsets[p]:offsets[p+1]].

    The arrays are read-only."""

    members: np.ndarray  # int64, sample indices, grouped by pack, each pack in insertion order
    offsets: np.ndarray  # int64, shape (num_packs + 1,), offsets[0] == 0
    sizes: np.ndarray  # int64, shape (num_packs,), tokens in each pack (sum of member lengths)
    capacity: int

    @property
    def num_packs(self) -> int:
        return int(self.sizes.shape[0])

    def pack(self, p: int) -> np.ndarray:
        """Member sample indices of pack p, in insertion order."""
        if not 0 <= p < self.num_packs:
            raise IndexError(f"pack {p} out of range: there are {self.num_packs} packs")
        return self.members[self.offsets[p] : self.offsets[p + 1]]

    def efficiency(self) -> float:
        """Real tokens over the tokens of all packs (1 - padding share); 1.0 if no packs."""
        if self.num_packs == 0:
            return 1.0
        return float(self.sizes.sum()) / (self.num_packs * self.capacity)


def pack_samples(
    lengths: np.ndarray, capacity: int, algorithm: str, order: np.ndarray | None = None
) -> Packs:
    """Pack samples of the given token lengths into packs of at most `capacity` tokens.

    `order` is a permutation of range(len(lengths)) giving the processing order (e.g. a
    seeded shuffle); it defaults to the identity. See the module docstring for the
    algorithms. Raises ValueError for a length outside [1, capacity], a bad `order` or an
    unknown algorithm. The output depends only on the inputs.
    """
    if algorithm not in PACKING_ALGORITHMS:
        raise ValueError(
            f"unknown packing algorithm {algorithm!r}; choose one of {', '.join(PACKING_ALGORITHMS)}"
        )
    capacity = _check_capacity(capacity)
    lengths = _check_lengths(lengths, capacity)
    order = _check_order(order, lengths.shape[0])
    if lengths.shape[0] == 0:
        return _make_packs(
            np.zeros(0, np.int64), np.zeros(1, np.int64), np.zeros(0, np.int64), capacity
        )
    if algorithm == "next_fit":
        sequence = order
        pack_of, num_packs = _next_fit(lengths, sequence, capacity)
    else:
        sequence = _decreasing(lengths, order, capacity)
        kernel = _first_fit if algorithm == "first_fit_decreasing" else _best_fit
        pack_of, num_packs = kernel(lengths, sequence, capacity)
    members, offsets, sizes = _group_by_pack(lengths, sequence, pack_of, num_packs)
    return _make_packs(members, offsets, sizes, capacity)


# --- input checks -------------------------------------------------------------------------


def _check_capacity(capacity: int) -> int:
    if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)):
        raise TypeError(f"capacity must be an integer number of tokens, got {capacity!r}")
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1 token, got {capacity}")
    return int(capacity)


def _check_lengths(lengths: np.ndarray, capacity: int) -> np.ndarray:
    arr = np.asarray(lengths)
    if arr.ndim != 1:
        raise ValueError(f"lengths must be a 1-D array, got shape {arr.shape}")
    if arr.shape[0] == 0:
        # An empty list arrives as float64; there is nothing to check.
        return np.zeros(0, np.int64)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"lengths must be integers (token counts), got dtype {arr.dtype}")
    # Compared in the input dtype, before any cast could wrap a huge unsigned value.
    bad = np.flatnonzero((arr < 1) | (arr > capacity))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"sample {i} has length {int(arr[i])}, outside [1, {capacity}] (the pack capacity). "
            "Drop or truncate over-long samples (and drop empty ones) at preprocessing, e.g. "
            f"tools/preprocess.py --max-length {capacity} --on-overlength drop|truncate-middle"
        )
    # Contiguous int64 for every caller, so numba compiles one specialisation only.
    return np.ascontiguousarray(arr, dtype=np.int64)


def _check_order(order: np.ndarray | None, n: int) -> np.ndarray:
    if order is None:
        return np.arange(n, dtype=np.int64)
    arr = np.asarray(order)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"order must be a permutation of range({n}), got shape {arr.shape}")
    if n == 0:
        return np.zeros(0, np.int64)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"order must hold integer sample indices, got dtype {arr.dtype}")
    if arr.min() < 0 or arr.max() >= n:
        raise ValueError(
            f"order must be a permutation of range({n}), but holds values in "
            f"[{int(arr.min())}, {int(arr.max())}]"
        )
    arr = np.ascontiguousarray(arr, dtype=np.int64)
    missing = np.flatnonzero(np.bincount(arr, minlength=n) == 0)
    if missing.size:
        raise ValueError(
            f"order must be a permutation of range({n}), but sample {int(missing[0])} is "
            "missing (and another is repeated)"
        )
    return arr


def _make_packs(
    members: np.ndarray, offsets: np.ndarray, sizes: np.ndarray, capacity: int
) -> Packs:
    # Read-only, so that a frozen Packs cannot be changed behind the planner's back.
    for arr in (members, offsets, sizes):
        arr.flags.writeable = False
    return Packs(members=members, offsets=offsets, sizes=sizes, capacity=capacity)


# --- numba kernels ------------------------------------------------------------------------
# Each packing kernel walks `sequence` (sample indices in processing order) and returns
# pack_of[k], the pack of sequence[k], plus the number of packs; _group_by_pack turns that
# into the CSR layout. Packs are numbered in the order they are opened.


@numba.njit(cache=True)
def _decreasing(lengths, order, capacity):
    """`order` stably sorted by decreasing length: ties keep their position in `order`.

    A counting sort on the key capacity - length: O(n + capacity), and ~8x faster than
    numpy's stable argsort at 1M samples, since lengths are bounded by the capacity."""
    n = order.shape[0]
    start = np.zeros(capacity + 2, np.int64)
    for k in range(n):
        start[capacity - lengths[order[k]] + 1] += 1
    for key in range(capacity + 1):
        start[key + 1] += start[key]
    sequence = np.empty(n, np.int64)
    for k in range(n):
        key = capacity - lengths[order[k]]
        sequence[start[key]] = order[k]
        start[key] += 1
    return sequence


@numba.njit(cache=True)
def _next_fit(lengths, sequence, capacity):
    n = sequence.shape[0]
    pack_of = np.empty(n, np.int64)
    pack = -1
    room = 0  # no pack is open yet, so the first sample opens one
    for k in range(n):
        size = lengths[sequence[k]]
        if size > room:
            pack += 1
            room = capacity
        room -= size
        pack_of[k] = pack
    return pack_of, pack + 1


@numba.njit(cache=True)
def _first_fit(lengths, sequence, capacity):
    n = sequence.shape[0]
    leaves = 1
    while leaves < n:  # there are never more packs than samples
        leaves *= 2
    # tree[leaves + p] is the room left in pack p, inner nodes the max of their children.
    # Packs not yet opened count as empty packs: the leftmost leaf with enough room is then
    # either an open pack or exactly the next pack to open, so opening needs no special case.
    tree = np.full(2 * leaves, capacity, np.int64)
    pack_of = np.empty(n, np.int64)
    num_packs = 0
    for k in range(n):
        size = lengths[sequence[k]]
        node = 1
        while node < leaves:  # descend to the leftmost leaf with room >= size
            node *= 2
            if tree[node] < size:
                node += 1
        pack = node - leaves
        pack_of[k] = pack
        if pack == num_packs:
            num_packs += 1
        tree[node] -= size
        node //= 2
        while node >= 1:
            best = max(tree[2 * node], tree[2 * node + 1])
            if tree[node] == best:  # unchanged here means unchanged above
                break
            tree[node] = best
            node //= 2
    return pack_of, num_packs


@numba.njit(cache=True)
def _tree_add(tree, leaves, leaf, delta):
    node = leaves + leaf
    while node >= 1:
        tree[node] += delta
        node //= 2


@numba.njit(cache=True)
def _first_nonzero_from(tree, leaves, start):
    """Smallest leaf >= start with a nonzero count, or -1: climb right, then descend."""
    node = leaves + start
    while tree[node] == 0:
        while node & 1:  # a right child: its right neighbour range starts above its parent
            node //= 2
        if node == 0:  # climbed past the root: nothing to the right
            return -1
        node += 1
    while node < leaves:
        node *= 2
        if tree[node] == 0:
            node += 1
    return node - leaves


@numba.njit(cache=True)
def _best_fit(lengths, sequence, capacity):
    n = sequence.shape[0]
    leaves = 1
    while leaves < capacity + 1:
        leaves *= 2
    # Leaf r counts the open packs with exactly r tokens of room; the tightest fit for a
    # sample of size s is the smallest r >= s with a nonzero count.
    count = np.zeros(2 * leaves, np.int64)
    # The packs with room r form a stack (a linked list through `below`). Which one of
    # them is taken does not matter: packs with equal room are interchangeable later on.
    top = np.full(capacity + 1, -1, np.int64)
    below = np.empty(n, np.int64)
    pack_of = np.empty(n, np.int64)
    num_packs = 0
    for k in range(n):
        size = lengths[sequence[k]]
        room = _first_nonzero_from(count, leaves, size)
        if room < 0:
            pack = num_packs
            num_packs += 1
            room = capacity
        else:
            pack = top[room]
            top[room] = below[pack]
            _tree_add(count, leaves, room, -1)
        pack_of[k] = pack
        room -= size
        if room > 0:  # a full pack can never take another sample: keep it out of the tree
            below[pack] = top[room]
            top[room] = pack
            _tree_add(count, leaves, room, 1)
    return pack_of, num_packs


@numba.njit(cache=True)
def _group_by_pack(lengths, sequence, pack_of, num_packs):
    """CSR members/offsets/sizes; a counting sort, stable, so insertion order is kept."""
    n = sequence.shape[0]
    offsets = np.zeros(num_packs + 1, np.int64)
    sizes = np.zeros(num_packs, np.int64)
    for k in range(n):
        offsets[pack_of[k] + 1] += 1
        sizes[pack_of[k]] += lengths[sequence[k]]
    for p in range(num_packs):
        offsets[p + 1] += offsets[p]
    fill = offsets[:-1].copy()
    members = np.empty(n, np.int64)
    for k in range(n):
        pack = pack_of[k]
        members[fill[pack]] = sequence[k]
        fill[pack] += 1
    return members, offsets, sizes
