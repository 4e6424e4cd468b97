"""Raw JSONL chats -> a preprocessed set for prefix P: P.json (metadata, and the exact
files of the set) naming P.<tag>.bin/.idx (tokens) and P.<tag>.regions.bin/.idx (loss
regions), plus P.<tag>.rejects.jsonl when lines were dropped or rejected.

The pipeline streams: a reader in this process cuts the inputs into chunks, workers
parse + validate + template + tokenize them, and results come back in input order
(`ordered_map`), so memory stays flat and the output is byte-identical for any number
of workers.

Before any tokenizing: an existing P.json is refused without `overwrite`, the output
directory must take a written and fsynced probe file, and what killed runs left for P
is removed (or reported, if its process still runs). All outputs are written under
temporary names and published at the end by replacing P.json (utils/atomic_files.py):
a crash or error at any point leaves the previous complete set or the new one, never a
mix. A failed write names its file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from megatron_longalign.data.conversation import BadSample, parse_conversation
from megatron_longalign.data.encoding import SampleEncoder
from megatron_longalign.data.indexed import FORMAT, LEGACY_SUFFIXES, MEMBER_SUFFIXES, REJECTS
from megatron_longalign.data.jsonl_reader import Chunk, expand_inputs, read_chunks
from megatron_longalign.data.overlength import OVERLENGTH_POLICIES, truncate
from megatron_longalign.data.preprocess_stats import PreprocessStats
from megatron_longalign.data.templates import RegionKind, get_template
from megatron_longalign.data.tokenizer import ReservedTextError, load_tokenizer
from megatron_longalign.utils.atomic_files import (
    AtomicFileSet,
    WriteError,
    check_writable,
    clean_leftovers,
    describe_os_error,
    manifest_exists,
    manifest_path,
    naming,
)
from megatron_longalign.utils.ordered_map import ordered_map

log = logging.getLogger("megatron_longalign.preprocess")


class PreprocessError(RuntimeError):
    """Bad input that stops the run; the message names the file and line."""


class OutputError(PreprocessError):
    """The output cannot be written (exists without overwrite, read-only, disk full);
    the message names the file and what to do."""


@dataclass(frozen=True)
class EncodeSpec:
    """Everything a worker needs to turn a raw line into a sample (picklable)."""

    tokenizer: str
    template: str
    max_length: int | None = None
    on_overlength: str = "drop"


@dataclass(frozen=True)
class PreprocessConfig:
    inputs: tuple[str, ...]
    output_prefix: str
    spec: EncodeSpec
    workers: int = 1
    skip_bad: bool = False
    progress: bool = True
    chunk_bytes: int = 1 << 20
    overwrite: bool = False  # replace an existing set (P.json) for output_prefix

    def validate(self) -> None:
        if self.spec.on_overlength not in OVERLENGTH_POLICIES:
            raise ValueError(f"--on-overlength must be one of {OVERLENGTH_POLICIES}")
        if self.spec.max_length is not None and self.spec.max_length < 2:
            raise ValueError("--max-length must be at least 2")
        if self.workers < 1:
            raise ValueError("--workers must be >= 1")
        if self.output_prefix.endswith(("/", os.sep)) or Path(self.output_prefix).is_dir():
            raise ValueError(
                f"--output-prefix {self.output_prefix!r} is a directory; give a file prefix "
                "such as out/long (writes out/long.json and the files it names)"
            )


class Written(NamedTuple):
    line: int
    tokens: np.ndarray
    regions: np.ndarray
    num_targets: int
    truncated: bool


class Blank(NamedTuple):
    line: int


class Dropped(NamedTuple):
    """A valid sample that is not written (e.g. over --max-length)."""

    line: int
    reason: str
    num_tokens: int


class Rejected(NamedTuple):
    """A bad input line; `text` is the line with invalid bytes escaped."""

    line: int
    reason: str
    message: str
    text: str


Outcome = Written | Blank | Dropped | Rejected


class SampleProcessor:
    def __init__(self, spec: EncodeSpec) -> None:
        self.spec = spec
        self.encoder = SampleEncoder(load_tokenizer(spec.tokenizer), get_template(spec.template))

    def process_line(self, lineno: int, raw: bytes) -> Outcome:
        if not raw or raw.isspace():
            return Blank(lineno)
        try:
            conversation = parse_conversation(raw)
        except BadSample as bad:
            text = raw.decode("utf-8", "backslashreplace")
            return Rejected(lineno, bad.reason, bad.message, text)
        try:
            sample = self.encoder.encode(conversation)
        except ReservedTextError as err:
            return Rejected(
                lineno, "reserved_text", str(err), raw.decode("utf-8", "backslashreplace")
            )
        limit = self.spec.max_length
        truncated = False
        if limit is not None and len(sample) > limit:
            if self.spec.on_overlength in ("drop", "error"):
                return Dropped(lineno, "overlength", len(sample))
            sample = truncate(sample, limit, self.spec.on_overlength)
            truncated = True
            if sample.num_targets == 0:
                return Dropped(lineno, "no_target_after_truncation", limit)
        return Written(lineno, sample.tokens, sample.regions, sample.num_targets, truncated)

    def process_chunk(self, chunk: Chunk) -> tuple[int, int, list[Outcome]]:
        outcomes = [self.process_line(lineno, raw) for lineno, raw in chunk.lines]
        return chunk.file_index, chunk.disk_bytes, outcomes


_WORKER: SampleProcessor | None = None


def _init_worker(spec: EncodeSpec) -> None:
    global _WORKER
    _WORKER = SampleProcessor(spec)


def _process_chunk(chunk: Chunk) -> tuple[int, int, list[Outcome]]:
    assert _WORKER is not None
    return _WORKER.process_chunk(chunk)


def _processed_chunks(config: PreprocessConfig, files: list[Path]) -> Iterator[tuple]:
    return ordered_map(
        _process_chunk,
        read_chunks(files, chunk_bytes=config.chunk_bytes),
        workers=config.workers,
        initializer=_init_worker,
        initargs=(config.spec,),
    )


def _progress_bar(files: list[Path], enabled: bool):
    from tqdm import tqdm

    total = sum(f.stat().st_size for f in files)
    return tqdm(
        total=total, unit="B", unit_scale=True, desc="preprocess", disable=not enabled, delay=1
    )


def preprocess(config: PreprocessConfig) -> PreprocessStats:
    """Run the pipeline; returns the stats also written to P.json."""
    config.validate()
    files = expand_inputs(config.inputs)
    # Output problems first: they are cheap to find and would otherwise waste the run.
    prepare_output(config, files)
    # Build the encoder here first: a tokenizer/template problem should fail once, clearly,
    # before any worker starts.
    encoder = SampleProcessor(config.spec).encoder

    from megatron_longalign.data.indexed_writer import IndexedSampleWriter

    outputs = AtomicFileSet(config.output_prefix)
    writer = None
    stats = PreprocessStats()
    lines_per_file = [0] * len(files)
    started = time.perf_counter()
    try:
        writer = IndexedSampleWriter(encoder.tokenizer.vocab_size, outputs)
        rejects_path = outputs.temp_path(REJECTS)
        with naming(rejects_path):
            # Closed below (naming the file if the close fails), or on an error.
            rejects = open(rejects_path, "w", encoding="utf-8")  # noqa: SIM115
        try:
            with _progress_bar(files, config.progress) as bar:
                for file_index, disk_bytes, outcomes in _processed_chunks(config, files):
                    path = files[file_index]
                    for outcome in outcomes:
                        lines_per_file[file_index] = outcome.line
                        _record(outcome, path, config, stats, writer, rejects)
                    bar.update(disk_bytes)
                    elapsed = max(time.perf_counter() - started, 1e-9)
                    bar.set_postfix(
                        samples=stats.samples, tok_per_s=f"{stats.tokens / elapsed:,.0f}"
                    )
        except BaseException:
            with contextlib.suppress(OSError):
                rejects.close()
            raise
        with naming(rejects_path):
            rejects.close()  # flushes: a full disk fails here, on this file
        writer.finalize()
        if stats.samples == 0:
            raise PreprocessError(
                f"no sample was written from {len(files)} file(s): "
                f"dropped {dict(stats.dropped)}, rejected {dict(stats.rejected)}"
            )
        if rejects_path.stat().st_size == 0:
            outputs.discard(REJECTS)
        metadata = _metadata(config, files, lines_per_file, encoder, writer, stats)
        manifest = outputs.commit(metadata, legacy_suffixes=LEGACY_SUFFIXES)
        stats.published_files = {s: r["name"] for s, r in manifest["files"].items()}
    except WriteError as err:
        _give_up(writer, outputs)
        raise OutputError(
            f"{describe_os_error(err)}. Nothing was published: "
            f"{manifest_path(config.output_prefix)} and the files it names are as before "
            "(if they existed)."
        ) from err
    except BaseException:
        _give_up(writer, outputs)
        raise
    return stats


def _give_up(writer, outputs: AtomicFileSet) -> None:
    if writer is not None:
        writer.close()
    outputs.abort()


def prepare_output(config: PreprocessConfig, files: list[Path]) -> None:
    """Everything about the output that can fail, checked before any tokenizing: an
    existing set without `overwrite`, a directory that cannot take a written and fsynced
    file (read-only, no permission, disk full); then what killed runs left for the
    prefix is removed (a live process's files are reported and left alone)."""
    prefix = config.output_prefix
    manifest = manifest_path(prefix)
    if manifest_exists(prefix) and not config.overwrite:
        raise OutputError(
            f"{manifest} already exists: {prefix!r} holds a preprocessed set. Pass "
            "--overwrite to replace it (the new set is published only once it is complete; "
            "then the old files are deleted), or choose another --output-prefix."
        )
    try:
        check_writable(prefix)
        leftovers = clean_leftovers(prefix, MEMBER_SUFFIXES)
    except WriteError as err:
        raise OutputError(
            f"{describe_os_error(err)}. Checked before preprocessing: nothing was written."
        ) from err
    for message in leftovers.messages(prefix):
        log.warning("%s", message)
    _warn_if_short_of_space(prefix, files)


def _warn_if_short_of_space(prefix: str, files: list[Path]) -> None:
    """A rough bound: the output takes about as many bytes as the (uncompressed) input."""
    need = sum(f.stat().st_size * (4 if f.name.endswith(".gz") else 1) for f in files)
    directory = Path(prefix).parent
    free = shutil.disk_usage(directory).free
    if free < need:
        log.warning(
            "only %.1f MB free in %s; the output may need up to about %.1f MB (the size of "
            "the input). A full disk stops the run with an error and publishes nothing.",
            free / 1e6,
            directory,
            need / 1e6,
        )


def _record(
    outcome: Outcome,
    path: Path,
    config: PreprocessConfig,
    stats: PreprocessStats,
    writer,
    rejects,
) -> None:
    stats.lines += 1
    if isinstance(outcome, Written):
        writer.add(outcome.tokens, outcome.regions)
        stats.add_sample(outcome.tokens.size, outcome.num_targets, outcome.truncated)
    elif isinstance(outcome, Blank):
        stats.blank_lines += 1
    elif isinstance(outcome, Dropped):
        if outcome.reason == "overlength" and config.spec.on_overlength == "error":
            raise PreprocessError(
                f"{path}:{outcome.line}: sample has {outcome.num_tokens} tokens, more than "
                f"--max-length {config.spec.max_length} (--on-overlength error)"
            )
        stats.dropped[outcome.reason] += 1
        message = f"{outcome.num_tokens} tokens"
        _write_reject(rejects, path, outcome.line, outcome.reason, message, None)
    else:
        if not config.skip_bad:
            raise PreprocessError(
                f"{path}:{outcome.line}: {outcome.message} [{outcome.reason}]\n"
                "(pass --skip-bad to skip such lines and list them in "
                f"{config.output_prefix}.<tag>.rejects.jsonl, named in {config.output_prefix}.json)"
            )
        stats.rejected[outcome.reason] += 1
        _write_reject(rejects, path, outcome.line, outcome.reason, outcome.message, outcome.text)


def _write_reject(rejects, path: Path, lineno: int, reason: str, message: str, text) -> None:
    record = {"file": str(path), "line": lineno, "reason": reason, "message": message}
    if text is not None:
        record["text"] = text
    with naming(rejects.name):
        rejects.write(json.dumps(record, ensure_ascii=False) + "\n")


def _metadata(config, files, lines_per_file, encoder, writer, stats) -> dict:
    """P.json. Deliberately free of timestamps and worker counts: identical inputs and
    settings must give byte-identical outputs."""
    return {
        "format": FORMAT,
        "documents": writer.count,
        "token_dtype": np.dtype(writer.token_dtype).name,
        "region_dtype": "int32",
        "region_kinds": {int(kind): kind.name.lower() for kind in RegionKind},
        "tokenizer": encoder.tokenizer.describe(),
        "template": {"name": encoder.template.name, "format": encoder.template.description},
        "settings": {
            "max_length": config.spec.max_length,
            "on_overlength": config.spec.on_overlength,
            "skip_bad": config.skip_bad,
        },
        "inputs": [
            {"path": str(f), "bytes": f.stat().st_size, "lines": n}
            for f, n in zip(files, lines_per_file, strict=True)
        ],
        **stats.to_dict(),
    }
