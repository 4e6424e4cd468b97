"""Fixtures shared by the in-process Trainer tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="module")
def distributed_teardown() -> Iterator[None]:
    """Every Trainer joins (or re-seeds) the single-process job; at the end of the module
    that uses this (`pytestmark = pytest.mark.usefixtures("distributed_teardown")`),
    leave nothing behind for other test modules and packages."""
    yield
    from megatron_longalign.parallel.distributed import destroy_distributed

    destroy_distributed()
