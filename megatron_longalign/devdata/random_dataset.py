"""Preprocessed datasets of random token ids, for benchmarks and memory checks: the files
tools/preprocess.py writes, with exact lengths and any vocabulary but no real text."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from megatron_longalign.data.indexed import FORMAT, LEGACY_SUFFIXES
from megatron_longalign.data.indexed_writer import IndexedSampleWriter
from megatron_longalign.data.templates import RegionKind
from megatron_longalign.utils.atomic_files import AtomicFileSet, manifest_exists


def write_random_dataset(
    prefix: str,
    lengths: np.ndarray,
    vocab_size: int,
    seed: int,
    origin: str = "random",
    overwrite: bool = False,
) -> None:
    """One sample per length: random token ids, the last eighth of each sample (at least
    one token) an assistant answer, so the loss path is the real one. `origin` names the
    writer in the metadata. Published like tools/preprocess.py's output (P.json names
    the files; utils/atomic_files.py); an existing set is replaced only with `overwrite`."""
    if manifest_exists(prefix) and not overwrite:
        raise FileExistsError(f"{prefix}.json already exists; pass overwrite=True to replace it")
    rng = np.random.default_rng(seed)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    files = AtomicFileSet(prefix)
    writer = None
    try:
        writer = IndexedSampleWriter(vocab_size, files)
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
        files.commit(metadata, legacy_suffixes=LEGACY_SUFFIXES)
    except BaseException:
        if writer is not None:
            writer.close()
        files.abort()
        raise
