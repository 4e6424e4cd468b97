"""Atomic, resumable training checkpoints: model, optimizer, LR scheduler, data position
and RNG state, in megatron-core's resharding-capable torch_dist format (checkpoint_io).

On disk, under `root`:

    step_00000200/                  one complete checkpoint
        metadata.json, common.pt, .metadata, __<rank>_<i>.distcp   (torch_dist files)
        complete.json               marker: step, layout, sharding format, the size of
                                    every file above, the previous `latest`; written last
    step_00000300.tmp-<hex>/        a save in progress, or one a crash left behind
    step_00000400.damaged-<hex>/    a damaged step_00000400 that a later save set aside
    latest                          the name of the newest complete checkpoint

Commit protocol (`CheckpointManager.save`, every rank calls it):
1. Rank 0 picks the temp name `step_<N>.tmp-<hex>` and broadcasts it, so every rank
   writes into the same directory. It refuses (before anything is written) when
   `step_<N>` is already a complete checkpoint: a run never overwrites one.
2. All ranks write their shards (synchronously; each file is fsynced), then barrier.
3. Rank 0 writes `complete.json` (with every file's size) into the temp dir, renames the
   temp dir to `step_<N>` (a damaged `step_<N>` already there is renamed to
   `step_<N>.damaged-<hex>` first, never deleted), and only then replaces `latest` (temp
   file, fsync, `os.replace`). It then prunes old checkpoints (see `prune`) and deletes
   leftover `*.tmp-*` entries.
4. Rank 0 broadcasts success (or its error, so no rank waits forever in a barrier).

A crash at any point leaves `latest` naming the previous complete checkpoint: the new
one becomes visible only through the final `os.replace` of `latest`, and a directory
without `complete.json` is never loaded. Deletions rename the directory to a `*.tmp-*`
name first, so a half-deleted checkpoint can never look complete either.

Complete means: `complete.json` is there and valid, and every file it lists has the
size it had at the save. So a truncated or missing shard is found by a few `stat`
calls before anything is read (`read_marker`), with the file named; a corruption that
keeps the size shows up as a read error of the whole checkpoint (`load`). Either
message names the previous complete checkpoint to resume from instead.

Resume (`resolve_resume`, rank 0 of the Trainer, for `train.resume`):
- "auto": the checkpoint `latest` names; without `latest`, the newest `step_<N>`
  directory (said in the log). It must be complete: a damaged one stops the run with a
  message naming the file and `train.resume=<previous complete checkpoint>`, it is never
  skipped silently. The one exception to `latest`: a complete checkpoint right after
  it whose marker records `latest` as its predecessor (a crash between the rename and
  the `latest` update) is taken, with a warning;
- a path: that `step_<N>` directory, or a checkpoint root resolved as "auto";
- "never" / "none" / null: no checkpoint.
Then, whatever was chosen: if `train.checkpoint_dir` holds complete checkpoints newer
than the resume point (step 0 for a fresh start), the run would save those steps again,
so it refuses to start and names them (move them away, or resume from the newest).
Pruning (`keep_last`) deletes only checkpoints this run wrote or ones at or before the
step it resumed from; never a newer one, never `latest`.

What is stored where:
- model chunks: `chunk.sharded_state_dict()` (ShardedTensors: reshard to any TP/PP);
- optimizer: `optimizer.sharded_state_dict(model_sd, is_loading, metadata=...)` and
  `optimizer.load_state_dict` (megatron-core 0.16.1's API, used as Megatron-LM uses
  it). megatron's branch for torch's Adam (its fallback without TE/apex: CPU runs) has
  bugs around Adam's per-parameter 'step' that would break an exact resume; that case
  is loaded step by step (`megatron_compat.load_optimizer_state_dict`), the TE/apex
  path is untouched;
- scheduler `state_dict()`, the `TrainingState` and the layout: the common part
  (`common.pt`, written by rank 0);
- RNG (python `random`, numpy, torch CPU, torch CUDA, megatron's CUDA RNG tracker):
  one ShardedObject per global rank.

Resharding in megatron-core 0.16.1 (`DistributedOptimizer.sharded_state_dict`):
- the model reshards to any TP/PP/DP layout (ShardedTensors);
- the non-distributed optimizer's state is ShardedTensors like the model's (megatron's
  design; not tested here);
- distributed-optimizer state, by `optimizer_format`:
  - "dp_reshardable" (our default, and Megatron-LM's): the optimizer's bucket layout is
    stored as is. Fully parallel, no gather, so it scales; reshards in DP only (tested
    DP2 -> DP1 -> DP2). Loading it with another TP, PP or EP size raises
    `CheckpointError` before anything is read (load the model alone with
    optimizer=None, or use the saved layout); a CP change is refused too, untested;
  - "fully_reshardable" (Megatron-LM's --dist-ckpt-optim-fully-reshardable): at save,
    every DP rank all-gathers its group's whole optimizer state (param, exp_avg,
    exp_avg_sq, fp32: 12 bytes per parameter of the TPxPP shard, on the device);
    reshards in TP, PP and DP (tested TP2 -> TP1);
  - "fully_reshardable_mem_efficient": the same format, gathered over gloo onto DP
    rank 0 only (host memory, slower).
  - megatron's own default, "fully_sharded_model_space", does not work in 0.16.1: it
    builds ShardedTensors with `flattened_range`, which 0.16.1 rejects ("ShardedTensor.
    flattened_range is not supported"). `CheckpointManager` refuses it up front.
RNG state is restored exactly only when the layout (world size, TP, PP, CP, DP, EP) is
unchanged; after resharding it is left as the caller seeded it, with a warning.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import re
import shutil
import uuid
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron_longalign import megatron_compat
from megatron_longalign.config.training import OPTIMIZER_FORMATS, RESUME_AUTO, RESUME_FRESH
from megatron_longalign.data.planner import PlanPosition
from megatron_longalign.parallel.distributed import rank0_then_broadcast
from megatron_longalign.training.checkpoint_io import load_sharded, save_sharded
from megatron_longalign.utils.atomic_files import fsync_directory, write_text_durably

logger = logging.getLogger(__name__)

MARKER = "complete.json"
LATEST = "latest"
FORMAT_VERSION = 1
DEFAULT_OPTIMIZER_FORMAT = "dp_reshardable"

_STEP_DIR = re.compile(r"step_(\d{8,})")
_TMP_TAG = ".tmp-"
_DAMAGED_TAG = ".damaged-"
_COMMON_KEY = "longalign"
_RNG_KEY = "rng_state"
# Layout sizes a dp_reshardable optimizer state cannot change (its bucket layout depends
# on TP/PP/EP; CP is refused conservatively: untested).
_BUCKET_LAYOUT_KEYS = (
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "context_parallel_size",
    "expert_model_parallel_size",
)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or cannot be loaded into this layout."""


