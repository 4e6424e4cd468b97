"""Which input file and line each sample of a preprocessed set came from.

P.json does not record it per sample. It records the inputs in order with their line
counts, the number of blank lines, and (in the rejects file) the file and line of every
dropped or rejected line. Preprocessing keeps input order, so sample k is the k-th line
that was neither blank nor rejected. Blank lines are not located anywhere, so with any
blank line the mapping is unknown and None is returned (the scores then carry the index
only).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from megatron_longalign.data.indexed import REJECTS, DatasetFiles


def _rejected_lines(path: Path | None) -> set[tuple[str, int]]:
    if path is None or not path.is_file():
        return set()
    rejected = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            rejected.add((str(record["file"]), int(record["line"])))
    return rejected


def _kept_lines(inputs: list[dict[str, Any]], rejected: set) -> Iterator[tuple[str, int]]:
    for entry in inputs:
        path = str(entry["path"])
        for line in range(1, int(entry["lines"]) + 1):
            if (path, line) not in rejected:
                yield path, line


def sample_sources(files: DatasetFiles) -> list[tuple[str, int]] | None:
    """(input file, 1-based line) per sample, or None when it cannot be known."""
    metadata = files.metadata
    counts = metadata.get("counts") or {}
    inputs = metadata.get("inputs")
    if not isinstance(inputs, list) or counts.get("blank_lines", 1) != 0:
        return None
    try:
        rejected = _rejected_lines(files.paths.get(REJECTS))
        sources = list(_kept_lines(inputs, rejected))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return sources if len(sources) == files.lengths.size else None
