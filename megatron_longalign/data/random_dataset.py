"""Preprocessed datasets of random token ids, for benchmarks and memory checks: the files
tools/preprocess.py writes, with exact lengths and any vocabulary but no real text."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from megatron_longalign.data.indexed import FORMAT
from megatron_longalign.data.indexed_writer import IndexedSampleWriter
from megatron_longalign.data.templates import RegionKind
from megatron_longalign.utils.atomic_files import AtomicFileSet


def write_random_dataset(
    prefix: str, lengths: np.ndarray, vocab_size: int, seed: int, origin: str = "random"
) -> None:
    """One sample per length: random token ids, the last eighth of each sample (at least
    one token) an assistant answer, so the loss path is the real one. `origin` names the
    writer in the metadata."""
    rng = np.random.default_rng(seed)
    files = AtomicFileSet()
    writer = IndexedSampleWriter(prefix, vocab_size, files)
    for length in np.asarray(lengths, dtype=np.int64).tolist():
        tokens = rng.integers(0, vocab_size, size=length).astype(writer.token_dtype)
        answer = max(1, length // 8)
        regions = np.array(
            [
                [0, length - answer, RegionKind.USER],
                [length - answer, length, RegionKind.ASSISTANT],
            ],
            dtype=np.int32,
        )
        writer.add(tokens, regions)
    writer.finalize()
    files.commit()
    metadata = {
        "format": FORMAT,
        "documents": writer.count,
        "token_dtype": np.dtype(writer.token_dtype).name,
        "region_dtype": "int32",
        "region_kinds": {int(kind): kind.name.lower() for kind in RegionKind},
        # No real tokenizer: the mixture only compares hashes between sources.
        "tokenizer": {"kind": "random", "sha256": "random-token-ids", "vocab_size": vocab_size},
        "template": {"name": "none", "format": f"random token ids ({origin})"},
    }
    Path(prefix + ".json").write_text(json.dumps(metadata, indent=1))
