"""Append-only JSONL record files that survive a kill: the results of long jobs that call
models or services (evaluation cases, generated samples, cached replies).

Each record is one JSON line, flushed and fsynced as it is written, so a killed job loses
at most the line it was writing. That torn last line (no trailing newline) is ignored by
readers and cut off by the next writer before it appends, so a rerun resumes from the
last complete record. A malformed *complete* line is damage, not a kill: it is an error
naming the file and line, never skipped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class RecordsFileError(ValueError):
    """A records file has a malformed complete line."""


def _complete_length(path: Path) -> int:
    """Bytes up to and including the last newline (0 when there is none)."""
    with open(path, "rb") as handle:
        data = handle.read()
    return data.rfind(b"\n") + 1


def iter_records(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """The complete records of `path`, streamed in file order (a results file of a long
    run can be gigabytes); nothing when the file does not exist. Lines are split on b"\n"
    only: records are written with ensure_ascii=False, so a text may hold U+2028 and other
    characters that str.splitlines() would also split on."""
    path = Path(path)
    if not path.exists():
        return
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, 1):
            if not line.endswith(b"\n"):
                return  # a torn last line from a killed writer
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise RecordsFileError(f"{path}:{number}: not valid JSON ({err})") from None
            if not isinstance(record, dict):
                raise RecordsFileError(f"{path}:{number}: a record must be a JSON object")
            yield record


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every complete record of `path` in file order; [] when the file does not exist."""
    return list(iter_records(path))


class RecordAppender:
    """Appends records to `path` (created with its parents), one durable line each."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            keep = _complete_length(self.path)
            if keep != self.path.stat().st_size:  # a torn line from a killed writer
                os.truncate(self.path, keep)
        self._handle = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())

    def append(self, record: dict[str, Any]) -> None:
        self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> RecordAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
