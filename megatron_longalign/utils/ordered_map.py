"""Ordered, bounded parallel map over a stream.

`multiprocessing.Pool.imap` feeds its workers from a background thread that reads the
whole input iterator as fast as it can, so memory grows with the input. Here at most
`max_in_flight` items are submitted and not yet consumed at any time, which keeps memory
flat for inputs far larger than RAM. Results come back in input order, so the output is
the same for any worker count.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def ordered_map(
    fn: Callable[[T], R],
    items: Iterable[T],
    workers: int,
    initializer: Callable[..., Any] | None = None,
    initargs: tuple = (),
    max_in_flight: int | None = None,
) -> Iterator[R]:
    """Yield fn(item) for each item, in order. `fn` and `initializer` must be picklable
    (module-level) when workers > 1; with workers <= 1 everything runs in this process."""
    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        for item in items:
            yield fn(item)
        return
    limit = max_in_flight or 2 * workers
    # spawn, not fork: the parent may hold torch/OpenMP threads that fork would copy
    # in an undefined state.
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=initializer, initargs=initargs) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.apply_async(fn, (item,)))
            if len(pending) >= limit:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
