"""Two gloo ranks: LossByLength sums over the data-parallel group before rank 0 logs,
and MetricsLogger reads the rank from torch.distributed (only rank 0 writes)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_longalign.config.training import LoggingConfig, WandbConfig
from megatron_longalign.parallel.distributed import free_port
from megatron_longalign.training.logger import MetricsLogger
from megatron_longalign.training.metrics import LossByLength

# rank -> documents (length, target losses); rank 1 has no 512-1k document.
DOCS = {
    0: [(100, [1.0, 3.0]), (700, [4.0])],
    1: [(200, [8.0]), (5000, [6.0, 6.0])],
}


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        losses, weights, bounds = [], [], [0]
        for length, targets in DOCS[rank]:
            doc_losses, doc_weights = np.zeros(length), np.zeros(length)
            doc_losses[: len(targets)], doc_weights[: len(targets)] = targets, 1.0
            losses.append(doc_losses)
            weights.append(doc_weights)
            bounds.append(bounds[-1] + length)
        meter = LossByLength()
        meter.add(np.concatenate(losses), np.concatenate(weights), np.array(bounds))
        meter.all_reduce()
        stream = io.StringIO()
        logger = MetricsLogger(
            LoggingConfig(log_interval=1, wandb=WandbConfig(mode="disabled")), stream=stream
        )
        logger.log(1, {"train/loss": 1.0})
        logger.close()
        result = {"means": meter.means(), "rank": logger.rank, "console": stream.getvalue()}
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_loss_by_length_all_reduce_and_rank_zero_logging(tmp_path):
    # fork: the children reuse the imported torch instead of importing it again (CPU only).
    mp.start_processes(
        _worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork"
    )
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    expected = {
        "loss_by_len/0-512": (2.0 + 8.0) / 2,  # rank 0's doc (mean 2) and rank 1's (8)
        "loss_by_len/512-1k": 4.0,
        "loss_by_len/4k-8k": 6.0,
    }
    assert results[0]["means"] == expected == results[1]["means"]
    assert [r["rank"] for r in results] == [0, 1]
    assert results[0]["console"] == "step 1 | loss 1.0000\n"
    assert results[1]["console"] == ""
