"""One single-process Trainer run that a test preempts with a signal, as the entry point
runs it: preemption handlers installed first, exit status PREEMPTED_EXIT_CODE when the
run stopped early (megatron_longalign/train.py does the same).

    python preempt_run.py --data PREFIXES.json --ckpt DIR --losses FILE --weights FILE \
        [--steps 8] [--step-sleep 0.3]

Every logged step appends {"step", <metrics>} as one JSON line to --losses (fsynced), and
sleeps --step-sleep seconds so a test can signal it mid-run. `train.resume=auto` with
save_interval 0: the only checkpoints are the preemption save and the end of the run. At
the end, the model's parameters go to --weights (torch.save) and "EXIT <status> STEP
<step>" is printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from tests.helpers.tiny_training import JsonLinesLogger, tiny_training_config

warnings.filterwarnings("ignore")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--losses", type=Path, required=True)
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--step-sleep", type=float, default=0.3)
    args = parser.parse_args()

    from megatron_longalign.training import preemption

    preemption.install()  # as train.py: before the Trainer is built

    import torch

    from megatron_longalign.parallel.distributed import destroy_distributed
    from megatron_longalign.training.trainer import Trainer

    prefixes = json.loads(args.data.read_text())
    config = tiny_training_config(
        prefixes,
        max_steps=args.steps,
        checkpoint_dir=str(args.ckpt),
        save_interval=0,
        keep_last=None,
        resume="auto",
    )
    trainer = Trainer(
        config,
        metrics_logger=JsonLinesLogger(args.losses, "preempt-test-run", sleep=args.step_sleep),
    )
    print("RESUMED_FROM", trainer.resumed_from, flush=True)
    print("TRAINING", flush=True)
    trainer.train()
    weights = {
        name: param.detach().clone()
        for name, param in trainer.unwrapped_model[0].named_parameters()
    }
    torch.save(weights, args.weights)
    status = preemption.PREEMPTED_EXIT_CODE if trainer.preempted else 0
    print("EXIT", status, "STEP", trainer.state.step, "SIGNAL", preemption.received_signal())
    sys.stdout.flush()
    destroy_distributed()
    sys.exit(status)


if __name__ == "__main__":
    main()
