"""Random access to preprocessed SFT samples (tokens + regions + loss mask)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_longalign.data.encoding import loss_mask_from_regions
from megatron_longalign.data.templates import RegionKind

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
        self._target_counts: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def lengths(self) -> np.ndarray:
        """Token count per sample (a copy: see __getitem__)."""
        return self._lengths

    @property
    def target_counts(self) -> np.ndarray:
        """Predicted target tokens per sample (int64): target tokens not at position 0,
        since a first token has nothing before it to be predicted from. This is the N_i
        of the loss weighting. Computed once, vectorised over the regions file."""
        if self._target_counts is None:
            self._target_counts = _predicted_targets(self.prefix + ".regions", len(self))
        return self._target_counts

    def __getitem__(self, index: int) -> SFTSample:
        # Copies, not views: megatron's IndexedDataset closes its mmap in __del__, and a
        # view that outlives the dataset object would read freed memory (a segfault).
        return SFTSample(np.array(self.tokens[index]), np.array(self.regions[index]).reshape(-1, 3))


def _predicted_targets(regions_prefix: str, num_samples: int) -> np.ndarray:
    # The builder writes documents back to back, so the .bin file is one int32 array of
    # (start, end, kind) rows; per-document row counts come from the index.
    index = indexed_dataset_module().IndexedDataset(regions_prefix)
    rows_per_sample = np.asarray(index.sequence_lengths, dtype=np.int64) // 3
    del index
    rows = np.fromfile(regions_prefix + ".bin", dtype=np.int32).reshape(-1, 3)
    if rows_per_sample.sum() != rows.shape[0] or rows_per_sample.size != num_samples:
        raise ValueError(f"{regions_prefix}: index and data disagree; re-run preprocessing")
    target_len = np.where(rows[:, 2] == RegionKind.ASSISTANT, rows[:, 1] - rows[:, 0], 0)
    first_row = np.concatenate([[0], np.cumsum(rows_per_sample)[:-1]])
    counts = np.add.reduceat(target_len.astype(np.int64), first_row) if num_samples else target_len
    starts_with_target = rows[first_row, 2] == RegionKind.ASSISTANT
    return counts - starts_with_target.astype(np.int64)
