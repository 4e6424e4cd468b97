"""Structured config for the parallel layout (Hydra group `parallel`,
conf/parallel/*.yaml). The process groups themselves are built by
megatron_longalign/parallel/distributed.py; the rules a layout must satisfy are
`parallel_problems` there."""

from __future__ import annotations

from dataclasses import dataclass

CP_COMM_TYPES = ("p2p", "a2a", "all_gather", "a2a+p2p")


@dataclass
class ParallelConfig:
    """Model-parallel layout. The data-parallel size is what the world size leaves:
    world_size / (tensor * pipeline * context)."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = True
    # Transformer Engine's CP attention exchange (te backend only; flex and sdpa all-gather
    # K/V): p2p (ring, overlaps compute), all_gather, a2a (Ulysses-style, needs heads
    # divisible by CP), a2a+p2p (hierarchical; megatron also wants
    # hierarchical_context_parallel_sizes, not exposed here).
    cp_comm_type: str = "p2p"

    @property
    def ranks_per_replica(self) -> int:
        """Processes that hold one replica of the model (tp * pp * cp)."""
        return (
            self.tensor_model_parallel_size
            * self.pipeline_model_parallel_size
            * self.context_parallel_size
        )

    def data_parallel_size_for(self, world_size: int) -> int:
        """The data-parallel size this layout gives on `world_size` processes (a layout
        that passed `parallel_problems` for that world size)."""
        return world_size // self.ranks_per_replica