@dataclass
class TrainingState:
    """What a checkpoint must restore besides module state to continue the exact same
    run: the Trainer's `state`, saved and loaded by CheckpointManager."""

    step: int = 0  # iterations done (skipped ones included)
    consumed_samples: int = 0
    # data position (epoch, step) of the NEXT global batch
    plan_position: PlanPosition = field(default_factory=PlanPosition)
    extra: dict = field(default_factory=dict)  # small JSON-able things (run id, config hash)

    # The trainer's bad-step counters live in `extra` (the saved JSON keeps its keys).
    @property
    def skipped_steps(self) -> int:
        return int(self.extra.get("skipped_steps", 0))

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self.extra["skipped_steps"] = int(value)

    @property
    def consecutive_bad_steps(self) -> int:
        return int(self.extra.get("consecutive_bad_steps", 0))

    @consecutive_bad_steps.setter
    def consecutive_bad_steps(self, value: int) -> None:
        self.extra["consecutive_bad_steps"] = int(value)

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "consumed_samples": self.consumed_samples,
            "plan_position": dataclasses.asdict(self.plan_position),
            "extra": self.extra,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainingState:
        return cls(
            step=int(data["step"]),
            consumed_samples=int(data["consumed_samples"]),
            plan_position=PlanPosition(**data["plan_position"]),
            extra=dict(data["extra"]),
        )


# ---------------------------------------------------------------- manager


def keep_last_problems(keep_last: int | None) -> list[str]:
    """train.keep_last: complete checkpoints to keep, >= 1, or None (keep all)."""
    if keep_last is not None and keep_last < 1:
        return [f"train.keep_last must be >= 1 or null (keep all), got {keep_last}"]
    return []


def optimizer_format_problems(optimizer_format: str) -> list[str]:
    """train.checkpoint_optimizer_format: one of OPTIMIZER_FORMATS."""
    if optimizer_format in OPTIMIZER_FORMATS:
        return []
    why = (
        " (megatron-core 0.16.1 cannot save it: flattened_range is not supported)"
        if optimizer_format == "fully_sharded_model_space"
        else ""
    )
    return [
        f"train.checkpoint_optimizer_format must be one of {OPTIMIZER_FORMATS}, got "
        f"{optimizer_format!r}{why}"
    ]


