"""Which checkpoint a run resumes from (`resolve_resume`, `train.resume`), what counts as
complete (the marker and every file's recorded size), and the messages for a damaged
checkpoint or `latest`: on fake checkpoint directories, without processes or megatron.
The same situations end to end through `python -m megatron_longalign.train`:
tests/reliability/test_checkpoints.py."""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

import pytest

from megatron_longalign.training import checkpoint
from megatron_longalign.training.checkpoint import (
    MARKER,
    CheckpointError,
    CheckpointManager,
    read_marker,
    resolve_resume,
)
from megatron_longalign.training.validate import config_problems
from tests.helpers.tiny_training import tiny_training_config
from tests.training.test_checkpoint_protocol import commit, fake_checkpoint, names

STEP = checkpoint.step_dir_name


def run_with(root: Path, *steps: int) -> dict[int, Path]:
    """root with complete checkpoints `steps` (committed in order, all kept) and
    `latest` on the last."""
    run: set[str] = set()
    return {step: commit(root, step, keep_last=None, run=run) for step in steps}


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---- integrity ---------------------------------------------------------------------------


def test_marker_records_every_file_size_and_a_truncated_file_is_named(tmp_path):
    saved = run_with(tmp_path, 2, 4)
    shard = saved[4] / "__0_0.distcp"
    assert read_marker(saved[4])["files"] == {"__0_0.distcp": 3}
    shard.write_bytes(b"ne")
    with pytest.raises(CheckpointError) as err:
        read_marker(saved[4])
    message = str(err.value)
    assert f"{shard} has 2 bytes, the save wrote 3" in message
    assert f"train.resume={saved[2]}" in message  # the previous complete checkpoint
    assert "\n" not in message
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard} is missing"):
        read_marker(saved[4])
    assert checkpoint.intact_checkpoints(tmp_path) == [(2, saved[2])]


def test_markers_without_sizes_still_load(tmp_path):
    """Checkpoints saved before sizes were recorded are read as before."""
    path = tmp_path / STEP(3)
    path.mkdir()
    checkpoint.write_json_durably(path / MARKER, {"format_version": 1, "step": 3})
    assert read_marker(path)["step"] == 3


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b'{"format_version": 1, "st', "complete.json is not valid JSON"),
        (b"\xff\xfe\x00garbage", "complete.json is not valid JSON"),
        (b"[1, 2]", "complete.json lacks format_version or step"),
        (b"", "complete.json is not valid JSON"),
    ],
)
def test_a_broken_marker_is_named(tmp_path, content, expected):
    saved = run_with(tmp_path, 1, 2)
    (saved[2] / MARKER).write_bytes(content)
    with pytest.raises(CheckpointError, match=expected) as err:
        read_marker(saved[2])
    assert f"train.resume={saved[1]}" in str(err.value)


def test_no_earlier_checkpoint_says_how_to_start_fresh(tmp_path):
    saved = run_with(tmp_path, 1)
    (saved[1] / MARKER).unlink()
    with pytest.raises(CheckpointError, match="no earlier complete checkpoint.*train.resume=never"):
        read_marker(saved[1])


