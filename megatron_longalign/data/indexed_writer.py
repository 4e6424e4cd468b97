"""Write preprocessed samples as megatron-core IndexedDatasets.

The tokens (one document of one sequence per sample) and each sample's regions
flattened (start, end, kind, start, end, kind, ...) as int32 are written under
temporary names of an `AtomicFileSet`; its commit publishes them as
`P.<tag>.bin/.idx` and `P.<tag>.regions.bin/.idx`, named by `P.json`
(`megatron_longalign.data.indexed.megatron_prefix(P)` is the prefix megatron-core's
`IndexedDataset` reads).
"""

from __future__ import annotations

import contextlib

import numpy as np

from megatron_longalign.data.encoding import REGION_DTYPE
from megatron_longalign.data.indexed import (
    REGIONS_BIN,
    REGIONS_IDX,
    TOKENS_BIN,
    TOKENS_IDX,
    indexed_dataset_module,
)
from megatron_longalign.utils.atomic_files import AtomicFileSet, naming


def token_dtype_for(vocab_size: int) -> type[np.number]:
    return indexed_dataset_module().DType.optimal_dtype(vocab_size)


class IndexedSampleWriter:
    """Appends samples to the token and region files of `files`. A failed write raises
    OSError naming the file (a full disk's ENOSPC carries no path of its own)."""

    def __init__(self, vocab_size: int, files: AtomicFileSet) -> None:
        # megatron-core (and torch behind it) is imported here, not at module level, so
        # that preprocessing workers never pay for it.
        IndexedDatasetBuilder = indexed_dataset_module().IndexedDatasetBuilder
        self.token_dtype = token_dtype_for(vocab_size)
        self._paths = {
            suffix: files.temp_path(suffix)
            for suffix in (TOKENS_BIN, TOKENS_IDX, REGIONS_BIN, REGIONS_IDX)
        }
        with naming(self._paths[TOKENS_BIN]):
            self._tokens = IndexedDatasetBuilder(str(self._paths[TOKENS_BIN]), self.token_dtype)
        with naming(self._paths[REGIONS_BIN]):
            self._regions = IndexedDatasetBuilder(str(self._paths[REGIONS_BIN]), REGION_DTYPE)
        self.count = 0

    def add(self, tokens: np.ndarray, regions: np.ndarray) -> None:
        with naming(self._paths[TOKENS_BIN]):
            self._tokens.add_document(tokens, [tokens.size])
        flat = regions.reshape(-1)
        with naming(self._paths[REGIONS_BIN]):
            self._regions.add_document(flat, [flat.size])
        self.count += 1

    def finalize(self) -> None:
        for builder, data, index in (
            (self._tokens, TOKENS_BIN, TOKENS_IDX),
            (self._regions, REGIONS_BIN, REGIONS_IDX),
        ):
            with naming(self._paths[data]):
                builder.data_file.close()  # flushes: a full disk fails here, on this file
            with naming(self._paths[index]):
                builder.finalize(str(self._paths[index]))

    def close(self) -> None:
        """Close the data files after a failure (finalize closes them otherwise)."""
        for builder in (self._tokens, self._regions):
            with contextlib.suppress(OSError):
                builder.data_file.close()
