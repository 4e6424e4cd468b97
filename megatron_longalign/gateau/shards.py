"""Scores files: per-rank shards appended while scoring, merged into one final file.

Layout of an output directory D:
- D/run.json: the run's settings (prefix and its tag, document settings, engines).
  A rerun in D must have the same settings, so a resumed run never mixes scores made
  under other settings.
- D/shard-<rank>-of-<dp>.jsonl: raw per-sample records (response NLL under A and B,
  each segment's short-document NLL, the attention mass per segment) appended by one
  DP rank, flushed and fsynced after every batch. Floats are written exactly (repr).
  A killed run leaves at most one unterminated last line, which readers ignore and the
  next writer of that file cuts off before appending.
- D/scores.jsonl: the merge, one record per sample sorted by index, floats rounded to
  10 significant digits; written atomically. It depends only on the raw records, so it
  is the same for any DP size and whether or not the run was resumed.

Sharding: every sample is assigned to a rank by greedy cost balancing (cost L^2, the
attention cost of its longest forward) over ALL samples, whatever is already done, so
each rank computes the same assignment with no communication; finished samples (found
in any shard file, also of another DP size) are then skipped.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from megatron_longalign.data.planner import balanced_assignment
from megatron_longalign.utils.atomic_files import naming, replace_text_atomically

RUN_FILE = "run.json"
SCORES_FILE = "scores.jsonl"
SUMMARY_FILE = "summary.json"
SHARD_GLOB = "shard-*.jsonl"
FLOAT_DIGITS = 10


class ScoresFileError(ValueError):
    """A scores directory or file that cannot be used; the message names it."""


def shard_path(directory: str | os.PathLike, rank: int, dp_size: int) -> Path:
    return Path(directory) / f"shard-{rank:05d}-of-{dp_size:05d}.jsonl"


def assign_samples(lengths: np.ndarray, dp_size: int) -> list[np.ndarray]:
    """The samples of each DP rank (ascending index), balanced by cost L^2."""
    lengths = np.asarray(lengths, dtype=np.float64)
    assignment = balanced_assignment(lengths**2, dp_size)
    return [np.array(sorted(units), dtype=np.int64) for units in assignment]


def _complete_lines(path: Path) -> tuple[list[str], int]:
    """The newline-terminated lines of `path`, and the byte size they take."""
    with naming(path, "read"):
        data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    return data[:end].decode("utf-8").splitlines(), end


def read_shard(path: Path) -> list[dict[str, Any]]:
    """The complete records of one shard file (an unterminated last line is ignored)."""
    records = []
    lines, _ = _complete_lines(path)
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except ValueError as err:
            raise ScoresFileError(
                f"{path}:{number}: not a JSON record ({err}); delete the file "
                "to rescore its samples"
            ) from err
    return records


def read_records(directory: str | os.PathLike) -> dict[int, dict[str, Any]]:
    """index -> raw record over every shard file of `directory`. The same sample in two
    files (two runs that raced) must have the same values."""
    found: dict[int, dict[str, Any]] = {}
    for path in sorted(Path(directory).glob(SHARD_GLOB)):
        for record in read_shard(path):
            index = int(record["index"])
            if index in found and found[index] != record:
                raise ScoresFileError(
                    f"sample {index} has two different records in {directory} (two runs "
                    "with different results wrote there?); delete the shard files and rescore"
                )
            found[index] = record
    return found


class ShardWriter:
    """Appends records to one shard file; each `write` is flushed and fsynced."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if path.exists():
            _, end = _complete_lines(path)
            if end != path.stat().st_size:
                # A killed writer's partial line: cut it so the next record starts clean.
                with naming(path), open(path, "r+b") as f:
                    f.truncate(end)
        with naming(path):
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close)

    def write(self, records: Iterable[dict[str, Any]]) -> None:
        text = "".join(json.dumps(r, allow_nan=False) + "\n" for r in records)
        with naming(self.path):
            self._file.write(text)
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_run_settings(directory: str | os.PathLike, settings: dict[str, Any]) -> None:
    """Record `settings` in D/run.json, or check that they equal those recorded."""
    directory = Path(directory)
    path = directory / RUN_FILE
    with naming(directory, "create the directory"):
        directory.mkdir(parents=True, exist_ok=True)
    text = json.dumps(settings, indent=2, sort_keys=True) + "\n"
    if path.exists():
        recorded = json.loads(path.read_text(encoding="utf-8"))
        if recorded != json.loads(text):
            changed = sorted(
                k for k in {*recorded, *settings} if recorded.get(k) != settings.get(k)
            )
            raise ScoresFileError(
                f"{path} records other settings ({', '.join(changed)} differ): this directory "
                "holds scores of another run; use another output directory or delete it"
            )
        return
    replace_text_atomically(path, text)


def format_float(value: float | None) -> float | None:
    """Deterministic rounding for the final file; NaN/None -> None (JSON null)."""
    if value is None or not math.isfinite(value):
        return None
    return float(f"{value:.{FLOAT_DIGITS}g}")