def dcp_checkpoint(root: Path, step: int, *, record_sizes: bool) -> Path:
    """A small real torch_dist-like checkpoint directory: a DCP index and shard, a torch
    `common.pt`, `metadata.json` and the marker (with or without the file sizes)."""
    import torch
    import torch.distributed.checkpoint as dcp

    path = root / STEP(step)
    with warnings.catch_warnings():  # "torch.distributed is disabled...": intended
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"w": torch.arange(4096.0)}, checkpoint_id=str(path), no_dist=True)
    torch.save({"step": step}, path / "common.pt")
    (path / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    marker = {"format_version": 1, "step": step}
    if record_sizes:
        marker["files"] = checkpoint.file_sizes(path)
    checkpoint.write_json_durably(path / MARKER, marker)
    return path


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("truncate_shard", r"__0_0\.distcp has 100 bytes, but the checkpoint's index places"),
        ("zero_common_tail", r"common\.pt is corrupt or truncated"),
        ("garbage_index", r"\.metadata cannot be read"),
        ("bad_json", r"metadata\.json cannot be read"),
    ],
    ids=["truncated shard", "zeroed common.pt tail", "garbage index", "bad metadata.json"],
)
def test_a_failed_load_names_the_damaged_file(tmp_path, damage, expected):
    """For checkpoints whose marker records no sizes (saved before), and for damage that
    keeps the size: after a failed load, a cheap look finds the file."""
    previous = dcp_checkpoint(tmp_path, 1, record_sizes=False)
    path = dcp_checkpoint(tmp_path, 2, record_sizes=False)
    assert checkpoint._find_damage(path) is None
    if damage == "truncate_shard":
        shard = next(path.glob("*.distcp"))
        shard.write_bytes(shard.read_bytes()[:100])
    elif damage == "zero_common_tail":
        data = (path / "common.pt").read_bytes()
        (path / "common.pt").write_bytes(data[:-200] + bytes(200))
    elif damage == "garbage_index":
        (path / ".metadata").write_bytes(b"\x80\x04garbage")
    else:
        (path / "metadata.json").write_text("{")
    message = checkpoint._unreadable_message(path, EOFError())
    assert message.startswith(f"checkpoint {path} could not be read (EOFError); ")
    assert re.search(expected, message), message
    assert message.endswith(f"train.resume={previous}.")


def test_unreadable_message_names_the_file_when_the_error_does(tmp_path):
    saved = {s: dcp_checkpoint(tmp_path, s, record_sizes=True) for s in (1, 2)}
    inner = OSError(f"unexpected end of {saved[2] / 'common.pt'}")
    try:
        try:
            raise inner
        except OSError as err:
            raise RuntimeError("load failed") from err
    except RuntimeError as outer:
        message = checkpoint._unreadable_message(saved[2], outer)
    assert message.startswith(f"checkpoint {saved[2]} could not be read (RuntimeError: ")
    assert f"load failed) in {saved[2] / 'common.pt'}. One of its files" in message
    assert "(each still has the size the save wrote)" in message
    assert f"train.resume={saved[1]}" in message


# ---- latest ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"\x89\xe8\x00\xffstep", "holds 8 bytes of binary data"),
        (b"", "contains ''"),
        (b"../elsewhere\n", "contains '../elsewhere'"),
    ],
)
def test_a_broken_latest_is_named_with_the_newest_complete_checkpoint(tmp_path, content, expected):
    saved = run_with(tmp_path, 2, 4)
    (tmp_path / "latest").write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        resolve_resume("auto", tmp_path)
    message = str(err.value)
    assert f"{tmp_path / 'latest'} is unreadable" in message and expected in message
    assert "not a step_<N> directory name" in message
    assert f"train.resume={saved[4]}" in message


# ---- resume resolution -------------------------------------------------------------------


def test_auto_without_latest_resumes_from_the_newest_complete_and_says_so(tmp_path, caplog):
    saved = run_with(tmp_path, 2, 4, 6)
    (tmp_path / "latest").unlink()
    before = snapshot(tmp_path)
    with caplog.at_level(logging.WARNING, logger=checkpoint.logger.name):
        assert resolve_resume("auto", tmp_path) == saved[6]
    assert f"no `latest` in {tmp_path}: resuming from the newest complete checkpoint" in (
        caplog.text
    )
    assert snapshot(tmp_path) == before


def test_auto_never_skips_a_damaged_newest_checkpoint(tmp_path):
    """Without `latest` and with the newest step damaged (or unmarked), auto stops and
    names the previous complete one rather than stepping back silently."""
    saved = run_with(tmp_path, 2, 4, 6)
    (tmp_path / "latest").unlink()
    (saved[6] / "__0_0.distcp").write_bytes(b"n")
    with pytest.raises(CheckpointError, match=f"train.resume={saved[4]}"):
        resolve_resume("auto", tmp_path)
    (saved[6] / MARKER).unlink()
    with pytest.raises(CheckpointError, match="complete.json is missing"):
        resolve_resume("auto", tmp_path)


def test_auto_with_nothing_saved_starts_fresh(tmp_path):
    assert resolve_resume("auto", tmp_path / "missing") is None
    assert resolve_resume("auto", tmp_path) is None
    assert resolve_resume("auto", None) is None


def test_auto_follows_latest(tmp_path):
    saved = run_with(tmp_path, 2, 4)
    assert resolve_resume("auto", tmp_path) == saved[4]
    assert resolve_resume(str(tmp_path), None) == saved[4]  # a root given as a path


