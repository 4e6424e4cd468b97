"""Select the top samples by GATEAU score and publish them as a new preprocessed set.

Ranking: score descending, ties broken by the lower sample index; samples without a
score (no response token) are never selected. `ratio` selects round(ratio x N) samples
(N = all samples of the set, at least 1); `top_k` selects k. The selected samples are
written in their original order, as a set with the source's tokenizer and template
metadata, published atomically (utils/atomic_files.py: P.json is replaced last), so it
trains as any `data.sources` entry.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from megatron_longalign.data.indexed import FORMAT, MEMBER_SUFFIXES, SFTIndexedDataset
from megatron_longalign.data.indexed_writer import IndexedSampleWriter
from megatron_longalign.utils.atomic_files import (
    AtomicFileSet,
    clean_leftovers,
    file_digest,
    manifest_exists,
    manifest_path,
)

# Metadata of the source set that describes the tokens, copied to the selection as is.
_KEPT_METADATA = (
    "format",
    "token_dtype",
    "region_dtype",
    "region_kinds",
    "tokenizer",
    "template",
    "settings",
)


class SelectError(ValueError):
    """A selection that cannot be made; the message names what is wrong."""


@dataclass
class Selection:
    prefix: str
    indices: np.ndarray  # selected sample indices, ascending
    metadata: dict[str, Any]


def read_scores(path: str | os.PathLike, num_samples: int) -> np.ndarray:
    """The score column of a scores file (index-aligned; NaN where null)."""
    scores = np.full(num_samples, np.nan)
    seen = np.zeros(num_samples, dtype=bool)
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        record = json.loads(line)
        index = int(record["index"])
        if not 0 <= index < num_samples or seen[index]:
            raise SelectError(f"{path}:{number}: sample {index} is out of range or repeated")
        seen[index] = True
        scores[index] = np.nan if record["score"] is None else float(record["score"])
    if not seen.all():
        raise SelectError(
            f"{path} scores {int(seen.sum())} of the set's {num_samples} samples: it belongs "
            "to another set, or the scoring did not finish"
        )
    return scores


def selection_size(
    num_samples: int, *, top_k: int | None = None, ratio: float | None = None
) -> int:
    if (top_k is None) == (ratio is None):
        raise SelectError("give exactly one of top_k and ratio")
    if top_k is not None:
        if top_k < 1:
            raise SelectError(f"top_k must be >= 1, got {top_k}")
        return top_k
    if not 0 < ratio <= 1:
        raise SelectError(f"ratio must be in (0, 1], got {ratio}")
    return max(1, math.floor(ratio * num_samples + 0.5))


def top_indices(scores: np.ndarray, count: int) -> np.ndarray:
    """The `count` best-scored indices (score descending, then index ascending), sorted
    ascending; NaN scores are never chosen."""
    scores = np.asarray(scores, dtype=np.float64)
    candidates = np.flatnonzero(np.isfinite(scores))
    # lexsort: last key first; stable, so equal scores keep ascending index order.
    order = candidates[np.lexsort((candidates, -scores[candidates]))]
    return np.sort(order[:count])


def select(
    source_prefix: str,
    scores_path: str | os.PathLike,
    output_prefix: str,
    *,
    top_k: int | None = None,
    ratio: float | None = None,
    alpha: float | None = None,
    overwrite: bool = False,
) -> Selection:
    """Write the selected samples of `source_prefix` as the set `output_prefix`. `alpha`
    is recorded (read from the scores directory's summary.json when None)."""
    if manifest_exists(output_prefix) and not overwrite:
        raise SelectError(
            f"{manifest_path(output_prefix)} exists; pass overwrite=True to replace it"
        )
    if os.path.abspath(output_prefix) == os.path.abspath(source_prefix):
        raise SelectError(f"the selection cannot replace its source {source_prefix}")
    dataset = SFTIndexedDataset(source_prefix)
    scores = read_scores(scores_path, len(dataset))
    count = selection_size(len(dataset), top_k=top_k, ratio=ratio)
    indices = top_indices(scores, count)
    _, digest = file_digest(Path(scores_path))
    metadata = {key: dataset.metadata[key] for key in _KEPT_METADATA if key in dataset.metadata}
    metadata["format"] = FORMAT
    metadata["documents"] = int(indices.size)
    metadata["tokens"] = {"total": int(dataset.lengths[indices].sum())}
    metadata["selection"] = {
        "method": "gateau",
        "source_prefix": os.path.abspath(source_prefix),
        "source_tag": dataset.metadata.get("tag"),
        "source_samples": len(dataset),
        "scores_file": os.path.abspath(scores_path),
        "scores_sha256": digest,
        "alpha": _alpha(scores_path) if alpha is None else alpha,
        "ratio": ratio,
        "top_k": top_k,
        "selected": int(indices.size),
    }
    _write_set(dataset, indices, output_prefix, metadata)
    return Selection(output_prefix, indices, metadata)


def _alpha(scores_path: str | os.PathLike) -> float | None:
    summary = Path(scores_path).with_name("summary.json")
    if not summary.is_file():
        return None
    return json.loads(summary.read_text(encoding="utf-8")).get("config", {}).get("alpha")


def _write_set(
    dataset: SFTIndexedDataset, indices: np.ndarray, prefix: str, metadata: dict
) -> None:
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(prefix, MEMBER_SUFFIXES)
    outputs = AtomicFileSet(prefix)
    writer = None
    try:
        writer = IndexedSampleWriter(int(metadata["tokenizer"]["vocab_size"]), outputs)
        if np.dtype(writer.token_dtype).name != metadata.get("token_dtype"):
            raise SelectError(f"token dtype {writer.token_dtype} differs from the source's")
        for index in indices.tolist():
            sample = dataset[index]
            writer.add(sample.tokens, sample.regions)
        writer.finalize()
        outputs.commit(metadata)
    except BaseException:
        if writer is not None:
            writer.close()
        outputs.abort()
        raise
