"""Training entry point (Hydra): conf/config.yaml composed with the command line.

    python -m megatron_longalign.train +experiment=smoke            # the CPU demo
    python -m megatron_longalign.train model=llama2_7b data=... train.max_steps=1000
    torchrun --nproc-per-node 8 -m megatron_longalign.train parallel=tp2 ...

Every process composes the same config; rank 0 logs. Config problems are reported, all
at once, before any process group is joined (config/validate.py).

Exit status: 0 when the run is done, 2 for a configuration error, 75
(training/preemption.py PREEMPTED_EXIT_CODE) when SIGUSR1/SIGTERM stopped it at a step
boundary after a checkpoint save: requeue and it resumes (docs/CLUSTER.md).
"""

from __future__ import annotations

import contextlib
import logging
import warnings

import hydra
from omegaconf import DictConfig

from megatron_longalign.config.training import register_configs, to_config

log = logging.getLogger("megatron_longalign.train")

register_configs()  # the schema must be in the ConfigStore before hydra.main composes


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    # Noise from inside megatron-core and torch that a user cannot act on: missing
    # Transformer Engine / Apex, a deprecated default of TransformerConfig, torch's
    # renamed collectives, and a .grad read of a non-leaf tensor in megatron's DDP setup.
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")
    warnings.filterwarnings("ignore", message="Apex is not installed.*")
    warnings.filterwarnings("ignore", message="full scope is deprecated.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    warnings.filterwarnings("ignore", message=".*is not a leaf Tensor is being accessed.*")
    from megatron_longalign.config.validate import ConfigError
    from megatron_longalign.parallel.distributed import destroy_distributed
    from megatron_longalign.training import preemption
    from megatron_longalign.training.trainer import Trainer

    config = to_config(cfg)
    # Before the Trainer is built: a preemption signal during model or checkpoint loading
    # is kept and honoured at the first step boundary (training/preemption.py).
    with contextlib.suppress(ValueError):  # an unknown name: reported by the validation
        preemption.install(config.train.preemption_signals)
    try:
        trainer = Trainer(config)
    except ConfigError as err:
        log.error("%s", err)  # the message says what to change; a traceback would not
        raise SystemExit(2) from err
    try:
        history = trainer.train()
        if trainer.is_rank0 and history:
            done = [r for r in history if not r.skipped]
            log.info(
                "%s: %d steps (%d skipped), loss %.4f -> %.4f",
                "preempted" if trainer.preempted else "done",
                len(history),
                len(history) - len(done),
                done[0].loss if done else float("nan"),
                done[-1].loss if done else float("nan"),
            )
    finally:
        destroy_distributed()
    if trainer.preempted:  # saved; the launcher requeues on this status (docs/CLUSTER.md)
        raise SystemExit(preemption.PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
    main()
