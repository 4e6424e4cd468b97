"""The commit protocol's file operations, `latest` and pruning, and the pre-load
checks, without processes or megatron (fake checkpoint directories). The resume
resolution and the integrity checks: tests/training/test_checkpoint_integrity.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_longalign.data.planner import PlanPosition
from megatron_longalign.training import checkpoint
from megatron_longalign.training.checkpoint import (
    MARKER,
    CheckpointError,
    CheckpointManager,
    TrainingState,
)


def fake_checkpoint(
    root: Path, step: int, complete: bool = True, previous: str | None = None
) -> Path:
    """A step directory with a dummy shard, and the marker (with the shard's size) if
    `complete`."""
    path = root / checkpoint.step_dir_name(step)
    path.mkdir(parents=True)
    (path / "__0_0.distcp").write_bytes(b"shard")
    if complete:
        marker = {
            "format_version": 1,
            "step": step,
            "files": checkpoint.file_sizes(path),
            "previous": previous,
        }
        checkpoint.write_json_durably(path / MARKER, marker)
    return path


def commit(
    root: Path,
    step: int,
    keep_last: int | None = 3,
    *,
    run: set[str] | None = None,
    resumed_step: int = 0,
) -> Path:
    """What rank 0 does after every rank wrote the temp dir; `run` collects the names
    one run saved (what pruning may delete besides checkpoints up to `resumed_step`)."""
    run = set() if run is None else run
    temp = root / f"{checkpoint.step_dir_name(step)}.tmp-test{step}"
    temp.mkdir(parents=True)
    (temp / "__0_0.distcp").write_bytes(b"new")
    marker = {"format_version": 1, "step": step, "files": checkpoint.file_sizes(temp)}
    checkpoint.write_json_durably(temp / MARKER, marker)
    final = root / checkpoint.step_dir_name(step)
    checkpoint.publish(temp, final)
    run.add(final.name)
    checkpoint.point_latest(root, final.name)
    checkpoint.prune(root, keep_last, final.name, written=run, resumed_step=resumed_step)
    checkpoint.remove_stale_temps(root)
    return final


def names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_latest_is_none_without_checkpoints(tmp_path):
    assert CheckpointManager(tmp_path / "missing").latest() is None
    assert CheckpointManager(tmp_path).latest() is None


def test_temp_and_unmarked_directories_are_never_picked(tmp_path):
    good = fake_checkpoint(tmp_path, 5)
    fake_checkpoint(tmp_path, 9, complete=False)  # newer, but incomplete
    stale = tmp_path / "step_00000010.tmp-dead"
    stale.mkdir()
    (stale / MARKER).write_text(json.dumps({"format_version": 1, "step": 10}))
    checkpoint.point_latest(tmp_path, good.name)

    assert CheckpointManager(tmp_path).latest() == good
    assert checkpoint.complete_checkpoints(tmp_path) == [(5, good)]


def test_latest_naming_an_incomplete_checkpoint_raises(tmp_path):
    fake_checkpoint(tmp_path, 3, complete=False)
    checkpoint.point_latest(tmp_path, "step_00000003")
    with pytest.raises(CheckpointError, match=r"step_00000003/complete\.json is missing"):
        CheckpointManager(tmp_path).latest()
    (tmp_path / "latest").write_text("../elsewhere\n")
    with pytest.raises(CheckpointError, match="not a step_<N> directory"):
        CheckpointManager(tmp_path).latest()


def test_marker_must_match_directory_and_format(tmp_path):
    path = fake_checkpoint(tmp_path, 4)
    checkpoint.write_json_durably(path / MARKER, {"format_version": 1, "step": 5})
    with pytest.raises(CheckpointError, match="says step 5"):
        checkpoint.read_marker(path)
    checkpoint.write_json_durably(path / MARKER, {"format_version": 99, "step": 4})
    with pytest.raises(CheckpointError, match="format_version 99"):
        checkpoint.read_marker(path)


def test_crash_after_rename_before_latest_keeps_previous(tmp_path):
    """The rename is done but `latest` was not replaced: `latest` stays on the old
    checkpoint, and the complete orphan is never replaced by a later save of its step
    (a resume takes it instead: test_integrity.py)."""
    previous = commit(tmp_path, 1)
    orphan = fake_checkpoint(tmp_path, 2, previous=previous.name)
    assert CheckpointManager(tmp_path).latest() == previous

    with pytest.raises(CheckpointError, match="is a complete checkpoint; not replacing it"):
        commit(tmp_path, 2)
    assert (orphan / "__0_0.distcp").read_bytes() == b"shard"
    assert CheckpointManager(tmp_path).latest() == previous


def test_a_damaged_directory_under_the_step_name_is_set_aside_not_deleted(tmp_path):
    """A save of step 2 over a step_00000002 that is not complete (no marker, or a
    truncated file) keeps the old one as step_00000002.damaged-<id>; later saves'
    temp cleanup leaves it alone."""
    commit(tmp_path, 1)
    unmarked = fake_checkpoint(tmp_path, 2, complete=False)
    (unmarked / "__0_0.distcp").write_bytes(b"left by someone")
    commit(tmp_path, 2)
    damaged = fake_checkpoint(tmp_path, 3)
    (damaged / "__0_0.distcp").write_bytes(b"sh")  # truncated
    commit(tmp_path, 3)
    commit(tmp_path, 4)
    aside = sorted(p for p in tmp_path.iterdir() if ".damaged-" in p.name)
    assert [p.name.split(".")[0] for p in aside] == ["step_00000002", "step_00000003"]
    assert (aside[0] / "__0_0.distcp").read_bytes() == b"left by someone"
    assert (aside[1] / "__0_0.distcp").read_bytes() == b"sh"
    assert (tmp_path / "step_00000003" / "__0_0.distcp").read_bytes() == b"new"


def test_keep_last_prunes_oldest_and_cleans_temps(tmp_path):
    run: set[str] = set()
    for step in (1, 2, 3):
        commit(tmp_path, step, keep_last=2, run=run)
    assert names(tmp_path) == ["latest", "step_00000002", "step_00000003"]

    (tmp_path / "step_00000009.tmp-crashed").mkdir()
    (tmp_path / "latest.tmp-crashed").write_text("step_00000009\n")
    fake_checkpoint(tmp_path, 7, complete=False)  # not ours to delete: left alone
    commit(tmp_path, 4, keep_last=2, run=run)
    assert names(tmp_path) == ["latest", "step_00000003", "step_00000004", "step_00000007"]
    assert (tmp_path / "latest").read_text() == "step_00000004\n"


def test_prune_never_deletes_latest_nor_newer_ones(tmp_path):
    """After resuming from step 2 (which a run now refuses to do while step 5 exists),
    a stale step 5 of the abandoned run is newer than the new latest (step 3);
    keep_last=1 keeps step 3 and leaves step 5 alone."""
    for step in (1, 2, 5):
        fake_checkpoint(tmp_path, step)
    commit(tmp_path, 3, keep_last=1, resumed_step=2)
    assert names(tmp_path) == ["latest", "step_00000003", "step_00000005"]
    assert CheckpointManager(tmp_path).latest() == tmp_path / "step_00000003"


def test_prune_deletes_only_this_runs_checkpoints_and_those_up_to_the_resume_point(tmp_path):
    """Resumed from step 2: another run's step 3 (older than this run's latest, newer
    than its resume point) survives keep_last=1; 1 and 2 (up to the resume point) and
    this run's own 4 go."""
    for step in (1, 2, 3):
        fake_checkpoint(tmp_path, step)
    run: set[str] = set()
    commit(tmp_path, 4, keep_last=1, run=run, resumed_step=2)
    commit(tmp_path, 5, keep_last=1, run=run, resumed_step=2)
    assert names(tmp_path) == ["latest", "step_00000003", "step_00000005"]
    # A fresh run (resume point 0) deletes nothing it did not write.
    other = tmp_path / "other"
    for step in (1, 2):
        fake_checkpoint(other, step)
    commit(other, 3, keep_last=1)
    assert names(other) == ["latest", "step_00000001", "step_00000002", "step_00000003"]


