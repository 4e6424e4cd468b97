"""Random access to preprocessed SFT samples (tokens + regions + loss mask), and the
checks that a preprocessed set is complete and readable.

A set for prefix P is `P.json` (the manifest: metadata plus the exact files of the set)
and the files it names, `P.<tag>.bin/.idx` (tokens) and `P.<tag>.regions.bin/.idx`
(regions), written by tools/preprocess.py (docs/DATA_FORMAT.md). File names are
resolved relative to the real directory of `P.json`, so a linked `P.json` works.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from megatron_longalign.data.encoding import loss_mask_from_regions
from megatron_longalign.data.templates import RegionKind
from megatron_longalign.utils.atomic_files import file_digest, manifest_path

FORMAT = "megatron-longalign/sft-v2"
OLD_FORMATS = ("megatron-longalign/sft-v1",)

TOKENS_BIN, TOKENS_IDX = ".bin", ".idx"
REGIONS_BIN, REGIONS_IDX = ".regions.bin", ".regions.idx"
REJECTS = ".rejects.jsonl"
REQUIRED_MEMBERS = (TOKENS_BIN, TOKENS_IDX, REGIONS_BIN, REGIONS_IDX)
MEMBER_SUFFIXES = (*REQUIRED_MEMBERS, REJECTS)
# sft-v1 wrote its files as P<suffix>; they belong to an old P.json and are deleted when
# a new set replaces it.
LEGACY_SUFFIXES = MEMBER_SUFFIXES

# megatron-core's index header (indexed_dataset._IndexWriter): magic, version 1, dtype
# code, sequence count, document count; then int32 lengths, int64 pointers and int64
# document indices.
_INDEX_MAGIC = b"MMIDIDX\x00\x00"
_INDEX_HEADER = struct.Struct("<9sQBQQ")
_INDEX_DTYPES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}


class DataFileError(ValueError):
    """A preprocessed set that cannot be used; the message names the file and the fix."""


def indexed_dataset_module():
    """megatron.core.datasets.indexed_dataset, imported on first use. Importing
    megatron.core warns about Transformer Engine/Apex at length; that is irrelevant to
    reading or writing data files, so it is silenced here."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")
        from megatron.core.datasets import indexed_dataset

    return indexed_dataset


def _rerun(prefix: str) -> str:
    return (
        f"rerun tools/preprocess.py --output-prefix {prefix} --overwrite (with the inputs, "
        "tokenizer and template it was made from)"
    )


# ---- the checks --------------------------------------------------------------------------


@dataclass
class DatasetFiles:
    """A checked preprocessed set: its metadata, files and per-sample lengths."""

    prefix: str
    manifest: Path
    metadata: dict[str, Any]
    paths: dict[str, Path]  # member suffix -> file (resolved)
    lengths: np.ndarray  # tokens per sample (int64)

    def megatron_prefix(self, regions: bool = False) -> str:
        """The path prefix megatron-core's IndexedDataset opens (tokens or regions)."""
        suffix = REGIONS_BIN if regions else TOKENS_BIN
        return str(self.paths[suffix])[: -len(".bin")]


def read_metadata(prefix: str) -> dict[str, Any]:
    """P.json of a preprocessed set, checked for existence, JSON and format version."""
    path = manifest_path(prefix)
    if not path.is_file():
        raise DataFileError(
            f"{path} not found: {prefix!r} is not a preprocessed prefix (P.json names its "
            f"files); run tools/preprocess.py --output-prefix {prefix}, or fix the prefix"
        )
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise DataFileError(
            f"{path} is not valid JSON ({type(err).__name__}: {err}): the file is damaged; "
            f"{_rerun(prefix)}"
        ) from err
    if not isinstance(metadata, dict):
        raise DataFileError(f"{path} is not a JSON object: the file is damaged; {_rerun(prefix)}")
    found = metadata.get("format")
    if found in OLD_FORMATS:
        raise DataFileError(
            f"{path} is in the old data format {found!r}; this version reads {FORMAT!r} "
            f"(new tokenization, versioned files named by P.json): {_rerun(prefix)}"
        )
    if found != FORMAT:
        raise DataFileError(
            f"{path}: format {found!r} is not {FORMAT!r} (written by another program or "
            f"version?); {_rerun(prefix)}"
        )
    return metadata


