"""Preprocessed sets are published atomically (P.json names the exact files of its set)
and checked when they are opened: no silent overwrite, no mixed sets after a crash,
leftovers of killed runs cleaned, damaged files named (issue 10)."""

from __future__ import annotations

import builtins
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_longalign.data import indexed
from megatron_longalign.data.indexed import (
    DataFileError,
    SFTIndexedDataset,
    megatron_prefix,
    open_dataset_files,
)
from megatron_longalign.devdata.random_dataset import write_random_dataset
from megatron_longalign.utils.atomic_files import AtomicFileSet, clean_leftovers
from tests.conftest import chat, write_lines
from tests.data.test_preprocess import GOOD, convert

# ---- helpers -----------------------------------------------------------------------------


def dead_pid() -> int:
    """The pid of a process that has exited (and was reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def tokens_of(prefix) -> list[list[int]]:
    dataset = SFTIndexedDataset(str(prefix), verify=True)
    return [dataset[i].tokens.tolist() for i in range(len(dataset))]


def set_files(prefix) -> set[str]:
    """P.json and the names it lists."""
    meta = json.loads(Path(f"{prefix}.json").read_text())
    return {Path(f"{prefix}.json").name, *(r["name"] for r in meta["files"].values())}


def random_set(prefix, lengths, seed, overwrite=False) -> list[list[int]]:
    write_random_dataset(str(prefix), np.array(lengths), 300, seed, overwrite=overwrite)
    return tokens_of(prefix)


# ---- no silent overwrite -----------------------------------------------------------------


def test_an_existing_set_is_refused_without_overwrite_before_any_tokenizing(
    tmp_path, sp_model, capsys
):
    data = write_lines(tmp_path / "in.jsonl", GOOD)
    prefix = tmp_path / "out" / "ds"
    assert convert(data, sp_model, "plain", prefix) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    small = write_lines(tmp_path / "small.jsonl", GOOD[:1])
    capsys.readouterr()
    # A tokenizer that does not exist: the refusal must come before it is even loaded.
    assert convert(small, tmp_path / "no_tokenizer", "plain", prefix) == 1
    err = capsys.readouterr().err
    assert f"{prefix}.json already exists" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


def test_overwrite_publishes_the_new_set_then_deletes_the_old_files(tmp_path, sp_model):
    prefix = tmp_path / "ds"
    first = write_lines(tmp_path / "a.jsonl", GOOD)
    second = write_lines(tmp_path / "b.jsonl", [chat("x", "y")])
    assert convert(first, sp_model, "plain", prefix) == 0
    old_files = set_files(prefix)
    assert convert(second, sp_model, "plain", prefix, "--overwrite") == 0
    assert len(SFTIndexedDataset(str(prefix))) == 1
    # Only the new set remains: the old files were deleted after the commit.
    assert {p.name for p in tmp_path.glob("ds.*")} == set_files(prefix)
    assert not (old_files - {"ds.json"}) & set_files(prefix)


def test_overwriting_an_old_format_set_deletes_its_fixed_name_files(tmp_path, sp_model):
    prefix = tmp_path / "ds"
    legacy = [tmp_path / f"ds{s}" for s in indexed.LEGACY_SUFFIXES]
    for path in legacy:
        path.write_bytes(b"sft-v1 data")
    Path(f"{prefix}.json").write_text(json.dumps({"format": "megatron-longalign/sft-v1"}))
    with pytest.raises(DataFileError, match="old data format"):
        SFTIndexedDataset(str(prefix))
    data = write_lines(tmp_path / "in.jsonl", GOOD)
    assert convert(data, sp_model, "plain", prefix) == 1  # still refused without --overwrite
    assert all(p.exists() for p in legacy)
    assert convert(data, sp_model, "plain", prefix, "--overwrite") == 0
    assert {p.name for p in tmp_path.glob("ds.*")} == set_files(prefix)
    assert len(SFTIndexedDataset(str(prefix))) == 3


def test_same_inputs_give_the_same_file_names_and_bytes(tmp_path, sp_model):
    data = write_lines(tmp_path / "in.jsonl", GOOD)
    prefix = tmp_path / "ds"
    assert convert(data, sp_model, "plain", prefix) == 0
    before = {p.name: p.read_bytes() for p in tmp_path.glob("ds.*")}
    assert convert(data, sp_model, "plain", prefix, "--overwrite") == 0
    assert {p.name: p.read_bytes() for p in tmp_path.glob("ds.*")} == before


def test_overwriting_a_linked_manifest_leaves_the_linked_set_alone(tmp_path, sp_model):
    data = write_lines(tmp_path / "in.jsonl", GOOD)
    original = tmp_path / "orig" / "ds"
    assert convert(data, sp_model, "plain", original) == 0
    originals = {p.name: p.read_bytes() for p in original.parent.iterdir()}
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "ds.json").symlink_to(f"{original}.json")
    assert len(SFTIndexedDataset(str(linked / "ds"))) == 3  # a link to P.json is enough
    small = write_lines(tmp_path / "small.jsonl", GOOD[:1])
    assert convert(small, sp_model, "plain", linked / "ds", "--overwrite") == 0
    assert len(SFTIndexedDataset(str(linked / "ds"))) == 1
    assert {p.name: p.read_bytes() for p in original.parent.iterdir()} == originals


# ---- atomic publish: a crash at any step -------------------------------------------------


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs (abort is disabled, see below)."""


def _inject_fault_at(monkeypatch, step: int, as_kill: bool) -> list[str]:
    """Make the `step`-th file-system operation of AtomicFileSet.commit raise (counted:
    opens, fsyncs, renames, unlinks). As a kill, `abort` does nothing, as after SIGKILL.
    Returns the list the operations are recorded in."""
    calls: list[str] = []
    armed = [False]
    real_commit = AtomicFileSet.commit

    def commit(self, *args, **kwargs):
        armed[0] = True
        try:
            return real_commit(self, *args, **kwargs)
        finally:
            armed[0] = False

    def counted(name, real):
        def wrapper(*args, **kwargs):
            if armed[0]:
                calls.append(f"{name} {args[0] if args else ''}")
                if len(calls) == step:
                    raise Killed(calls[-1]) if as_kill else OSError(5, "injected I/O error")
            return real(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(AtomicFileSet, "commit", commit)
    for name in ("replace", "rename", "unlink", "fsync", "open"):
        monkeypatch.setattr(os, name, counted(name, getattr(os, name)))
    monkeypatch.setattr(builtins, "open", counted("builtins.open", builtins.open))
    if as_kill:
        monkeypatch.setattr(AtomicFileSet, "abort", lambda self: None)
    return calls


@pytest.mark.parametrize("as_kill", [True, False], ids=["kill", "exception"])
def test_a_crash_at_any_step_of_the_commit_leaves_the_old_or_the_new_set(
    tmp_path, monkeypatch, as_kill
):
    prefix = tmp_path / "sets" / "ds"
    old = random_set(prefix, [5, 7, 9], seed=1)
    new = random_set(tmp_path / "reference" / "ds", [4, 6], seed=2)
    step, outcomes = 0, []  # (operation, which set was there after it failed)
    tolerated = []  # operations whose failure the commit survives
    while True:
        step += 1
        with monkeypatch.context() as patch:
            calls = _inject_fault_at(patch, step, as_kill)
            try:
                write_random_dataset(str(prefix), np.array([4, 6]), 300, 2, overwrite=True)
                finished = True
            except (Killed, OSError):
                finished = False
        seen = tokens_of(prefix)  # complete: sizes, indexes and sha256 checked
        if finished:
            assert seen == new
            if len(calls) < step:
                break  # no step left to fail
            # The fault hit a best-effort step (a directory fsync) and was tolerated.
            tolerated.append(calls[step - 1])
        else:
            assert seen in (old, new), f"step {step} ({calls[-1]}): neither old nor new set"
            outcomes.append((calls[-1], "old" if seen == old else "new"))
            # Once the new set is there (P.json replaced), it stays.
            sets = [which for _, which in outcomes]
            assert sets == sorted(sets, key=["old", "new"].index), outcomes
        if not as_kill and seen == old:  # the error path cleans up: the old set, nothing else
            assert {p.name for p in prefix.parent.iterdir()} == set_files(prefix)
        # What a crash leaves is garbage that the next run removes.
        clean_leftovers(str(prefix), indexed.MEMBER_SUFFIXES)
        assert {p.name for p in prefix.parent.iterdir()} == set_files(prefix)
        assert tokens_of(prefix) == seen
        if seen == new:  # start again from the old set for the remaining steps
            for name in set_files(prefix):
                (prefix.parent / name).unlink()
            assert random_set(prefix, [5, 7, 9], seed=1) == old
    kinds = {call.split()[0] for call, _ in outcomes}
    # Every kind of step was hit: fsyncs, the temporary manifest, each rename, the
    # commit point, the old files' deletion.
    assert {"fsync", "builtins.open", "replace", "unlink"} <= kinds, outcomes
    renames = [call for call, _ in outcomes if call.startswith("replace")]
    assert len(renames) == 5, renames  # four members, then P.json: the commit point
    assert [which for call, which in outcomes if call.startswith("unlink")] == ["new"] * 4
    assert all(call.split()[0] in ("open", "fsync") for call in tolerated), tolerated


def test_a_crash_after_the_manifest_replace_leaves_the_new_set(tmp_path, monkeypatch):
    """Deleting the old files comes last: a kill there leaves the new set, complete, and
    orphans that the next run removes."""
    prefix = tmp_path / "ds"
    random_set(prefix, [5, 7, 9], seed=1)
    real_unlink = os.unlink

    def unlink(path, *args, **kwargs):
        if ".tmp-" not in str(path):
            raise Killed(path)
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    monkeypatch.setattr(AtomicFileSet, "abort", lambda self: None)
    with pytest.raises(Killed):
        write_random_dataset(str(prefix), np.array([4, 6]), 300, 2, overwrite=True)
    monkeypatch.undo()
    assert [len(t) for t in tokens_of(prefix)] == [4, 6]
    leftovers = clean_leftovers(str(prefix), indexed.MEMBER_SUFFIXES)
    assert len(leftovers.removed) == 4  # the old set's four files
    assert {p.name for p in tmp_path.iterdir()} == set_files(prefix)


# ---- leftovers of killed runs ------------------------------------------------------------


def test_a_rerun_removes_dead_leftovers_and_reports_live_ones(tmp_path, sp_model, caplog):
    prefix = tmp_path / "ds"
    dead = dead_pid()
    stale = [tmp_path / f"ds.bin.tmp-{dead}", tmp_path / f"ds.json.tmp-{dead}"]
    orphan = tmp_path / "ds.0123456789ab.regions.idx"  # renamed, never named by a P.json
    other_prefix = tmp_path / f"ds2.bin.tmp-{dead}"  # another prefix's: not ours to judge
    for path in [*stale, orphan, other_prefix]:
        path.write_bytes(b"partial")
    data = write_lines(tmp_path / "in.jsonl", GOOD)
    with caplog.at_level(logging.WARNING, logger="megatron_longalign.preprocess"):
        assert convert(data, sp_model, "plain", prefix) == 0
    assert not any(p.exists() for p in [*stale, orphan]) and other_prefix.exists()
    assert "removed 3 file(s)" in caplog.text
    assert all(p.name in caplog.text for p in [*stale, orphan])
    assert len(SFTIndexedDataset(str(prefix))) == 3

    caplog.clear()
    live = tmp_path / f"ds.idx.tmp-{os.getppid()}"  # our parent's: alive
    live.write_bytes(b"partial")
    with caplog.at_level(logging.WARNING, logger="megatron_longalign.preprocess"):
        assert convert(data, sp_model, "plain", prefix, "--overwrite") == 0
    assert live.read_bytes() == b"partial"
    assert f"{live} belongs to process {os.getppid()}, which is still running" in caplog.text


def test_unnamed_files_are_kept_while_another_run_is_active(tmp_path):
    prefix = tmp_path / "ds"
    orphan = tmp_path / "ds.0123456789ab.bin"
    live = tmp_path / f"ds.json.tmp-{os.getppid()}"
    orphan.write_bytes(b"x")
    live.write_text("{}")
    result = clean_leftovers(str(prefix), indexed.MEMBER_SUFFIXES)
    assert orphan.exists() and result.kept_orphans == [orphan]
    assert result.live == [(live, os.getppid())]


# ---- checks when a set is opened ---------------------------------------------------------


@pytest.fixture
def small_set(tmp_path) -> Path:
    prefix = tmp_path / "ds"
    random_set(prefix, [5, 7, 9], seed=1)
    return prefix


def _member(prefix, suffix) -> Path:
    return Path(open_dataset_files(str(prefix)).paths[suffix])


def _truncate(path: Path, by: int = 3) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-by])


def test_truncated_index_is_named_at_open(small_set):
    idx = _member(small_set, ".idx")
    _truncate(idx)
    with pytest.raises(DataFileError, match="truncated") as err:
        SFTIndexedDataset(str(small_set))
    assert str(idx) in str(err.value) and "tools/preprocess.py" in str(err.value)


def test_truncated_data_file_is_named_at_open(small_set):
    data = _member(small_set, ".regions.bin")
    _truncate(data, by=4)
    with pytest.raises(DataFileError, match="truncated") as err:
        SFTIndexedDataset(str(small_set))
    assert str(data) in str(err.value) and "--overwrite" in str(err.value)


def test_index_that_disagrees_with_its_data_is_named_even_if_sizes_match(small_set):
    """A writer bug rather than a truncation: P.json's sizes match, megatron's index does
    not describe the data file."""
    bin_path = _member(small_set, ".bin")
    bin_path.write_bytes(bin_path.read_bytes() + b"\0\0")
    meta = json.loads(Path(f"{small_set}.json").read_text())
    meta["files"][".bin"]["bytes"] += 2
    Path(f"{small_set}.json").write_text(json.dumps(meta))
    with pytest.raises(DataFileError, match="its index .* describes") as err:
        SFTIndexedDataset(str(small_set))
    assert str(bin_path) in str(err.value)


def test_missing_file_is_named(small_set):
    regions = _member(small_set, ".regions.idx")
    regions.unlink()
    with pytest.raises(DataFileError, match="is missing") as err:
        SFTIndexedDataset(str(small_set))
    assert str(regions) in str(err.value)


def test_old_format_is_refused_with_the_fix(small_set):
    meta = json.loads(Path(f"{small_set}.json").read_text())
    meta["format"] = "megatron-longalign/sft-v1"
    Path(f"{small_set}.json").write_text(json.dumps(meta))
    with pytest.raises(DataFileError, match="old data format") as err:
        SFTIndexedDataset(str(small_set))
    assert f"{small_set}.json" in str(err.value)
    assert f"tools/preprocess.py --output-prefix {small_set}" in str(err.value)


def test_garbage_metadata_is_named(small_set):
    Path(f"{small_set}.json").write_bytes(b'{"format": "megatron-longalign/sft-v2", \x00')
    with pytest.raises(DataFileError, match="is not valid JSON") as err:
        SFTIndexedDataset(str(small_set))
    assert f"{small_set}.json" in str(err.value)


def test_verify_detects_a_changed_byte(small_set):
    data = _member(small_set, ".bin")
    raw = bytearray(data.read_bytes())
    raw[0] ^= 1
    data.write_bytes(bytes(raw))
    SFTIndexedDataset(str(small_set))  # same size: the cheap checks pass
    with pytest.raises(DataFileError, match="sha256") as err:
        SFTIndexedDataset(str(small_set), verify=True)
    assert str(data) in str(err.value)


def test_megatron_reads_the_tokens_through_the_prefix_helper(small_set):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tokens = IndexedDataset(megatron_prefix(str(small_set)))
    assert tokens.sequence_lengths.tolist() == [5, 7, 9]
    regions = IndexedDataset(megatron_prefix(str(small_set), regions=True))
    assert len(regions) == 3


def test_a_set_moved_with_its_files_still_opens(small_set, tmp_path):
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    for name in set_files(small_set):
        shutil.move(str(small_set.parent / name), moved / name)
    assert [len(t) for t in tokens_of(moved / "ds")] == [5, 7, 9]


def test_verify_command_line(small_set, capsys):
    from tests.data.test_preprocess import cli

    assert cli.main(["--verify", str(small_set)]) == 0
    assert "ok: " in capsys.readouterr().out
    _truncate(_member(small_set, ".idx"))
    assert cli.main(["--verify", str(small_set)]) == 1
    assert "truncated" in capsys.readouterr().err


# ---- nothing handed out outlives megatron's mmap --------------------------------------------


def test_the_reader_hands_out_no_views_of_megatrons_mapped_files(tmp_path):
    """megatron's IndexedDataset unmaps its files in __del__: a view into them that
    outlives the object segfaults. Samples and lengths must own their memory, and the
    IndexedDataset objects themselves are not public attributes."""
    import gc

    from megatron_longalign.data.indexed import indexed_dataset_module

    random_set(tmp_path / "ds", [5, 9, 3], seed=1)
    dataset = SFTIndexedDataset(str(tmp_path / "ds"))
    megatron_type = indexed_dataset_module().IndexedDataset
    public = {k: v for k, v in vars(dataset).items() if not k.startswith("_")}
    assert not [k for k, v in public.items() if isinstance(v, megatron_type)]
    sample, lengths = dataset[1], dataset.lengths
    del dataset
    gc.collect()
    for array in (sample.tokens, sample.regions, lengths):
        assert array.flags.owndata or array.base is None or isinstance(array.base, np.ndarray)
        assert not isinstance(array.base, np.memmap) and not isinstance(array, np.memmap)
    assert sample.tokens.size == 9 and lengths.tolist() == [5, 9, 3]
