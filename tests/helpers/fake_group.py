"""A stand-in for a torch.distributed process group where code only asks its size and
rank (megatron's get_pg_size / get_pg_rank, its THD RoPE), so single-process tests can
play any rank of a context-parallel group."""

from __future__ import annotations


class FakeGroup:
    def __init__(self, size: int, rank: int) -> None:
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank
