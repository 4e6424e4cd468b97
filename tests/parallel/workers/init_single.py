"""initialize_distributed as a lone process (no torchrun variables): CPU mode, world
size 1, idempotent re-initialization, a layout change refused, destroy and re-init."""

from __future__ import annotations

import json
import sys

from megatron_longalign.config.parallel import ParallelConfig
from megatron_longalign.parallel.distributed import (
    data_parallel_rank,
    data_parallel_size,
    destroy_distributed,
    initialize_distributed,
    is_last_pipeline_stage,
)


def main() -> None:
    import torch

    initialize_distributed(ParallelConfig(), seed=5, cpu=None)  # auto: no CUDA here
    result = {
        "backend": torch.distributed.get_backend(),
        "world_size": torch.distributed.get_world_size(),
        "dp_rank": data_parallel_rank(),
        "dp_size": data_parallel_size(),
        "last_stage": is_last_pipeline_stage(),
    }
    first = torch.rand(3)
    initialize_distributed(ParallelConfig(), seed=5)  # same layout: re-seeds only
    result["reseeded_same_stream"] = torch.equal(first, torch.rand(3))
    try:
        initialize_distributed(ParallelConfig(tensor_model_parallel_size=2), seed=5)
        result["layout_change_error"] = None
    except RuntimeError as err:
        result["layout_change_error"] = str(err)
    destroy_distributed()
    result["destroyed"] = not torch.distributed.is_initialized()
    initialize_distributed(ParallelConfig(), seed=5)
    result["reinitialized"] = data_parallel_size() == 1
    destroy_distributed()
    with open(sys.argv[1], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
