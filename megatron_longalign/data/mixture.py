"""Several preprocessed datasets seen as one, with per-epoch sampling weights.

Samples get *global ids*: dataset d's sample i is `offsets[d] + i`. Each epoch draws a
pool of global ids: round(weight_d * size_d) samples of dataset d, as whole copies
first and the fractional remainder without replacement (seeded by (seed, epoch)), so a
weight of 1.0 takes every sample exactly once per epoch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from megatron_longalign.config.data import DatasetSource
from megatron_longalign.data.indexed import DataFileError, SFTIndexedDataset, SFTSample

# Independent random streams of one (seed, epoch).
STREAM_POOL, STREAM_SHUFFLE, STREAM_UNIT_ORDER = 0, 1, 2


def epoch_rng(seed: int, epoch: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, stream])


def epoch_pool(sizes: Sequence[int], weights: Sequence[float], seed: int, epoch: int) -> np.ndarray:
    """Global ids of one epoch's samples (unshuffled, grouped by dataset)."""
    rng = epoch_rng(seed, epoch, STREAM_POOL)
    parts = []
    offset = 0
    for size, weight in zip(sizes, weights, strict=True):
        take = int(round(weight * size))
        whole, rest = divmod(take, size) if size else (0, 0)
        ids = np.arange(offset, offset + size, dtype=np.int64)
        parts += [ids] * whole
        if rest:
            parts.append(np.sort(rng.choice(ids, size=rest, replace=False)))
        offset += size
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


class DatasetMixture:
    """Random access over several `SFTIndexedDataset`s by global sample id."""

    def __init__(self, sources: Sequence[DatasetSource]) -> None:
        self.sources = list(sources)
        self.datasets = [SFTIndexedDataset(source.prefix) for source in self.sources]
        self._check_same_tokenizer()
        self.sizes = [len(d) for d in self.datasets]
        self.weights = [source.weight for source in self.sources]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.lengths = np.concatenate([d.lengths for d in self.datasets]).astype(np.int64)
        self.target_counts = np.concatenate([d.target_counts for d in self.datasets])

    def _check_same_tokenizer(self) -> None:
        # Mixing datasets tokenized differently would train on garbage ids silently.
        hashes: dict[str, list[str]] = {}
        for dataset in self.datasets:
            digest = dataset.metadata["tokenizer"]["sha256"]
            hashes.setdefault(digest, []).append(f"{dataset.prefix}.json")
        if len(hashes) > 1:
            raise DataFileError(
                "datasets were preprocessed with different tokenizers: "
                + "; ".join(f"tokenizer {h[:12]}: {', '.join(m)}" for h, m in hashes.items())
                + ". Preprocess every source with the model's own tokenizer "
                "(tools/preprocess.py --tokenizer ... --overwrite)"
            )

    @property
    def tokenizer_metadata(self) -> dict:
        return self.datasets[0].metadata["tokenizer"]

    def provenance(self) -> dict:
        """What the token ids mean, for a checkpoint's record (export writes the tokenizer
        and chat template from it): the tokenizer (its path made absolute while it still
        resolves, with its sha256) and the chat template, or None when the sources were
        rendered with different templates."""
        tokenizer = dict(self.tokenizer_metadata)
        path = tokenizer.get("path")
        if path and Path(path).exists():
            tokenizer["path"] = str(Path(path).resolve())
        templates = {json.dumps(d.metadata.get("template"), sort_keys=True) for d in self.datasets}
        template = self.datasets[0].metadata.get("template") if len(templates) == 1 else None
        return {"tokenizer": tokenizer, "template": template}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, global_id: int) -> tuple[int, int]:
        dataset = int(np.searchsorted(self.offsets, global_id, side="right")) - 1
        return dataset, int(global_id - self.offsets[dataset])

    def __getitem__(self, global_id: int) -> SFTSample:
        dataset, index = self.locate(global_id)
        return self.datasets[dataset][index]