def _member_paths(prefix: str, path: Path, metadata: dict[str, Any]) -> dict[str, Path]:
    files = metadata.get("files")
    base = path.resolve().parent
    paths, problems = {}, []
    if not isinstance(files, dict):
        raise DataFileError(f"{path} has no valid 'files' table: {_rerun(prefix)}")
    for suffix in REQUIRED_MEMBERS:
        record = files.get(suffix)
        if not isinstance(record, dict) or not {"name", "bytes"} <= set(record):
            problems.append(f"{path} does not name its {suffix} file")
            continue
        member = base / str(record["name"])
        paths[suffix] = member
        if not member.is_file():
            problems.append(f"{member} (named by {path}) is missing")
            continue
        size = member.stat().st_size
        if size != record["bytes"]:
            problems.append(
                f"{member} has {size} bytes but {path.name} records {record['bytes']}: it is "
                f"{'truncated' if size < record['bytes'] else 'changed'}"
            )
    if problems:
        raise DataFileError("; ".join(problems) + f"; {_rerun(prefix)}")
    if isinstance(files.get(REJECTS), dict) and "name" in files[REJECTS]:
        paths[REJECTS] = base / str(files[REJECTS]["name"])
    return paths


def _index_lengths(prefix: str, idx: Path, bin_path: Path, dtype: Any = None) -> np.ndarray:
    """The sequence lengths of megatron's index `idx`, after checking that its header,
    its size and the size of the data file `bin_path` agree."""
    size = idx.stat().st_size
    with open(idx, "rb") as f:
        head = f.read(_INDEX_HEADER.size)
    bad = f"{idx} is not a complete megatron index"
    if len(head) < _INDEX_HEADER.size:
        raise DataFileError(f"{bad} ({size} bytes, shorter than its header); {_rerun(prefix)}")
    magic, version, code, sequences, documents = _INDEX_HEADER.unpack(head)
    if magic != _INDEX_MAGIC or version != 1 or code not in _INDEX_DTYPES:
        raise DataFileError(f"{bad} (bad header); {_rerun(prefix)}")
    expected = _INDEX_HEADER.size + 12 * sequences + 8 * documents
    if size != expected:
        raise DataFileError(
            f"{bad}: {size} bytes, but its header promises {expected} ({sequences} sequences); "
            f"{_rerun(prefix)}"
        )
    if documents != sequences + 1:
        raise DataFileError(f"{bad} (expected one sequence per document); {_rerun(prefix)}")
    item_dtype = _INDEX_DTYPES[code]
    if dtype is not None and np.dtype(item_dtype) != np.dtype(dtype):
        raise DataFileError(
            f"{idx} stores {np.dtype(item_dtype).name} but the metadata says "
            f"{np.dtype(dtype).name}; {_rerun(prefix)}"
        )
    lengths = np.fromfile(idx, dtype=np.int32, count=sequences, offset=_INDEX_HEADER.size)
    data_bytes = int(lengths.astype(np.int64).sum()) * np.dtype(item_dtype).itemsize
    bin_size = bin_path.stat().st_size
    if bin_size != data_bytes:
        raise DataFileError(
            f"{bin_path} has {bin_size} bytes but its index {idx.name} describes "
            f"{data_bytes}: the data file is {'truncated' if bin_size < data_bytes else 'damaged'}"
            f"; {_rerun(prefix)}"
        )
    return lengths.astype(np.int64)


def open_dataset_files(prefix: str, verify: bool = False) -> DatasetFiles:
    """Check a preprocessed set before anything reads it: P.json is valid JSON in this
    format, every file it names exists with the recorded size, the megatron indexes agree
    with their data files and with each other. `verify` also compares every file's
    sha256 with P.json (reads everything). Raises DataFileError naming the file."""
    metadata = read_metadata(prefix)
    path = manifest_path(prefix)
    paths = _member_paths(prefix, path, metadata)
    if verify:
        for suffix, member in paths.items():
            recorded = metadata["files"][suffix].get("sha256")
            _, digest = file_digest(member)
            if digest != recorded:
                raise DataFileError(
                    f"{member}: sha256 {digest[:16]}... differs from {recorded!s:.16}... "
                    f"recorded in {path.name}: the file changed; {_rerun(prefix)}"
                )
    lengths = _index_lengths(
        prefix, paths[TOKENS_IDX], paths[TOKENS_BIN], metadata.get("token_dtype")
    )
    region_lengths = _index_lengths(prefix, paths[REGIONS_IDX], paths[REGIONS_BIN], np.int32)
    documents = metadata.get("documents")
    if lengths.size != region_lengths.size or (documents is not None and documents != lengths.size):
        raise DataFileError(
            f"{prefix}: {lengths.size} token rows, {region_lengths.size} region rows and "
            f"{documents} documents in {path.name} do not agree; {_rerun(prefix)}"
        )
    if (region_lengths % 3).any():
        raise DataFileError(f"{paths[REGIONS_IDX]}: rows are not (start, end, kind) triples")
    return DatasetFiles(prefix, path, metadata, paths, lengths)


