"""Training entry point (Hydra): conf/config.yaml composed with the command line.

    python -m megatron_longalign.train +experiment=smoke            # the CPU demo
    python -m megatron_longalign.train model=llama2_7b data=... train.max_steps=1000
    torchrun --nproc-per-node 8 -m megatron_longalign.train parallel=tp2 ...

Every process composes the same config; rank 0 logs. Config problems are reported, all
at once, before any process group is joined (training/validate.py).

Exit status:
- 0: the run is done.
- 2 (`CONFIG_ERROR_EXIT_CODE`): the configuration is wrong; the message names the key
  and there is no traceback (HYDRA_FULL_ERROR=1 adds one). Whatever finds it: Hydra's
  composition (an unknown key such as `optim.lrr=1`, a value of the wrong type such as
  `train.max_steps=abc`, a group option that does not exist such as `model=nope`, an
  override it cannot parse), a key added with `+` that no config class has, OmegaConf's
  resolution (a `???` left unset, a broken `${...}`), or the start-up validation.
  Hydra's own usage errors (argparse) exit 2 as well.
- 75 (training/preemption.py `PREEMPTED_EXIT_CODE`): a preemption signal
  (`train.preemption_signals`, default SIGUSR1 and SIGTERM) stopped the run at a step
  boundary, after a checkpoint save when a step ran since the last one; requeue and it
  resumes (docs/CLUSTER.md). A signal counts from this module's first statement on,
  through the imports and the build: the run then stops before its first step, with
  nothing to save. In the modes that only print (`--cfg`, `--info`), a default signal
  exits 75 at the end as well.
- 1 (`CHECKPOINT_ERROR_EXIT_CODE`): a checkpoint cannot be used (training/checkpoint.py
  `CheckpointError`: damaged, or a resume that would overwrite newer checkpoints); one
  message that names the checkpoint and what to run instead, no traceback.
- 1: anything else (a crash; Hydra prints the traceback).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings

from megatron_longalign.training import preemption

# First, before the slow imports below (hydra, torch, megatron: seconds): record
# SIGUSR1/SIGTERM, whose default action would end the process silently. The config later
# settles which signals count (`preemption.install`). Only when run as a program.
if __name__ == "__main__":
    preemption.install_early()

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from megatron_longalign.config.training import register_configs, to_config  # noqa: E402

log = logging.getLogger("megatron_longalign.train")

CONFIG_ERROR_EXIT_CODE = 2
CHECKPOINT_ERROR_EXIT_CODE = 1

register_configs()  # the schema must be in the ConfigStore before hydra.main composes

# cli() sets HYDRA_FULL_ERROR=1 so that Hydra raises composition errors (instead of
# printing them and exiting 1), and keeps the caller's value here for main() to restore.
_NOT_SET = object()
_caller_hydra_full_error: object = _NOT_SET


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    _restore_hydra_full_error()  # errors from here on: Hydra's usual report
    # Noise from inside megatron-core and torch that a user cannot act on: missing
    # Transformer Engine / Apex, a deprecated default of TransformerConfig, torch's
    # renamed collectives, and a .grad read of a non-leaf tensor in megatron's DDP setup.
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")
    warnings.filterwarnings("ignore", message="Apex is not installed.*")
    warnings.filterwarnings("ignore", message="full scope is deprecated.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    warnings.filterwarnings("ignore", message=".*is not a leaf Tensor is being accessed.*")
    from megatron_longalign.config.errors import ConfigError
    from megatron_longalign.parallel.distributed import destroy_distributed
    from megatron_longalign.training.checkpoint import CheckpointError
    from megatron_longalign.training.trainer import Trainer

    try:
        config = _typed_config(cfg)
    except ConfigError as err:
        log.error("%s", err)
        raise SystemExit(CONFIG_ERROR_EXIT_CODE) from err
    # Settle the preemption signals the entry point has recorded since its first line: a
    # signal that came during the imports or comes during model or checkpoint loading is
    # honoured at the first step boundary (training/preemption.py).
    with contextlib.suppress(ValueError):  # an unknown name: reported by the validation
        preemption.install(config.train.preemption_signals)
    try:
        trainer = Trainer(config)
    except ConfigError as err:
        log.error("%s", err)  # the message says what to change; a traceback would not
        raise SystemExit(CONFIG_ERROR_EXIT_CODE) from err
    except CheckpointError as err:  # damaged, or would overwrite: the message says what to do
        log.error("%s", err)
        raise SystemExit(CHECKPOINT_ERROR_EXIT_CODE) from err
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
        elif trainer.is_rank0 and trainer.preempted:
            log.warning(
                "preempted before the first step of this attempt: nothing new to save, "
                "exit status %d; the next attempt starts from %s",
                preemption.PREEMPTED_EXIT_CODE,
                trainer.resumed_from or "the beginning",
            )
    except CheckpointError as err:  # a save refused (it would overwrite a checkpoint) or failed
        log.error("%s", err)
        raise SystemExit(CHECKPOINT_ERROR_EXIT_CODE) from err
    finally:
        destroy_distributed()
    if trainer.preempted:  # saved; the launcher requeues on this status (docs/CLUSTER.md)
        raise SystemExit(preemption.PREEMPTED_EXIT_CODE)


# ---- configuration errors ------------------------------------------------------------------


def _typed_config(cfg: DictConfig):
    """`to_config(cfg)`, with what OmegaConf and Hydra let through as a ConfigError: keys
    no config class has (added with `+`, which would be ignored silently), unset `???`
    values and interpolations that do not resolve."""
    from omegaconf.errors import OmegaConfBaseException

    from megatron_longalign.config.errors import ConfigError

    unknown = _unknown_keys(cfg)
    if unknown:
        raise ConfigError(unknown)
    try:
        return to_config(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError([_omegaconf_problem(err)]) from err


def _unknown_keys(node, path: str = "") -> list[str]:
    """Keys of `node` (a composed config) that its config dataclass does not have."""
    import dataclasses

    from omegaconf import DictConfig, ListConfig

    problems: list[str] = []
    if isinstance(node, DictConfig):
        object_type = node._metadata.object_type
        fields = (
            [f.name for f in dataclasses.fields(object_type)]
            if dataclasses.is_dataclass(object_type)
            else None
        )
        for key in node:
            name = f"{path}.{key}" if path else str(key)
            if fields is not None and key not in fields:
                problems.append(
                    f"{name}: {object_type.__name__} has no field {key!r}{_did_you_mean(name, fields)}"
                )
            else:
                problems += _unknown_keys(node._get_node(key), name)
    elif isinstance(node, ListConfig) and not (
        node._is_none() or node._is_missing() or node._is_interpolation()
    ):
        for index in range(len(node)):
            problems += _unknown_keys(node._get_node(index), f"{path}[{index}]")
    return problems


def _did_you_mean(full_key: str, fields) -> str:
    import difflib

    parent, _, key = full_key.rpartition(".")
    close = difflib.get_close_matches(key, list(fields), n=1)
    return f" (did you mean {parent + '.' if parent else ''}{close[0]}?)" if close else ""


def _omegaconf_problem(err) -> str:
    """An OmegaConf error as one problem line that starts with the key."""
    import dataclasses

    key = getattr(err, "full_key", None) or "?"
    message = str(getattr(err, "msg", None) or err).strip().splitlines()[0]
    object_type = getattr(err, "object_type", None)
    hint = ""
    if getattr(err, "key", None) is not None and dataclasses.is_dataclass(object_type):
        fields = [f.name for f in dataclasses.fields(object_type)]
        if err.key not in fields:  # an unknown key: suggest a field
            hint = _did_you_mean(key, fields)
    return f"{key}: {message}{hint}"


def _composition_problems(err: Exception) -> list[str]:
    """What Hydra could not compose, as problem lines that name the key or group."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(err, OmegaConfBaseException):
        return [_omegaconf_problem(err)]
    if isinstance(err, MissingConfigException) and err.missing_cfg_file:
        group, _, option = err.missing_cfg_file.rpartition("/")
        if group and err.options:
            return [f"{group}={option}: no such option; choose one of {', '.join(err.options)}"]
        return [str(err).strip().split("\n\n")[0]]
    if isinstance(err, OverrideParseException):
        return [f"{err.override}: cannot parse this override: {_one_line(err.message)}"]
    cause = err.__cause__
    if isinstance(cause, OmegaConfBaseException):
        # e.g. "Error merging override train.max_steps=abc", caused by "Value 'abc' of type
        # 'str' could not be converted to Integer" at train.max_steps
        context = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return [_omegaconf_problem(cause) + (f" ({context})" if "=" in context else "")]
    return [_one_line(str(err)) or repr(err)]


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.strip().splitlines() if line.strip())


