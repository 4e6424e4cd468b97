"""Train, checkpoint with CheckpointManager, and resume (tests/training/test_checkpoint_manager_resume.py).

--action first: seed, build the tiny GPT (weights seed 7), train steps 1 and 2 saving
    after each, draw from every RNG, train steps 3 and 4 recording losses and the final
    weights. With --crash-save, then save step 4 with rank 0 SIGKILLed after the temp
    dir is complete, just before the rename (the launch then fails on purpose).
--action resume: seed differently, build with other weights (seed 8), load --load-path
    (default: the manager's latest), draw from every RNG, and train the next 2 steps.
    With --resave-root, first save the just-loaded state there (in this layout); with
    --save-at-end, save after the 2 steps.

Full weights are written by global rank 0 only (they are gathered over TP and equal on
every DP rank).
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

import torch

from megatron_longalign.data.planner import PlanPosition
from megatron_longalign.training import checkpoint
from megatron_longalign.training.checkpoint import CheckpointManager, TrainingState
from tests.helpers.checkpoint_training import (
    build_training,
    full_tensors,
    random_draws,
    seed_host_rngs,
    setup,
    train_step,
    write_rank_result,
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--action", choices=["first", "resume"], required=True)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--keep-last", type=int, default=3)
    parser.add_argument("--format", default=checkpoint.DEFAULT_OPTIMIZER_FORMAT)
    parser.add_argument("--crash-save", action="store_true")
    parser.add_argument("--load-path", type=Path)
    parser.add_argument("--resave-root", type=Path)
    parser.add_argument("--save-at-end", action="store_true")
    return parser.parse_args()


def training_state(step: int) -> TrainingState:
    return TrainingState(
        step=step,
        consumed_samples=4 * step,
        plan_position=PlanPosition(epoch=0, step=step),
        extra={"run_id": "run-abc", "config_hash": "c0ffee"},
    )


def weights(training) -> dict | None:
    """Full weights on global rank 0, None elsewhere (collective over TP)."""
    full = full_tensors(training[0][0].module)
    return full if torch.distributed.get_rank() == 0 else None


def first(args, manager: CheckpointManager) -> None:
    setup(args.tp, seed=1234)
    seed_host_rngs(1)
    training = build_training(weight_seed=7)
    result = {"losses_before": []}
    for step in (1, 2):
        result["losses_before"].append(train_step(*training, step))
        manager.save(training_state(step), *training)
    result["saved_params"] = weights(training)
    result["draws"] = random_draws()
    result["losses"] = [train_step(*training, step) for step in (3, 4)]
    result["params"] = weights(training)
    write_rank_result(args.out, result)
    if args.crash_save:
        kill_rank0_before_rename()
        manager.save(training_state(4), *training)


def kill_rank0_before_rename() -> None:
    """Rank 0 dies by SIGKILL once the temp dir is complete, before the rename."""

    def killed(temp_dir: Path, final_dir: Path) -> None:
        assert (temp_dir / checkpoint.MARKER).is_file() and not final_dir.exists()
        os.kill(os.getpid(), signal.SIGKILL)

    if torch.distributed.get_rank() == 0:
        checkpoint.publish = killed


def resume(args, manager: CheckpointManager) -> None:
    setup(args.tp, seed=4321)
    seed_host_rngs(2)
    training = build_training(weight_seed=8)
    path = args.load_path or manager.latest()
    state = manager.load(path, *training)
    result = {"loaded_path": str(path), "state": state.to_json()}
    result["loaded_params"] = weights(training)
    if args.resave_root:
        CheckpointManager(args.resave_root, optimizer_format=args.format).save(state, *training)
    result["draws"] = random_draws()
    steps = (state.step + 1, state.step + 2)
    result["losses"] = [train_step(*training, step) for step in steps]
    result["params"] = weights(training)
    if args.save_at_end:
        manager.save(training_state(steps[-1]), *training)
    write_rank_result(args.out, result)


def main() -> None:
    args = parse_args()
    manager = CheckpointManager(args.root, keep_last=args.keep_last, optimizer_format=args.format)
    (first if args.action == "first" else resume)(args, manager)


if __name__ == "__main__":
    main()