def megatron_prefix(prefix: str, regions: bool = False) -> str:
    """The path prefix for megatron-core's `IndexedDataset` of the set P.json names:
    `IndexedDataset(megatron_prefix("out/long"))` reads the token ids."""
    metadata = read_metadata(prefix)
    return str(
        _member_paths(prefix, manifest_path(prefix), metadata)[
            REGIONS_BIN if regions else TOKENS_BIN
        ]
    )[: -len(".bin")]


# ---- reading -----------------------------------------------------------------------------


@dataclass
class SFTSample:
    tokens: np.ndarray  # (T,)
    regions: np.ndarray  # (R, 3) rows of (start, end, kind)

    @property
    def loss_mask(self) -> np.ndarray:
        return loss_mask_from_regions(self.regions, self.tokens.size)


class SFTIndexedDataset:
    """Reads the set written by `tools/preprocess.py` for output prefix P. Opening checks
    the set (`open_dataset_files`; `verify=True` adds the sha256 of every file).

    Everything it hands out owns its memory: megatron's IndexedDataset unmaps its files
    in `__del__`, so a view into them outliving the object would read freed memory (a
    segfault). Its IndexedDatasets are private for that reason."""

    def __init__(self, prefix: str, verify: bool = False) -> None:
        IndexedDataset = indexed_dataset_module().IndexedDataset
        self.prefix = prefix
        self.files = open_dataset_files(prefix, verify=verify)
        self.metadata = self.files.metadata
        self._tokens = IndexedDataset(self.files.megatron_prefix())
        self._regions = IndexedDataset(self.files.megatron_prefix(regions=True))
        self._lengths = self.files.lengths
        self._target_counts: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self._tokens)

    @property
    def lengths(self) -> np.ndarray:
        """Token count per sample (an array of its own, not a view of the index file)."""
        return self._lengths

    @property
    def target_counts(self) -> np.ndarray:
        """Predicted target tokens per sample (int64): target tokens not at position 0,
        since a first token has nothing before it to be predicted from. This is the N_i
        of the loss weighting. Computed once, vectorised over the regions file."""
        if self._target_counts is None:
            self._target_counts = _predicted_targets(
                self.files.megatron_prefix(regions=True), len(self)
            )
        return self._target_counts

    def __getitem__(self, index: int) -> SFTSample:
        # Copies, not views (see the class docstring).
        tokens = np.array(self._tokens[index])
        return SFTSample(tokens, np.array(self._regions[index]).reshape(-1, 3))


def _predicted_targets(regions_prefix: str, num_samples: int) -> np.ndarray:
    # The builder writes documents back to back, so the .bin file is one int32 array of
    # (start, end, kind) rows; per-document row counts come from the index.
    index = indexed_dataset_module().IndexedDataset(regions_prefix)
    rows_per_sample = np.asarray(index.sequence_lengths, dtype=np.int64) // 3
    del index
    rows = np.fromfile(regions_prefix + ".bin", dtype=np.int32).reshape(-1, 3)
    if rows_per_sample.sum() != rows.shape[0] or rows_per_sample.size != num_samples:
        raise DataFileError(f"{regions_prefix}: index and data disagree; re-run preprocessing")
    target_len = np.where(rows[:, 2] == RegionKind.ASSISTANT, rows[:, 1] - rows[:, 0], 0)
    first_row = np.concatenate([[0], np.cumsum(rows_per_sample)[:-1]])
    counts = np.add.reduceat(target_len.astype(np.int64), first_row) if num_samples else target_len
    starts_with_target = rows[first_row, 2] == RegionKind.ASSISTANT
    return counts - starts_with_target.astype(np.int64)