def _restore_hydra_full_error() -> None:
    global _caller_hydra_full_error
    value, _caller_hydra_full_error = _caller_hydra_full_error, _NOT_SET
    if value is _NOT_SET:
        return
    if value is None:
        os.environ.pop("HYDRA_FULL_ERROR", None)
    else:
        os.environ["HYDRA_FULL_ERROR"] = str(value)


def cli() -> None:
    """`python -m megatron_longalign.train`: `main`, with every configuration error as exit
    status 2 (module docstring), and a preemption signal in a mode that trains nothing
    (`--cfg`) as status 75."""
    global _caller_hydra_full_error
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    caller = os.environ.get("HYDRA_FULL_ERROR")
    _caller_hydra_full_error = caller
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except (HydraException, OmegaConfBaseException) as err:
        from megatron_longalign.config.errors import ConfigError

        if caller == "1":
            import traceback

            traceback.print_exc()
        print(ConfigError(_composition_problems(err)), file=sys.stderr)
        raise SystemExit(CONFIG_ERROR_EXIT_CODE) from None
    finally:
        _restore_hydra_full_error()
    # Back from Hydra without a training (--cfg, --info): a signal it recorded asked this
    # process to stop, and there is nothing to save.
    stopped = preemption.pending_before_start()
    if stopped:
        print(
            f"received {stopped} before the training started: nothing to save; exit status "
            f"{preemption.PREEMPTED_EXIT_CODE} (requeue)",
            file=sys.stderr,
        )
        raise SystemExit(preemption.PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
    cli()
