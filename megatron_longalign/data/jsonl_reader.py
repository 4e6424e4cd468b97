"""Stream JSONL input files (plain or .gz) as chunks of raw lines.

Lines stay bytes here: UTF-8 decoding happens in the workers so that invalid bytes are
reported per line (with file and line number) instead of failing the whole file.
"""

from __future__ import annotations

import glob
import gzip
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

_BOM = b"\xef\xbb\xbf"


class InputError(ValueError):
    """An input file cannot be read at all (missing, unmatched glob, corrupt gzip)."""


@dataclass
class Chunk:
    file_index: int
    lines: list[tuple[int, bytes]]  # (1-based line number, raw bytes without newline)
    disk_bytes: int  # bytes of the file on disk consumed by this chunk (progress bars)


def expand_inputs(patterns: Sequence[str]) -> list[Path]:
    """Globs and plain paths -> files, in the order given (each glob sorted), deduplicated."""
    files: list[Path] = []
    seen: set[Path] = set()
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise InputError(f"input pattern {pattern!r} matches no file")
        else:
            if not os.path.isfile(pattern):
                raise InputError(f"input file {pattern} does not exist")
            matches = [pattern]
        for match in matches:
            path = Path(match)
            if path.is_file() and path.resolve() not in seen:
                seen.add(path.resolve())
                files.append(path)
    if not files:
        raise InputError("no input files")
    return files


def read_chunks(
    files: Sequence[Path], chunk_bytes: int = 1 << 20, max_lines: int = 2048
) -> Iterator[Chunk]:
    """Chunks of at most ~chunk_bytes (and max_lines) raw lines, one file at a time."""
    for file_index, path in enumerate(files):
        with open(path, "rb") as raw:
            stream: BinaryIO = gzip.GzipFile(fileobj=raw) if path.suffix == ".gz" else raw
            lines: list[tuple[int, bytes]] = []
            size = 0
            reported = 0
            try:
                for lineno, line in enumerate(stream, start=1):
                    line = line.rstrip(b"\r\n")
                    if lineno == 1 and line.startswith(_BOM):
                        line = line[len(_BOM) :]
                    lines.append((lineno, line))
                    size += len(line)
                    if size >= chunk_bytes or len(lines) >= max_lines:
                        position = raw.tell()
                        yield Chunk(file_index, lines, position - reported)
                        reported, lines, size = position, [], 0
            except (OSError, EOFError, zlib.error) as err:
                raise InputError(f"{path}: cannot read ({err})") from None
            end = os.fstat(raw.fileno()).st_size
            if lines or end > reported:
                yield Chunk(file_index, lines, end - reported)
