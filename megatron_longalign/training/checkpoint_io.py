"""Low-level sharded checkpoint I/O: megatron-core dist_checkpointing in torch_dist format.

Saves are synchronous, in the calling process, through
`megatron_compat.SyncTorchDistSaveStrategy` (megatron-core 0.16.1's default torch_dist
writer forks writer processes and hangs without psutil; see megatron_compat.py, section
2). The result is megatron's own torch_dist checkpoint: megatron's default load
strategy reads it on GPU or CPU, and it reshards to any TP/PP layout.
"""

from __future__ import annotations

import logging
from pathlib import Path

from megatron.core import dist_checkpointing

from megatron_longalign.megatron_compat import SyncTorchDistSaveStrategy


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
