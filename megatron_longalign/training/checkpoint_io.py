"""Low-level sharded checkpoint I/O: megatron-core dist_checkpointing in torch_dist format.

Why not `dist_checkpointing.save` with its default strategy: the default torch_dist
strategy writes through `FileSystemWriterAsync`, even for a synchronous save. It starts
a `multiprocessing.Manager` (a spawned process) and forks one writer process per file
bucket. Each writer calls `_process_memory()` before its try block, and that raises when
psutil is missing (megatron-core does not depend on it). The writer then dies without
marking its queue task done, and the parent waits in `JoinableQueue.join()` forever.
That was the "hang on CPU". Forking a process that runs gloo threads is fragile in any
case.

`SyncTorchDistSaveStrategy` keeps megatron's translation to PyTorch distributed
checkpoint (DCP) objects and megatron's save planner. It writes with PyTorch's own
synchronous `FileSystemWriter`, in the calling process, with no extra processes. The
result is the same torch_dist checkpoint: `metadata.json` (backend torch_dist,
version 1), `common.pt`, DCP `.metadata` and `__<rank>_<i>.distcp` files. Megatron's
default load strategy reads it on GPU or CPU, and it reshards to any TP/PP layout.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint import FileSystemWriter

_BACKEND = "torch_dist"
_VERSION = 1


class SyncTorchDistSaveStrategy(TorchDistSaveShardedStrategy):
    """torch_dist save, written synchronously by PyTorch's FileSystemWriter."""

    def __init__(self, thread_count: int = 2) -> None:
        super().__init__(_BACKEND, _VERSION, keep_only_main_replica=True, thread_count=thread_count)

    def save(self, sharded_state_dict, checkpoint_dir) -> None:
        # Same translation as the parent's async_save: key each tensor by its global
        # sharded key and keep only main replicas, so the files match the async writer's.
        sharded_state_dict, _, _ = _replace_state_dict_keys_with_sharded_keys(
            sharded_state_dict, self.keep_only_main_replica
        )
        pyt_state_dict = mcore_to_pyt_state_dict(sharded_state_dict, False)
        torch.distributed.checkpoint.save(
            pyt_state_dict,
            storage_writer=FileSystemWriter(
                str(checkpoint_dir), thread_count=self.thread_count, sync_files=True
            ),
            planner=MCoreSavePlanner(
                dedup_replicated_tensors=not self.keep_only_main_replica,
                flatten_state_dict=False,
            ),
        )


def save_sharded(sharded_state_dict: dict, directory: str | Path) -> None:
    """Save a megatron sharded state dict (e.g. `model.sharded_state_dict()`) to
    `directory` in torch_dist format. Collective: every rank calls it, and it returns
    when the checkpoint is complete on disk."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)  # megatron expects it to exist
    dist_checkpointing.save(
        sharded_state_dict,
        str(directory),
        sharded_strategy=SyncTorchDistSaveStrategy(),
        async_sharded_save=False,
    )


def load_sharded(sharded_state_dict: dict, directory: str | Path) -> dict:
    """Load `directory` into the layout `sharded_state_dict` describes (which may differ
    from the layout it was saved with). Collective. Returns a state dict of this rank's
    tensors for `module.load_state_dict`. Errors propagate (the caller names the
    checkpoint); torch's own traceback-printing warning about unreadable DCP metadata
    is dropped (see `_DropMetadataFallbackWarnings`)."""
    directory = Path(directory)
    if not (directory / "metadata.json").is_file():
        raise FileNotFoundError(f"{directory} is not a complete dist checkpoint (no metadata.json)")
    root = logging.getLogger()
    drop = _DropMetadataFallbackWarnings()
    root.addFilter(drop)
    try:
        return dist_checkpointing.load(sharded_state_dict, str(directory))
    finally:
        root.removeFilter(drop)


class _DropMetadataFallbackWarnings(logging.Filter):
    """torch's DCP loader logs "Global metadata is not found. Falling back to rank local
    metadata." with exc_info on the root logger when `.metadata` cannot be read (e.g. it
    is damaged): a full traceback before the error the load raises anyway. We always
    write global metadata, so the fallback never helps; drop those records."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.levelno == logging.WARNING
            and "torch/distributed/checkpoint" in record.pathname.replace("\\", "/")
            and "metadata is not found" in record.getMessage()
        )
