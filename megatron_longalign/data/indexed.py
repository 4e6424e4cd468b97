"""Random access to preprocessed SFT samples (tokens + regions + loss mask)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_longalign.data.encoding import loss_mask_from_regions

FORMAT = "megatron-longalign/sft-v1"


def indexed_dataset_module():
    """megatron.core.datasets.indexed_dataset, imported on first use. Importing
    megatron.core warns about Transformer Engine/Apex at length; that is irrelevant to
    reading or writing data files, so it is silenced here."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")
        from megatron.core.datasets import indexed_dataset

    return indexed_dataset


@dataclass
class SFTSample:
    tokens: np.ndarray  # (T,)
    regions: np.ndarray  # (R, 3) rows of (start, end, kind)

    @property
    def loss_mask(self) -> np.ndarray:
        return loss_mask_from_regions(self.regions, self.tokens.size)


class SFTIndexedDataset:
    """Reads the files written by `tools/preprocess.py` for output prefix P."""

    def __init__(self, prefix: str) -> None:
        IndexedDataset = indexed_dataset_module().IndexedDataset
        self.prefix = prefix
        meta_path = Path(prefix + ".json")
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} not found: is {prefix!r} a preprocessed prefix?")
        self.metadata = json.loads(meta_path.read_text())
        if self.metadata.get("format") != FORMAT:
            raise ValueError(f"{meta_path}: format {self.metadata.get('format')!r} != {FORMAT!r}")
        self.tokens = IndexedDataset(prefix)
        self.regions = IndexedDataset(prefix + ".regions")
        if len(self.tokens) != len(self.regions):
            raise ValueError(
                f"{prefix}: {len(self.tokens)} token rows but {len(self.regions)} region rows"
            )
        self._lengths = np.array(self.tokens.sequence_lengths)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def lengths(self) -> np.ndarray:
        """Token count per sample (a copy: see __getitem__)."""
        return self._lengths

    def __getitem__(self, index: int) -> SFTSample:
        # Copies, not views: megatron's IndexedDataset closes its mmap in __del__, and a
        # view that outlives the dataset object would read freed memory (a segfault).
        return SFTSample(np.array(self.tokens[index]), np.array(self.regions[index]).reshape(-1, 3))
