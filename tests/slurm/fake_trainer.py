"""A stand-in for `python -m megatron_longalign.train` (the script's PYTHON), to test
slurm/train_64k.sh's signal handling in a second, without torch:

- with `--cfg`, print a one-line config and exit (sleeping FAKE_TRAINER_CONFIG_SLEEP
  seconds first);
- otherwise append `ready RANK` to FAKE_TRAINER_LOG, wait up to 60 s for SIGUSR1 or SIGTERM,
  append `RANK got SIGNAL`, and exit with 75 (the trainer's preempted status); exit 0
  when no signal came.
"""

from __future__ import annotations

import os
import signal
import sys
import time


def log(line: str) -> None:
    with open(os.environ["FAKE_TRAINER_LOG"], "a") as f:
        f.write(line + "\n")


def main() -> None:
    if "--cfg" in sys.argv:
        time.sleep(float(os.environ.get("FAKE_TRAINER_CONFIG_SLEEP", "0")))
        print("name: fake")
        return
    rank = os.environ.get("RANK", "?")
    got: list[int] = []
    for signum in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(signum, lambda s, f: got.append(s))
    log(f"ready {rank}")
    deadline = time.monotonic() + 60
    while not got and time.monotonic() < deadline:
        time.sleep(0.02)
    if not got:
        sys.exit(0)
    log(f"{rank} got {signal.Signals(got[0]).name}")
    sys.exit(75)


if __name__ == "__main__":
    main()
