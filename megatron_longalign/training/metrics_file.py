"""metrics.jsonl (`logging.metrics_file`): every logged step's metrics as one JSON line,
for plotting and comparing runs without wandb. Written by global rank 0 only.

    {"step": 10, "split": "train", "time": 1764500000.0, "train/loss": 2.31, ...}
    {"step": 10, "split": "valid", "time": 1764500003.2, "valid/loss": 2.45, ...}

Keys are the documented metric names (training/metrics.py), as wandb gets them; a
non-finite value is written as null (strict JSON has no NaN). Each line is appended,
flushed and fsynced: a killed run loses at most the line it was writing.

Resume: the file is opened with the step the run starts from (the resumed checkpoint's
step; 0 for a fresh start). Lines of later steps come from steps a killed run did after
that checkpoint; they will be run (and logged) again, so they are moved out of the file,
appended to `<name>.dropped.jsonl` beside it (nothing is deleted) and counted in the
log. A torn last line and lines that are not JSON objects with an integer "step" go
there too. The file then holds each step once, in order.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from megatron_longalign.utils.atomic_files import replace_text_atomically
from megatron_longalign.utils.jsonl_records import RecordAppender, read_records

log = logging.getLogger("megatron_longalign.train")

TRAIN, VALID = "train", "valid"


def dropped_path(path: Path) -> Path:
    """Where lines removed on resume go: metrics.jsonl -> metrics.dropped.jsonl."""
    return path.with_name(f"{path.stem}.dropped{path.suffix}")


def _line_step(line: str) -> int | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def _append_durably(path: Path, lines: list[str]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.writelines(line + "\n" for line in lines)
        handle.flush()
        os.fsync(handle.fileno())


def prune_after(path: Path, last_step: int) -> int:
    """Keep the complete lines of `path` with step <= `last_step`; move the others to
    `dropped_path(path)`. Returns how many lines were moved."""
    if not path.exists():
        return 0
    text = path.read_bytes().decode("utf-8", errors="replace")
    lines = text.split("\n")  # the last piece is "" or a torn line
    keep, drop = [], []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        step = _line_step(line) if i < len(lines) - 1 else None
        (keep if step is not None and step <= last_step else drop).append(line)
    if not drop:
        return 0
    _append_durably(dropped_path(path), drop)  # first, so a crash here loses nothing
    replace_text_atomically(path, "".join(line + "\n" for line in keep))
    return len(drop)


def _json_value(value: Any) -> Any:
    value = float(value)
    return value if math.isfinite(value) else None


class MetricsFile:
    """Appends metric lines to `path` (parents created), after `prune_after(path,
    start_step)`."""

    def __init__(self, path: str | os.PathLike, start_step: int) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        moved = prune_after(self.path, start_step)
        if moved:
            log.warning(
                "%s: %d line(s) after step %d (from steps that will run again, or torn) "
                "moved to %s",
                self.path,
                moved,
                start_step,
                dropped_path(self.path),
            )
        self._appender = RecordAppender(self.path)  # one durable line per append

    def append(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
        record = {"step": int(step), "split": split, "time": round(time.time(), 3)}
        record.update({key: _json_value(value) for key, value in metrics.items()})
        self._appender.append(record)

    def close(self) -> None:
        self._appender.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every complete line of a metrics file, in order ([] when there is none; a torn
    last line is ignored)."""
    return read_records(path)
