"""Raw JSONL chats -> P.bin/P.idx (tokens), P.regions.bin/.idx (loss regions), P.json.

The pipeline streams: a reader in this process cuts the inputs into chunks, workers
parse + validate + template + tokenize them, and results come back in input order
(`ordered_map`), so memory stays flat and the output is byte-identical for any number
of workers. All outputs are written under temporary names and published at the end
(metadata last); on any error nothing is left under a final name.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from megatron_longalign.data.conversation import BadSample, parse_conversation
from megatron_longalign.data.encoding import SampleEncoder
from megatron_longalign.data.indexed import FORMAT
from megatron_longalign.data.jsonl_reader import Chunk, expand_inputs, read_chunks
from megatron_longalign.data.overlength import OVERLENGTH_POLICIES, truncate
from megatron_longalign.data.preprocess_stats import PreprocessStats
from megatron_longalign.data.templates import RegionKind, get_template
from megatron_longalign.data.tokenizer import load_tokenizer
from megatron_longalign.utils.atomic_files import AtomicFileSet
from megatron_longalign.utils.ordered_map import ordered_map


class PreprocessError(RuntimeError):
    """Bad input that stops the run; the message names the file and line."""


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
                "such as out/long (writes out/long.bin, out/long.idx, ...)"
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
        sample = self.encoder.encode(conversation)
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
    # Build the encoder here first: a tokenizer/template problem should fail once, clearly,
    # before any worker starts.
    encoder = SampleProcessor(config.spec).encoder
    Path(config.output_prefix).parent.mkdir(parents=True, exist_ok=True)

    from megatron_longalign.data.indexed_writer import IndexedSampleWriter

    outputs = AtomicFileSet()
    writer = IndexedSampleWriter(config.output_prefix, encoder.tokenizer.vocab_size, outputs)
    rejects_path = outputs.temp_path(config.output_prefix + ".rejects.jsonl")
    meta_path = outputs.temp_path(config.output_prefix + ".json")
    stats = PreprocessStats()
    lines_per_file = [0] * len(files)
    started = time.perf_counter()
    try:
        with (
            open(rejects_path, "w", encoding="utf-8") as rejects,
            _progress_bar(files, config.progress) as bar,
        ):
            for file_index, disk_bytes, outcomes in _processed_chunks(config, files):
                path = files[file_index]
                for outcome in outcomes:
                    lines_per_file[file_index] = outcome.line
                    _record(outcome, path, config, stats, writer, rejects)
                bar.update(disk_bytes)
                elapsed = max(time.perf_counter() - started, 1e-9)
                bar.set_postfix(samples=stats.samples, tok_per_s=f"{stats.tokens / elapsed:,.0f}")
        writer.finalize()
        metadata = _metadata(config, files, lines_per_file, encoder, writer, stats)
        meta_path.write_text(json.dumps(metadata, indent=2, ensure_ascii=False) + "\n")
        if stats.samples == 0:
            raise PreprocessError(
                f"no sample was written from {len(files)} file(s): "
                f"dropped {dict(stats.dropped)}, rejected {dict(stats.rejected)}"
            )
        if rejects_path.stat().st_size == 0:
            rejects_path.unlink()
            Path(config.output_prefix + ".rejects.jsonl").unlink(missing_ok=True)
        outputs.commit()
    except BaseException:
        outputs.abort()
        raise
    return stats


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
                f"{config.output_prefix}.rejects.jsonl)"
            )
        stats.rejected[outcome.reason] += 1
        _write_reject(rejects, path, outcome.line, outcome.reason, outcome.message, outcome.text)


def _write_reject(rejects, path: Path, lineno: int, reason: str, message: str, text) -> None:
    record = {"file": str(path), "line": lineno, "reason": reason, "message": message}
    if text is not None:
        record["text"] = text
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
