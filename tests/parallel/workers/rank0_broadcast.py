"""rank0_then_broadcast over 2 ranks (gloo, no megatron): rank 0's result reaches every
rank, the function runs on rank 0 only, and rank 0's exception is raised on every rank
with its type and message (an unpicklable one as a RuntimeError naming it)."""

from __future__ import annotations

import argparse
import json
import threading
from pathlib import Path

import torch

from megatron_longalign.parallel.distributed import rank0_then_broadcast


class Unpicklable(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()  # pickling fails


def outcome(fn) -> dict:
    try:
        return {"value": rank0_then_broadcast(fn)}
    except Exception as err:
        return {"error": type(err).__name__, "message": str(err)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    calls = []

    def compute():
        calls.append(rank)
        return {"from": rank, "path": "a/b"}

    def fail():
        raise FileExistsError(f"step_00000002 exists (raised on rank {rank})")

    def fail_unpicklable():
        raise Unpicklable("cannot travel")

    result = {
        "value": outcome(compute),
        "calls": calls,
        "error": outcome(fail),
        "unpicklable": outcome(fail_unpicklable),
    }
    # Every rank still takes part in the next collective.
    total = torch.tensor([1.0])
    torch.distributed.all_reduce(total)
    result["after"] = total.item()
    (args.out / f"rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