def test_a_resume_older_than_a_complete_checkpoint_is_refused(tmp_path):
    saved = run_with(tmp_path, 2, 4, 6)
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointError) as err:
        resolve_resume(str(saved[2]), tmp_path)
    message = str(err.value)
    assert f"resumes from {saved[2]} (step 2)" in message
    assert f"{tmp_path} already has newer complete checkpoints {STEP(4)}, {STEP(6)}" in message
    assert f"train.resume={saved[6]}" in message
    assert f"move {STEP(4)} {STEP(6)} out of {tmp_path}" in message
    # The same older checkpoint into another checkpoint_dir is fine.
    assert resolve_resume(str(saved[2]), tmp_path / "elsewhere") == saved[2]
    assert resolve_resume(str(saved[2]), None) == saved[2]
    assert snapshot(tmp_path) == before


def test_a_fresh_start_over_complete_checkpoints_is_refused(tmp_path):
    run_with(tmp_path, 2)
    for value in ("never", "none", None):
        with pytest.raises(
            CheckpointError,
            match=r"starts fresh \(step 0\), but .* already has complete checkpoints step_00000002",
        ):
            resolve_resume(value, tmp_path)
        assert resolve_resume(value, tmp_path / "new") is None


def test_damaged_newer_checkpoints_do_not_block_a_resume(tmp_path, caplog):
    """The way out the damage message offers (train.resume=<previous>) works: a newer
    checkpoint that is not complete is no reason to refuse (a save of that step sets it
    aside)."""
    saved = run_with(tmp_path, 2, 4)
    (saved[4] / "__0_0.distcp").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger=checkpoint.logger.name):
        assert resolve_resume(str(saved[2]), tmp_path) == saved[2]
    assert f"{saved[4]} is not a complete checkpoint" in caplog.text


def test_latest_behind_a_published_successor(tmp_path, caplog):
    """A crash between the rename of step 2 and the `latest` update: the marker of step
    2 names step 1 as its predecessor, so auto takes step 2. A newer checkpoint without
    that record (another run's) makes auto refuse instead."""
    saved = run_with(tmp_path, 1)
    orphan = fake_checkpoint(tmp_path, 2, previous=saved[1].name)
    with caplog.at_level(logging.WARNING, logger=checkpoint.logger.name):
        assert resolve_resume("auto", tmp_path) == orphan
    assert "`latest` was never updated" in caplog.text

    other = tmp_path / "other"
    run_with(other, 1)
    fake_checkpoint(other, 2)  # no `previous`
    with pytest.raises(CheckpointError, match=r"train.resume=auto resumes from .*step_00000001"):
        resolve_resume("auto", other)


def test_a_resume_path_that_is_no_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(CheckpointError, match="neither a checkpoint directory"):
            resolve_resume(str(path), None)


def test_the_manager_records_previous_and_file_sizes(tmp_path):
    """What `_commit_on_rank0` adds to the marker (no process group needed)."""
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2):
        temp = tmp_path / f"{STEP(step)}.tmp-x"
        temp.mkdir()
        (temp / "common.pt").write_bytes(b"x" * step)
        assert (
            manager._commit_on_rank0(
                temp, tmp_path / STEP(step), {"format_version": 1, "step": step}
            )
            is None
        )
    marker = read_marker(tmp_path / STEP(2))
    assert marker["files"] == {"common.pt": 2} and marker["previous"] == STEP(1)
    assert read_marker(tmp_path / STEP(1))["previous"] is None
    assert names(tmp_path) == ["latest", STEP(1), STEP(2)]


# ---- config --------------------------------------------------------------------------------


def resume_problems(resume) -> list[str]:
    config = tiny_training_config({"a": "/unused"}, resume=resume)
    return [p for p in config_problems(config, check_files=False) if "train.resume" in p]


def test_train_resume_is_validated(tmp_path):
    for ok in ("auto", "never", "none", None, str(tmp_path)):
        assert resume_problems(ok) == [], ok
    (problem,) = resume_problems("Auto")
    assert problem.startswith("train.resume='Auto': no such file or directory; use auto")
    (problem,) = resume_problems(" ")
    assert problem.startswith("train.resume must be one of: auto")