def test_interrupted_delete_leaves_no_step_directory(tmp_path, monkeypatch):
    """A checkpoint is renamed to a temp name before rmtree, so a crash during the
    delete can never leave a half-deleted directory under a step name."""
    path = fake_checkpoint(tmp_path, 1)

    def crash(_path, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.shutil, "rmtree", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.remove_dir(path)
    assert not path.exists()
    assert checkpoint.complete_checkpoints(tmp_path) == []
    monkeypatch.undo()
    assert checkpoint.remove_stale_temps(tmp_path) and names(tmp_path) == []


def test_saving_over_a_complete_checkpoint_is_refused_before_writing(tmp_path):
    """Whether `latest` names it or not: a complete step_<N> is never saved over."""
    manager = CheckpointManager(tmp_path)
    final = commit(tmp_path, 6)
    fake_checkpoint(tmp_path, 9)  # complete, not `latest`
    for path in (final, tmp_path / "step_00000009"):
        temp_name, refusal = manager._plan_save(path)
        assert temp_name == "" and "is already a complete checkpoint" in refusal
    temp_name, refusal = manager._plan_save(tmp_path / "step_00000007")
    assert refusal is None and temp_name.startswith("step_00000007.tmp-")
    fake_checkpoint(tmp_path, 8, complete=False)  # not complete: set aside at the commit
    temp_name, refusal = manager._plan_save(tmp_path / "step_00000008")
    assert refusal is None and temp_name.startswith("step_00000008.tmp-")


def test_manager_arguments_are_validated():
    with pytest.raises(ValueError, match="flattened_range is not supported"):
        CheckpointManager("x", optimizer_format="fully_sharded_model_space")
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager("x", keep_last=0)


def test_training_state_round_trips_and_extra_must_be_json():
    state = TrainingState(7, 56, PlanPosition(epoch=1, step=3), {"run_id": "r", "n": [1, 2]})
    assert TrainingState.from_json(json.loads(json.dumps(state.to_json()))) == state
    checkpoint._check_state(state)
    with pytest.raises(ValueError, match="JSON-serialisable"):
        checkpoint._check_state(TrainingState(1, 1, PlanPosition(), {"bad": object()}))


def layout(tp: int = 1, pp: int = 1, dp: int = 1) -> dict[str, int]:
    return {
        "world_size": tp * pp * dp,
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp,
        "context_parallel_size": 1,
        "expert_model_parallel_size": 1,
        "data_parallel_size": dp,
        "model_chunks": 1,
    }


def marker(optimizer_format: str, saved_layout: dict) -> dict:
    return {
        "layout": saved_layout,
        "sharding_metadata": checkpoint.sharding_metadata(optimizer_format),
        "has_optimizer": True,
        "has_scheduler": True,
    }


def test_dp_reshardable_optimizer_refuses_tp_or_pp_change():
    saved = marker("dp_reshardable", layout(tp=2))
    with pytest.raises(CheckpointError, match=r"reshards only in data parallelism.*TP/PP"):
        checkpoint._check_loadable(saved, layout(tp=1), optimizer=object(), scheduler=None)
    with pytest.raises(CheckpointError, match="pipeline_model_parallel_size 1 -> 2"):
        checkpoint._check_loadable(
            marker("dp_reshardable", layout()), layout(pp=2), optimizer=object(), scheduler=None
        )
    # fine: model only, a DP-only change, or a fully reshardable format
    checkpoint._check_loadable(saved, layout(tp=1), optimizer=None, scheduler=None)
    checkpoint._check_loadable(saved, layout(tp=2, dp=4), optimizer=object(), scheduler=None)
    for name in ("fully_reshardable", "fully_reshardable_mem_efficient"):
        full = marker(name, layout(tp=2))
        checkpoint._check_loadable(full, layout(pp=2), optimizer=object(), scheduler=None)


def test_loading_state_the_checkpoint_lacks_is_refused():
    saved = {**marker("dp_reshardable", layout()), "has_optimizer": False}
    with pytest.raises(CheckpointError, match="no optimizer state"):
        checkpoint._check_loadable(saved, layout(), optimizer=object(), scheduler=None)
    saved = {**marker("dp_reshardable", layout()), "has_scheduler": False}
    with pytest.raises(CheckpointError, match="no scheduler state"):
        checkpoint._check_loadable(saved, layout(), optimizer=None, scheduler=object())


def test_sharding_metadata_maps_mem_efficient_variant():
    meta = checkpoint.sharding_metadata("fully_reshardable_mem_efficient")
    assert meta["distrib_optim_sharding_type"] == "fully_reshardable"
    assert meta["distrib_optim_fully_reshardable_mem_efficient"] is True
    assert checkpoint.sharding_metadata("dp_reshardable")["distrib_optim_sharding_type"] == (
        "dp_reshardable"
    )
