"""One single-process Trainer run with checkpoints, for the resume-after-SIGKILL test.

    python resume_run.py --data PREFIXES.json --ckpt DIR --losses FILE \
        [--steps 8] [--save-interval 3] [--hang-in-save STEP]

Every logged step appends {"step", "loss", "token_mean_loss", "grad_norm", "lr"} as one
JSON line to --losses (flushed and fsynced, so a SIGKILL loses nothing already
written); log_interval is 1. `train.resume=auto`: a relaunch continues from DIR/latest.
With --hang-in-save STEP, the save of STEP writes all its shards into its temp directory
and then stops before the commit (marker, rename, `latest`), printing "HANGING IN SAVE"
and sleeping until killed: a kill lands in the middle of a save. The resumed-from path
is printed as "RESUMED_FROM <path or None>".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

from tests.helpers.tiny_training import JsonLinesLogger, tiny_training_config

warnings.filterwarnings("ignore")


def hang_in_save(step: int) -> None:
    from megatron_longalign.training import checkpoint

    original = checkpoint.save_sharded

    def save_then_hang(sharded, directory):
        original(sharded, directory)
        if Path(directory).name.startswith(checkpoint.step_dir_name(step) + ".tmp-"):
            print("HANGING IN SAVE", directory, flush=True)
            while True:
                time.sleep(1)

    checkpoint.save_sharded = save_then_hang


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--losses", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--save-interval", type=int, default=3)
    parser.add_argument("--hang-in-save", type=int)
    args = parser.parse_args()
    if args.hang_in_save is not None:
        hang_in_save(args.hang_in_save)

    from megatron_longalign.parallel.distributed import destroy_distributed
    from megatron_longalign.training.trainer import Trainer

    prefixes = json.loads(args.data.read_text())
    config = tiny_training_config(
        prefixes,
        max_steps=args.steps,
        checkpoint_dir=str(args.ckpt),
        save_interval=args.save_interval,
        keep_last=2,
        resume="auto",
    )
    trainer = Trainer(config, metrics_logger=JsonLinesLogger(args.losses, "resume-test-run"))
    print("RESUMED_FROM", trainer.resumed_from, flush=True)
    trainer.train()
    print("DONE", trainer.state.step, flush=True)
    destroy_distributed()
    sys.exit(0)


if __name__ == "__main__":
    main()