class CheckpointManager:
    """Saves and loads training checkpoints under `root`, keeping the newest `keep_last`
    complete ones (None keeps all). See the module docstring for the on-disk protocol
    and what reshards."""

    def __init__(
        self,
        root: str | Path,
        keep_last: int | None = 3,
        optimizer_format: str = DEFAULT_OPTIMIZER_FORMAT,
    ) -> None:
        problems = keep_last_problems(keep_last) + optimizer_format_problems(optimizer_format)
        if problems:
            raise ValueError("; ".join(problems))
        self.root = Path(root)
        self.keep_last = keep_last
        self.optimizer_format = optimizer_format
        # Pruning may delete what this manager saved (names, rank 0) and checkpoints at
        # or before the step it resumed from (`load` sets it); nothing newer.
        self.resumed_step = 0
        self._written: set[str] = set()

    # ------------------------------------------------------------ save

    def save(self, state: TrainingState, model: list, optimizer, scheduler) -> Path:
        """Write a checkpoint of `state`, the model chunks, optimizer and scheduler
        (either may be None) to root/step_<step>, then point `latest` at it.
        Collective: every rank calls it with the same `state`."""
        _check_state(state)
        final_dir = self.root / step_dir_name(state.step)
        temp_name, refusal = rank0_then_broadcast(lambda: self._plan_save(final_dir))
        if refusal:
            raise CheckpointError(refusal)
        temp_dir = self.root / temp_name

        metadata = sharding_metadata(self.optimizer_format)
        layout = current_layout(model)
        sharded = _module_sharded_state_dict(model, optimizer, metadata, is_loading=False)
        sharded[_RNG_KEY] = _rng_sharded_object(capture_rng_state())
        sharded[_COMMON_KEY] = {
            "training_state": state.to_json(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
        }
        save_sharded(sharded, temp_dir)
        torch.distributed.barrier()  # every rank's shards are on disk before the commit

        marker = {
            "format_version": FORMAT_VERSION,
            **state.to_json(),
            "layout": layout,
            "sharding_metadata": metadata,
            "has_optimizer": optimizer is not None,
            "has_scheduler": scheduler is not None,
        }
        error = rank0_then_broadcast(lambda: self._commit_on_rank0(temp_dir, final_dir, marker))
        if error:
            raise CheckpointError(f"committing {final_dir} failed on rank 0: {error}")
        return final_dir

    def _plan_save(self, final_dir: Path) -> tuple[str, str | None]:
        """Rank 0: the temp directory name, or why this save must not happen."""
        if final_dir.exists() and checkpoint_problem(final_dir) is None:
            return "", (
                f"{final_dir} is already a complete checkpoint, and a run never overwrites "
                "one (a step is saved once; a checkpoint of another run is only replaced by "
                f"moving it out of {self.root} first)"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        return f"{final_dir.name}{_TMP_TAG}{uuid.uuid4().hex[:12]}", None

    def _commit_on_rank0(self, temp_dir: Path, final_dir: Path, marker: dict) -> str | None:
        """Rank 0: marker, rename, `latest`, prune, in that order. Returns an error
        message instead of raising, so the other ranks learn of it."""
        try:
            marker = {**marker, "files": file_sizes(temp_dir), "previous": self._previous()}
            write_json_durably(temp_dir / MARKER, marker)
            publish(temp_dir, final_dir)
            self._written.add(final_dir.name)
            point_latest(self.root, final_dir.name)
        except Exception as err:  # reported to every rank, which all raise
            logger.exception("checkpoint commit failed")
            return f"{type(err).__name__}: {err}"
        logger.info("saved checkpoint %s", final_dir)
        try:  # housekeeping: the checkpoint is committed whatever happens here
            prune(
                self.root,
                self.keep_last,
                final_dir.name,
                written=self._written,
                resumed_step=self.resumed_step,
            )
            remove_stale_temps(self.root)
        except OSError:
            logger.exception("pruning old checkpoints under %s failed", self.root)
        return None

    # ------------------------------------------------------------ find

    def _previous(self) -> str | None:
        """What `latest` names before this commit (recorded in the marker, so a resume can
        recognise a save that was published but never made `latest`)."""
        try:
            return read_latest(self.root)
        except CheckpointError:
            return None

    def latest(self) -> Path | None:
        """The checkpoint `root/latest` names, validated as complete; None when there is
        no `latest` (nothing saved yet). Leftover temp dirs and directories without the
        marker are never returned. Raises CheckpointError if `latest` is broken."""
        name = read_latest(self.root)
        if name is None:
            return None
        path = self.root / name
        read_marker(path)
        return path

    # ------------------------------------------------------------ load

    def load(self, path: str | Path, model: list, optimizer, scheduler) -> TrainingState:
        """Restore the model chunks, optimizer and scheduler (either may be None to skip
        it) from the checkpoint at `path`, in this process's layout, which may differ
        from the saved one (see the module docstring). RNG state is restored only when
        the layout is unchanged. Collective. Returns the saved TrainingState."""
        path = Path(path)
        marker = read_marker(path)  # complete, every file of the saved size
        layout = current_layout(model)
        _check_loadable(marker, layout, optimizer, scheduler)
        same_layout = marker["layout"] == layout

        metadata = marker["sharding_metadata"]  # build the request in the saved format
        if optimizer is not None:
            megatron_compat.prime_empty_torch_adam(optimizer)
        sharded = _module_sharded_state_dict(model, optimizer, metadata, is_loading=True)
        if same_layout:
            sharded[_RNG_KEY] = _rng_sharded_object(None)
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

        try:
            loaded = load_sharded(sharded, path)
        except (Exception, CheckpointException) as err:  # damaged inside, sizes intact
            raise CheckpointError(_unreadable_message(path, err)) from err

        for key, chunk in zip(_model_keys(len(model)), _unwrap(model), strict=True):
            chunk.load_state_dict(loaded[key], strict=True)
        if optimizer is not None:
            load_optimizer_state(optimizer, loaded["optimizer"])
        common = loaded[_COMMON_KEY]
        if scheduler is not None:
            scheduler.load_state_dict(common["scheduler"])
        if same_layout:
            restore_rng_state(loaded[_RNG_KEY])
        elif torch.distributed.get_rank() == 0:
            logger.warning(
                "layout changed (%s -> %s): RNG state not restored", marker["layout"], layout
            )
        state = TrainingState.from_json(common["training_state"])
        self.resumed_step = state.step
        return state


# ---------------------------------------------------------------- state dicts


def sharding_metadata(optimizer_format: str) -> dict[str, Any]:
    """The `metadata` argument of megatron's sharded_state_dict calls, as Megatron-LM
    builds it. Stored in the marker, so a load uses the format the save used."""
    mem_efficient = optimizer_format == "fully_reshardable_mem_efficient"
    return {
        "distrib_optim_sharding_type": "fully_reshardable" if mem_efficient else optimizer_format,
        "distrib_optim_fully_reshardable_mem_efficient": mem_efficient,
        "singleton_local_shards": False,
        "chained_optim_avoid_prefix": True,
    }


def _unwrap(model: list) -> list:
    # DDP / Float16Module wrappers add a "module." level; the checkpoint should not
    # depend on how the model was wrapped.
    from megatron.core.utils import unwrap_model

    return unwrap_model(list(model))


def _model_keys(num_chunks: int) -> list[str]:
    # Megatron-LM's keys: "model", or "model0", "model1", ... for virtual pipeline chunks.
    return ["model"] if num_chunks == 1 else [f"model{i}" for i in range(num_chunks)]


def _module_sharded_state_dict(
    model: list, optimizer, metadata: dict[str, Any], is_loading: bool
) -> dict[str, Any]:
    # megatron adds entries (a process group) to `metadata` in place: give it a copy,
    # so the caller's copy stays JSON-able for the marker.
    metadata = dict(metadata)
    chunks = _unwrap(model)
    sharded = {
        key: chunk.sharded_state_dict(metadata=metadata)
        for key, chunk in zip(_model_keys(len(chunks)), chunks, strict=True)
    }
    if optimizer is not None:
        # The optimizer maps its state to the model's ShardedTensors by parameter
        # identity, so it must see the same model sharded state dict.
        sharded["optimizer"] = optimizer.sharded_state_dict(
            dict(sharded), is_loading=is_loading, metadata=metadata
        )
    return sharded


def load_optimizer_state(optimizer, state) -> None:
    """`optimizer.load_state_dict(state)` for a state built by `sharded_state_dict`
    (megatron's API), with the torch-Adam fixes of
    `megatron_compat.load_optimizer_state_dict`."""
    try:
        megatron_compat.load_optimizer_state_dict(optimizer, state)
    except megatron_compat.OptimizerStateError as err:
        raise CheckpointError(str(err)) from err


def current_layout(model: list) -> dict[str, int]:
    """The parallel layout a checkpoint is written in (stored in the marker)."""
    from megatron.core import parallel_state as ps

    return {
        "world_size": torch.distributed.get_world_size(),
        "tensor_model_parallel_size": ps.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": ps.get_pipeline_model_parallel_world_size(),
        "context_parallel_size": ps.get_context_parallel_world_size(),
        "expert_model_parallel_size": ps.get_expert_model_parallel_world_size(),
        "data_parallel_size": ps.get_data_parallel_world_size(),
        "model_chunks": len(model),
    }


def _check_loadable(marker: dict, layout: dict[str, int], optimizer, scheduler) -> None:
    """Refuse, before any collective read, what megatron cannot load (or would load
    wrongly)."""
    if optimizer is not None and not marker["has_optimizer"]:
        raise CheckpointError("the checkpoint has no optimizer state; pass optimizer=None")
    if scheduler is not None and not marker["has_scheduler"]:
        raise CheckpointError("the checkpoint has no scheduler state; pass scheduler=None")
    saved = marker["layout"]
    if saved["model_chunks"] != layout["model_chunks"]:
        raise CheckpointError(
            f"the checkpoint has {saved['model_chunks']} model chunk(s) (virtual pipeline), "
            f"this model {layout['model_chunks']}; use the same virtual pipeline size"
        )
    sharding = marker["sharding_metadata"]["distrib_optim_sharding_type"]
    if optimizer is None or sharding != "dp_reshardable":
        return
    changed = [k for k in _BUCKET_LAYOUT_KEYS if saved[k] != layout[k]]
    if changed:
        detail = ", ".join(f"{k} {saved[k]} -> {layout[k]}" for k in changed)
        raise CheckpointError(
            f"optimizer state saved in the 'dp_reshardable' format reshards only in data "
            f"parallelism, but {detail}. Load with optimizer=None (model only), or use the "
            "saved layout; save with train.checkpoint_optimizer_format=fully_reshardable to "
            "change TP/PP later"
        )


# ---------------------------------------------------------------- RNG


def capture_rng_state() -> dict[str, Any]:
    """This rank's RNG states, as plain Python objects and CPU tensors (no numpy
    objects, so `torch.load(weights_only=True)` reads them)."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tracker = {}
    for name, value in get_cuda_rng_tracker().get_states().items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"megatron RNG tracker state {name!r} is a {type(value).__name__}, not a "
                "tensor (cudagraph-safe tracker?); it cannot be checkpointed"
            )
        tracker[name] = value.clone()
    return {
        "python": random.getstate(),
        "numpy": (np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)),
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "tracker": tracker,
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["python"])
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state(
        (np_name, np.array(np_keys, dtype=np.uint32), np_pos, np_has_gauss, np_gauss)
    )
    torch.set_rng_state(state["torch_cpu"])
    if state["torch_cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["torch_cuda"])
    get_cuda_rng_tracker().set_states(dict(state["tracker"]))


def _rng_sharded_object(state: dict[str, Any] | None):
    # One object per global rank: RNG streams differ per rank and must not be merged.
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    return ShardedObject(_RNG_KEY, state, (world,), (rank,), replica_id=0)


# ---------------------------------------------------------------- files (rank 0)


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _check_state(state: TrainingState) -> None:
    # Checked on every rank before any collective, so a bad state fails everywhere.
    if state.step < 0 or state.consumed_samples < 0:
        raise ValueError(f"step and consumed_samples must be >= 0: {state}")
    try:
        json.dumps(state.to_json())
    except (TypeError, ValueError) as err:
        raise ValueError(f"TrainingState.extra must be JSON-serialisable: {err}") from err


def write_json_durably(path: Path, data: dict) -> None:
    write_text_durably(path, json.dumps(data, indent=1, sort_keys=True) + "\n")
    fsync_directory(path.parent)


def publish(temp_dir: Path, final_dir: Path) -> None:
    """Rename the finished temp dir into place. A `step_<N>` already there must not be a
    complete checkpoint (`save` refuses those before writing); anything else under that
    name (no marker, or damaged) is set aside as `step_<N>.damaged-<hex>`, not deleted."""
    if final_dir.exists():
        problem = checkpoint_problem(final_dir)
        if problem is None:
            raise CheckpointError(f"{final_dir} is a complete checkpoint; not replacing it")
        aside = set_aside(final_dir)
        logger.warning(
            "%s was not a complete checkpoint (%s); moved it to %s", final_dir, problem, aside
        )
    os.rename(temp_dir, final_dir)
    fsync_directory(final_dir.parent)


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint directory out of the way (kept for inspection; no
    step name, not a temp name, so nothing loads or deletes it)."""
    aside = path.with_name(f"{path.name}{_DAMAGED_TAG}{uuid.uuid4().hex[:12]}")
    os.rename(path, aside)
    fsync_directory(path.parent)
    return aside


def point_latest(root: Path, name: str) -> None:
    """Atomically make root/latest name `name` (temp file, fsync, os.replace)."""
    temp = root / f"{LATEST}{_TMP_TAG}{uuid.uuid4().hex[:12]}"
    write_text_durably(temp, name + "\n")
    os.replace(temp, root / LATEST)
    fsync_directory(root)


def read_latest(root: Path) -> str | None:
    """The step_<N> name root/latest holds; None without a `latest` file. A `latest`
    that is not one such name (binary garbage, a path, empty) raises CheckpointError
    naming the file and the newest complete checkpoint to use instead."""
    path = Path(root) / LATEST
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise CheckpointError(f"{path} cannot be read ({err}). {_latest_hint(path)}") from err
    try:
        name = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CheckpointError(
            f"{path} is unreadable: it holds {len(raw)} bytes of binary data, not a step_<N> "
            f"directory name. {_latest_hint(path)}"
        ) from None
    if not _STEP_DIR.fullmatch(name):
        raise CheckpointError(
            f"{path} is unreadable: it contains {name[:80]!r}, not a step_<N> directory name. "
            f"{_latest_hint(path)}"
        )
    return name


def _latest_hint(latest: Path) -> str:
    newest = [p for _, p in intact_checkpoints(latest.parent)]
    if not newest:
        return (
            f"There is no complete checkpoint in {latest.parent}: delete {latest} and set "
            "train.resume=never to start fresh."
        )
    return (
        f"It is only a pointer: resume from the newest complete checkpoint with "
        f"train.resume={newest[-1]}, or delete {latest} (train.resume=auto then resumes "
        "from the newest complete checkpoint)."
    )


def file_sizes(directory: Path) -> dict[str, int]:
    """Relative path -> size in bytes of every file under `directory` (the marker
    records them; a load compares)."""
    return {
        str(p.relative_to(directory)): p.stat().st_size
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MARKER
    }


_MARKER_KEYS = ("format_version", "step")


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` is not a complete checkpoint (one sentence naming the file), or None
    when it is: the marker is there and valid, and every file it lists has the size it
    had at the save (markers of older saves list no sizes: not checked)."""
    problem, _ = _inspect(Path(path))
    return problem


def _inspect(path: Path) -> tuple[str | None, dict[str, Any] | None]:
    marker_path = path / MARKER
    if not path.is_dir():
        return f"{path} does not exist", None
    if not marker_path.is_file():
        return f"{marker_path} is missing (an unfinished or damaged save)", None
    try:
        marker = json.loads(marker_path.read_bytes())
    except (OSError, ValueError) as err:  # JSONDecodeError, UnicodeDecodeError
        return f"{marker_path} is not valid JSON ({err})", None
    if not isinstance(marker, dict) or any(key not in marker for key in _MARKER_KEYS):
        return f"{marker_path} lacks {' or '.join(_MARKER_KEYS)}", None
    if marker["format_version"] != FORMAT_VERSION:
        return (
            f"{marker_path} has format_version {marker['format_version']!r}, this code reads "
            f"{FORMAT_VERSION}"
        ), None
    match = _STEP_DIR.fullmatch(path.name)
    if match and int(match.group(1)) != marker["step"]:
        return f"{marker_path} says step {marker['step']}, the directory name disagrees", None
    wrong = []
    for name, size in sorted(marker.get("files", {}).items()):
        file = path / name
        if not file.is_file():
            wrong.append(f"{file} is missing")
        elif file.stat().st_size != size:
            wrong.append(
                f"{file} has {file.stat().st_size} bytes, the save wrote {size} (truncated "
                "or changed since)"
            )
    if wrong:
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        return f"{wrong[0]}{more}", None
    return None, marker


def read_marker(path: Path) -> dict[str, Any]:
    """The marker of a complete checkpoint directory (see `checkpoint_problem`);
    otherwise CheckpointError naming the file, and the previous complete checkpoint."""
    path = Path(path)
    problem, marker = _inspect(path)
    if problem is not None:
        raise CheckpointError(
            f"checkpoint {path} is not a complete checkpoint (damaged or unfinished): "
            f"{problem}. {_previous_hint(path)}"
        )
    return marker


def _previous_hint(path: Path) -> str:
    """Where to resume instead of the damaged checkpoint `path`."""
    match = _STEP_DIR.fullmatch(path.name)
    root = path.parent
    step = int(match.group(1)) if match else None
    earlier = [p for s, p in intact_checkpoints(root) if step is None or s < step]
    if earlier:
        return (
            f"To resume from the previous complete checkpoint instead, run with "
            f"train.resume={earlier[-1]}."
        )
    return (
        f"There is no earlier complete checkpoint in {root}; start fresh with "
        "train.resume=never (or repair the file)."
    )


def _unreadable_message(path: Path, err: BaseException) -> str:
    """A load that failed inside megatron/torch: name the checkpoint, the file when the
    error mentions one, and where else to resume."""
    causes = _causes(err)
    # torch's CheckpointException wraps each rank's error (and its str() is a traceback).
    inner = [e for e in causes if not hasattr(e, "failures")]
    headline = inner[0] if inner else err
    first = " ".join(f"{type(headline).__name__}: {headline}".split()).rstrip(":")
    if len(first) > 300:
        first = first[:300] + "..."
    joined = " ".join(str(e) for e in inner)
    files = [p for p in sorted(path.iterdir()) if p.is_file() and p.name in joined]
    found = _find_damage(path)
    if found is not None:
        damage = f"; {found}"
    elif files:
        damage = f" in {', '.join(str(p) for p in files)}"
    else:
        damage = ""
    sized = "files" in read_marker(path)
    return (
        f"checkpoint {path} could not be read ({first}){damage}. "
        + ("" if found else "One of its files is probably damaged")
        + ("" if found or not sized else " (each still has the size the save wrote)")
        + ("" if found else ", or the checkpoint does not fit this model. ")
        + _previous_hint(path)
    )


def _find_damage(path: Path) -> str | None:
    """After a failed load: which file is damaged, if a cheap look can tell (what is
    checked for checkpoints whose marker records no sizes, and for damage that kept the
    size): the DCP index `.metadata` must unpickle, every `.distcp` file must reach the
    end of the last item the index places in it, `common.pt` must be an intact zip
    (CRC-checked), `metadata.json` valid JSON."""
    import zipfile

    from torch.distributed.checkpoint import FileSystemReader

    try:
        index = FileSystemReader(str(path)).read_metadata()
    except Exception as err:  # any failure to read it is the finding
        return f"{path / '.metadata'} cannot be read ({type(err).__name__}: {err})"
    needed: dict[str, int] = {}
    for info in index.storage_data.values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, end in sorted(needed.items()):
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        if file.stat().st_size < end:
            return (
                f"{file} has {file.stat().st_size} bytes, but the checkpoint's index places "
                f"data up to byte {end} in it (truncated)"
            )
    common = path / "common.pt"
    try:
        with zipfile.ZipFile(common) as archive:
            bad = archive.testzip()
        if bad is not None:
            return f"{common} is corrupt (CRC error in {bad})"
    except (OSError, zipfile.BadZipFile) as err:
        return f"{common} is corrupt or truncated ({err})"
    try:
        json.loads((path / "metadata.json").read_bytes())
    except (OSError, ValueError) as err:
        return f"{path / 'metadata.json'} cannot be read ({err})"
    return None


def _causes(err: BaseException) -> list[BaseException]:
    """`err`, the per-rank errors of a torch CheckpointException, and their causes."""
    found: list[BaseException] = []
    todo: list[BaseException | None] = [err]
    while todo and len(found) < 10:
        error = todo.pop(0)
        if error is None or any(error is e for e in found):
            continue
        found.append(error)
        failures = getattr(error, "failures", None)
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
        todo += [error.__cause__, error.__context__]
    return found


def step_directories(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every `step_<N>` directory under `root`, complete or not, oldest
    first."""
    found = []
    for path in Path(root).iterdir() if Path(root).is_dir() else ():
        match = _STEP_DIR.fullmatch(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every `step_<N>` directory with a marker, oldest first (the
    marker is not validated: see `intact_checkpoints`)."""
    return [(s, p) for s, p in step_directories(root) if (p / MARKER).is_file()]


def intact_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint (`checkpoint_problem` is None), oldest
    first."""
    return [(s, p) for s, p in step_directories(root) if checkpoint_problem(p) is None]


def remove_dir(path: Path) -> None:
    """Delete a checkpoint directory without ever leaving a half-deleted one under a
    step name: rename it to a temp name first (a crash leaves only a temp dir)."""
    doomed = path.with_name(f"{path.name}{_TMP_TAG}deleting-{uuid.uuid4().hex[:12]}")
    os.rename(path, doomed)
    fsync_directory(path.parent)
    shutil.rmtree(doomed)


def prune(
    root: Path,
    keep_last: int | None,
    latest_name: str,
    *,
    written: Collection[str],
    resumed_step: int,
) -> list[Path]:
    """Delete complete checkpoints older than the newest `keep_last` at or below the
    latest step, but only those this run wrote (`written`) or at or before the step it
    resumed from: never `latest`, never one newer than it, never one of another run
    past the resume point. Returns the deleted paths."""
    if keep_last is None:
        return []
    latest_step = int(_STEP_DIR.fullmatch(latest_name).group(1))
    candidates = [p for s, p in complete_checkpoints(root) if s <= latest_step]
    old = candidates[: max(len(candidates) - keep_last, 0)]
    doomed = [
        p
        for p in old
        if p.name != latest_name
        and (p.name in written or int(_STEP_DIR.fullmatch(p.name).group(1)) <= resumed_step)
    ]
    for path in doomed:
        remove_dir(path)
    return doomed


# ---------------------------------------------------------------- resume (rank 0)


def resolve_resume(resume: str | None, checkpoint_dir: str | Path | None) -> Path | None:
    """The checkpoint a run resumes from for `train.resume` (see the module docstring),
    or None for a fresh start; says in the log what it chose and why. Raises
    CheckpointError (one paragraph: the checkpoint, the file, what to run instead) for a
    damaged checkpoint or `latest`, and when `checkpoint_dir` holds complete checkpoints
    newer than the resume point, which this run would overwrite. Rank 0 only."""
    root = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if resume is None or resume in RESUME_FRESH:
        path = None
    elif resume == RESUME_AUTO:
        path = find_resume_checkpoint(root) if root is not None else None
    else:
        path = _explicit_checkpoint(Path(resume))
    step = read_marker(path)["step"] if path is not None else 0
    if root is not None:
        _refuse_newer_checkpoints(root, step, path, resume)
    return path


def resolve_checkpoint(path: str | Path, name: str | None = None) -> Path:
    """The checkpoint at `path`: a complete checkpoint directory, or the one `latest`
    names in a checkpoint root (validated). CheckpointError otherwise; `name` (e.g.
    "train.init_from") is how the message refers to the path."""
    path = Path(path)
    if (path / MARKER).is_file():
        return path
    found = CheckpointManager(path).latest() if (path / LATEST).is_file() else None
    if found is None:
        shown = f"{name}={str(path)!r}" if name else str(path)
        raise CheckpointError(
            f"{shown} is neither a complete checkpoint (no {MARKER}) nor a checkpoint root "
            f"with a `{LATEST}` file"
        )
    return found


def find_resume_checkpoint(root: Path) -> Path | None:
    """`train.resume=auto` for the checkpoint root `root`: the checkpoint `latest` names,
    else the newest step_<N> directory; None when there is neither. The choice must be
    complete (CheckpointError otherwise, never a silent step back)."""
    name = read_latest(root)
    if name is not None:
        path = root / name
        marker = read_marker(path)
        newer = [p for s, p in intact_checkpoints(root) if s > marker["step"]]
        if len(newer) == 1 and read_marker(newer[0]).get("previous") == name:
            logger.warning(
                "%s names %s, but %s was saved right after it and `latest` was never updated "
                "(a crash during that save's commit): resuming from %s",
                root / LATEST,
                name,
                newer[0].name,
                newer[0],
            )
            return newer[0]
        return path
    found = step_directories(root)
    if not found:
        return None
    path = found[-1][1]
    read_marker(path)
    logger.warning(
        "no `latest` in %s: resuming from the newest complete checkpoint %s",
        root,
        path,
    )
    return path


def _explicit_checkpoint(path: Path) -> Path:
    """`train.resume=<path>`: a step_<N> checkpoint directory, or a checkpoint root."""
    if (path / MARKER).exists() or _STEP_DIR.fullmatch(path.name):
        read_marker(path)
        return path
    if path.is_dir() and ((path / LATEST).exists() or step_directories(path)):
        found = find_resume_checkpoint(path)
        if found is not None:
            return found
    raise CheckpointError(
        f"train.resume={str(path)!r} is neither a checkpoint directory (no {MARKER}) nor a "
        "checkpoint root (no `latest`, no step_<N> directories); use auto, never, or such "
        "a path"
    )


def _refuse_newer_checkpoints(root: Path, step: int, path: Path | None, resume: str | None) -> None:
    """A run from `step` saves later steps into `root`: refuse if complete checkpoints
    newer than `step` are there (it would overwrite them), warn about damaged ones (a
    save of that step sets them aside)."""
    newer, damaged = [], []
    for s, p in step_directories(root):
        if s > step:
            problem = checkpoint_problem(p)
            (newer if problem is None else damaged).append((p, problem))
    for p, problem in damaged:
        logger.warning(
            "%s is not a complete checkpoint (%s); it is left alone, and a save of that step "
            "will rename it to %s%s<id>",
            p,
            problem,
            p.name,
            _DAMAGED_TAG,
        )
    if not newer:
        return
    names = [p.name for p, _ in newer]
    shown = "null" if resume is None else resume
    if path is None:
        start = f"train.resume={shown} starts fresh (step 0), but {root} already has "
        then = (
            f"To start fresh, set train.checkpoint_dir to a new directory, or move "
            f"{' '.join(names)} out of {root} first"
        )
    else:
        start = (
            f"train.resume={shown} resumes from {path} (step {step}), but {root} already has newer "
        )
        then = (
            f"To go back to step {step} on purpose, move {' '.join(names)} out of {root} "
            "first, or set train.checkpoint_dir to a new directory"
        )
    raise CheckpointError(
        f"{start}complete checkpoints {', '.join(names)}. "
        f"This run would save those steps again and would overwrite them, so it does not "
        f"start. To continue the newest instead, run with train.resume={newer[-1][0]}. "
        f"{then}."
    )


def remove_stale_temps(root: Path) -> list[Path]:
    """Delete `*.tmp-*` entries: unfinished saves, deletions and `latest` updates that
    a crash interrupted. Only called by rank 0 after its own save committed, when no
    other save into `root` can be in flight."""
    removed = []
    for path in root.iterdir():
        if _TMP_TAG not in path.name:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed
