"""Atomic, resumable training checkpoints: model, optimizer, LR scheduler, data position
and RNG state, in megatron-core's resharding-capable torch_dist format (checkpoint_io).

On disk, under `root`:

    step_00000200/                  one complete checkpoint
        metadata.json, common.pt, .metadata, __<rank>_<i>.distcp   (torch_dist files)
        complete.json               marker: step, layout, sharding format; written last
    step_00000300.tmp-<hex>/        a save in progress, or one a crash left behind
    latest                          the name of the newest complete checkpoint

Commit protocol (`CheckpointManager.save`, every rank calls it):
1. Rank 0 picks the temp name `step_<N>.tmp-<hex>` and broadcasts it, so every rank
   writes into the same directory.
2. All ranks write their shards (synchronously; each file is fsynced), then barrier.
3. Rank 0 writes `complete.json` into the temp dir, renames the temp dir to `step_<N>`,
   and only then replaces `latest` (temp file, fsync, `os.replace`). It then prunes old
   checkpoints and deletes leftover `*.tmp-*` entries.
4. Rank 0 broadcasts success (or its error, so no rank waits forever in a barrier).

A crash at any point leaves `latest` naming the previous complete checkpoint: the new
one becomes visible only through the final `os.replace` of `latest`, and a directory
without `complete.json` is never loaded. Deletions rename the directory to a `*.tmp-*`
name first, so a half-deleted checkpoint can never look complete either.

What is stored where:
- model chunks: `chunk.sharded_state_dict()` (ShardedTensors: reshard to any TP/PP);
- optimizer: `optimizer.sharded_state_dict(model_sd, is_loading, metadata=...)` and
  `optimizer.load_state_dict` (megatron-core 0.16.1's API, used as Megatron-LM uses
  it). megatron's branch for torch's Adam (its fallback without TE/apex: CPU runs) has
  bugs around Adam's per-parameter 'step' that would break an exact resume; that case
  is loaded step by step here (`_load_dist_torch_adam`), the TE/apex path is untouched;
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron_longalign.data.planner import PlanPosition
from megatron_longalign.training.checkpoint_io import load_sharded, save_sharded

logger = logging.getLogger(__name__)

MARKER = "complete.json"
LATEST = "latest"
FORMAT_VERSION = 1
OPTIMIZER_FORMATS = ("dp_reshardable", "fully_reshardable", "fully_reshardable_mem_efficient")
DEFAULT_OPTIMIZER_FORMAT = "dp_reshardable"

_STEP_DIR = re.compile(r"step_(\d{8,})")
_TMP_TAG = ".tmp-"
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
    """What the trainer needs besides module state to continue exactly."""

    step: int
    consumed_samples: int
    plan_position: PlanPosition  # data position (epoch, step) of the NEXT global batch
    extra: dict = field(default_factory=dict)  # small JSON-able things (run id, config hash)

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
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 or None (keep all), got {keep_last}")
        if optimizer_format not in OPTIMIZER_FORMATS:
            why = (
                " (megatron-core 0.16.1 cannot save it: flattened_range is not supported)"
                if optimizer_format == "fully_sharded_model_space"
                else ""
            )
            raise ValueError(
                f"optimizer_format must be one of {OPTIMIZER_FORMATS}, got "
                f"{optimizer_format!r}{why}"
            )
        self.root = Path(root)
        self.keep_last = keep_last
        self.optimizer_format = optimizer_format

    # ------------------------------------------------------------ save

    def save(self, state: TrainingState, model: list, optimizer, scheduler) -> Path:
        """Write a checkpoint of `state`, the model chunks, optimizer and scheduler
        (either may be None) to root/step_<step>, then point `latest` at it.
        Collective: every rank calls it with the same `state`."""
        _check_state(state)
        final_dir = self.root / step_dir_name(state.step)
        temp_name, refusal = _broadcast_from_rank0(lambda: self._plan_save(final_dir))
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
        error = _broadcast_from_rank0(lambda: self._commit_on_rank0(temp_dir, final_dir, marker))
        if error:
            raise CheckpointError(f"committing {final_dir} failed on rank 0: {error}")
        return final_dir

    def _plan_save(self, final_dir: Path) -> tuple[str, str | None]:
        """Rank 0: the temp directory name, or why this save must not happen."""
        if final_dir.exists() and self._latest_name() == final_dir.name:
            return "", (
                f"{final_dir} already exists and `latest` points to it; a step is saved "
                "once (skip the save when the latest checkpoint is already this step)"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        return f"{final_dir.name}{_TMP_TAG}{uuid.uuid4().hex[:12]}", None

    def _commit_on_rank0(self, temp_dir: Path, final_dir: Path, marker: dict) -> str | None:
        """Rank 0: marker, rename, `latest`, prune, in that order. Returns an error
        message instead of raising, so the other ranks learn of it."""
        try:
            write_json_durably(temp_dir / MARKER, marker)
            publish(temp_dir, final_dir)
            point_latest(self.root, final_dir.name)
        except Exception as err:  # reported to every rank, which all raise
            logger.exception("checkpoint commit failed")
            return f"{type(err).__name__}: {err}"
        logger.info("saved checkpoint %s", final_dir)
        try:  # housekeeping: the checkpoint is committed whatever happens here
            prune(self.root, self.keep_last, final_dir.name)
            remove_stale_temps(self.root)
        except OSError:
            logger.exception("pruning old checkpoints under %s failed", self.root)
        return None

    # ------------------------------------------------------------ find

    def _latest_name(self) -> str | None:
        try:
            return (self.root / LATEST).read_text().strip()
        except FileNotFoundError:
            return None

    def latest(self) -> Path | None:
        """The checkpoint `root/latest` names, validated as complete; None when there is
        no `latest` (nothing saved yet). Leftover temp dirs and directories without the
        marker are never returned. Raises CheckpointError if `latest` is broken."""
        name = self._latest_name()
        if name is None:
            return None
        if not _STEP_DIR.fullmatch(name):
            raise CheckpointError(
                f"{self.root / LATEST} contains {name!r}, not a step_<N> directory name; "
                "fix or delete that file"
            )
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
        marker = read_marker(path)
        layout = current_layout(model)
        _check_loadable(marker, layout, optimizer, scheduler)
        same_layout = marker["layout"] == layout

        metadata = marker["sharding_metadata"]  # build the request in the saved format
        if optimizer is not None:
            _prime_empty_torch_adam(optimizer)
        sharded = _module_sharded_state_dict(model, optimizer, metadata, is_loading=True)
        if same_layout:
            sharded[_RNG_KEY] = _rng_sharded_object(None)
        loaded = load_sharded(sharded, path)

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
        return TrainingState.from_json(common["training_state"])


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


def _dist_optimizer_parts(optimizer) -> list:
    """The megatron optimizers a (possibly chained) optimizer is made of."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _is_dist_torch_adam(part) -> bool:
    """A megatron DistributedOptimizer over torch's Adam/AdamW: megatron's fallback
    without TE/apex (CPU runs). Its checkpoint path needs the fixes below; TE/apex
    FusedAdam (GPU) keeps the step in param_groups and goes through megatron as is."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inner = getattr(part, "optimizer", None)
    return isinstance(part, DistributedOptimizer) and isinstance(inner, torch.optim.Adam)


def _prime_empty_torch_adam(optimizer) -> None:
    """Give a fresh distributed optimizer over torch's Adam zero state.

    megatron-core 0.16.1's `DistributedOptimizer.state_dict()`, which its
    `sharded_state_dict(is_loading=True)` calls, asserts that torch's Adam already has
    per-parameter state with a 'step'. A fresh optimizer has none, so a resume would
    fail before reading anything. The load overwrites every value set here.
    """
    for part in filter(_is_dist_torch_adam, _dist_optimizer_parts(optimizer)):
        inner = part.optimizer
        if inner.state:
            continue
        for group in inner.param_groups:
            for param in group["params"]:
                inner.state[param].update(
                    exp_avg=torch.zeros_like(param),
                    exp_avg_sq=torch.zeros_like(param),
                    step=torch.tensor(0.0),
                )


def load_optimizer_state(optimizer, state) -> None:
    """`optimizer.load_state_dict(state)` for a state built by `sharded_state_dict`
    (megatron's API), with the torch-Adam fixes of `_load_dist_torch_adam`."""
    parts = _dist_optimizer_parts(optimizer)
    # With fp32 params the distributed optimizer's main params are views of the
    # model's leaf parameters; megatron copies into them in place.
    with torch.no_grad():
        if not any(_is_dist_torch_adam(part) for part in parts):
            optimizer.load_state_dict(state)
            return
        # ChainedOptimizer.load_state_dict's own split: one state per part.
        if len(parts) == 1:
            part_states = [state]
        elif isinstance(state, dict):
            part_states = [v for _, v in sorted(state.items())]
        else:
            part_states = list(state)
        for part, part_state in zip(parts, part_states, strict=True):
            if _is_dist_torch_adam(part):
                _load_dist_torch_adam(part, part_state)
            else:
                part.load_state_dict(part_state)


_PARAM_STATE_LOADERS = {
    "dp_reshardable": "load_parameter_state_from_dp_reshardable",
    "fully_reshardable": "load_parameter_state_from_fully_reshardable",
}


def _load_dist_torch_adam(part, state: dict) -> None:
    """`DistributedOptimizer.load_state_dict` for torch's Adam, step by step.

    megatron-core 0.16.1 mishandles torch Adam's per-parameter 'step' here:
    - after setting it from the checkpoint, the parameter-state load copies every key
      of the live state from the loaded tensors: "fully_reshardable" has no 'step'
      there (KeyError), and "dp_reshardable" holds the pre-load step (it would undo
      the restore);
    - it puts one and the same step tensor into every parameter's state, which torch's
      Adam then increments once per parameter.
    So: load the common part (param groups, which carry the checkpoint's step), take
    'step' out of the live state, load the parameter state, and give every parameter
    its own tensor with the checkpoint's step.
    """
    state = dict(state)
    param_state = state.pop("param_state")
    sharding_type = state.pop("param_state_sharding_type")
    if sharding_type not in _PARAM_STATE_LOADERS:
        raise CheckpointError(f"optimizer state format {sharding_type!r} is not supported")
    part.load_state_dict(state)  # no param_state: groups, step, state allocation only
    inner = part.optimizer
    for param_state_of_one in inner.state.values():
        param_state_of_one.pop("step", None)
    getattr(part, _PARAM_STATE_LOADERS[sharding_type])(param_state)
    for group in inner.param_groups:
        step = group.pop("step", None)  # megatron's load leaves the checkpoint's step here
        if step is None and group["params"]:
            raise CheckpointError("the loaded optimizer param group has no Adam 'step'")
        for param in group["params"]:
            inner.state[param]["step"] = torch.tensor(float(step))


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
            "saved layout; save with optimizer_format='fully_reshardable' to change "
            "TP/PP later"
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


def _fsync_dir(path: Path) -> None:
    # A rename or new file is durable only once its directory entry is flushed.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_json_durably(path: Path, data: dict) -> None:
    _write_durably(path, json.dumps(data, indent=1, sort_keys=True) + "\n")
    _fsync_dir(path.parent)


def publish(temp_dir: Path, final_dir: Path) -> None:
    """Rename the finished temp dir into place. A `step_<N>` already there is a stale
    leftover (`save` refuses to replace the one `latest` names): move it aside first."""
    if final_dir.exists():
        logger.warning("replacing stale %s (not the latest checkpoint)", final_dir)
        remove_dir(final_dir)
    os.rename(temp_dir, final_dir)
    _fsync_dir(final_dir.parent)


def point_latest(root: Path, name: str) -> None:
    """Atomically make root/latest name `name` (temp file, fsync, os.replace)."""
    temp = root / f"{LATEST}{_TMP_TAG}{uuid.uuid4().hex[:12]}"
    _write_durably(temp, name + "\n")
    os.replace(temp, root / LATEST)
    _fsync_dir(root)


def read_marker(path: Path) -> dict[str, Any]:
    """The marker of a complete checkpoint directory; CheckpointError otherwise."""
    hint = "load an older checkpoint explicitly, or delete `latest` to start fresh"
    marker_path = path / MARKER
    if not marker_path.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {MARKER}); {hint}")
    try:
        marker = json.loads(marker_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{marker_path} is not valid JSON ({err}); {hint}") from err
    if marker.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{marker_path} has format_version {marker.get('format_version')!r}, this code "
            f"reads {FORMAT_VERSION}"
        )
    match = _STEP_DIR.fullmatch(path.name)
    if match and int(match.group(1)) != marker["step"]:
        raise CheckpointError(f"{marker_path} says step {marker['step']}, the name disagrees")
    return marker


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete `step_<N>` directory, oldest first."""
    found = []
    for path in root.iterdir() if root.is_dir() else ():
        match = _STEP_DIR.fullmatch(path.name)
        if match and (path / MARKER).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def remove_dir(path: Path) -> None:
    """Delete a checkpoint directory without ever leaving a half-deleted one under a
    step name: rename it to a temp name first (a crash leaves only a temp dir)."""
    doomed = path.with_name(f"{path.name}{_TMP_TAG}deleting-{uuid.uuid4().hex[:12]}")
    os.rename(path, doomed)
    _fsync_dir(path.parent)
    shutil.rmtree(doomed)


def prune(root: Path, keep_last: int | None, latest_name: str) -> list[Path]:
    """Delete complete checkpoints older than the newest `keep_last` at or below the
    latest step; never the latest one. Newer ones (left by a run that was resumed from
    an earlier checkpoint) are kept until that step is saved again. Returns the
    deleted paths."""
    if keep_last is None:
        return []
    latest_step = int(_STEP_DIR.fullmatch(latest_name).group(1))
    candidates = [p for s, p in complete_checkpoints(root) if s <= latest_step]
    doomed = [p for p in candidates[: max(len(candidates) - keep_last, 0)] if p.name != latest_name]
    for path in doomed:
        remove_dir(path)
    return doomed


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


def _broadcast_from_rank0(compute):
    """Run `compute()` on rank 0 only and give its result to every rank."""
    holder = [compute() if torch.distributed.get_rank() == 0 else None]
    torch.distributed.broadcast_object_list(holder, src=0)
    return holder[0]
