"""Write preprocessed samples as megatron-core IndexedDatasets.

`P.bin/P.idx` holds token ids (one document of one sequence per sample), readable with
`megatron.core.datasets.indexed_dataset.IndexedDataset(P)`. `P.regions.bin/.idx` holds
each sample's regions flattened (start, end, kind, start, end, kind, ...) as int32.
"""

from __future__ import annotations

import numpy as np

from megatron_longalign.data.encoding import REGION_DTYPE
from megatron_longalign.data.indexed import indexed_dataset_module
from megatron_longalign.utils.atomic_files import AtomicFileSet


def token_dtype_for(vocab_size: int) -> type[np.number]:
    return indexed_dataset_module().DType.optimal_dtype(vocab_size)


class IndexedSampleWriter:
    def __init__(self, prefix: str, vocab_size: int, files: AtomicFileSet) -> None:
        # megatron-core (and torch behind it) is imported here, not at module level, so
        # that preprocessing workers never pay for it.
        IndexedDatasetBuilder = indexed_dataset_module().IndexedDatasetBuilder
        self.token_dtype = token_dtype_for(vocab_size)
        self._paths = {
            name: files.temp_path(prefix + suffix)
            for name, suffix in (
                ("tokens_bin", ".bin"),
                ("tokens_idx", ".idx"),
                ("regions_bin", ".regions.bin"),
                ("regions_idx", ".regions.idx"),
            )
        }
        self._tokens = IndexedDatasetBuilder(str(self._paths["tokens_bin"]), self.token_dtype)
        self._regions = IndexedDatasetBuilder(str(self._paths["regions_bin"]), REGION_DTYPE)
        self.count = 0

    def add(self, tokens: np.ndarray, regions: np.ndarray) -> None:
        self._tokens.add_document(tokens, [tokens.size])
        flat = regions.reshape(-1)
        self._regions.add_document(flat, [flat.size])
        self.count += 1

    def finalize(self) -> None:
        self._tokens.finalize(str(self._paths["tokens_idx"]))
        self._regions.finalize(str(self._paths["regions_idx"]))
