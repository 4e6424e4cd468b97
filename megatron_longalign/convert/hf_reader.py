"""Read a local Hugging Face checkpoint tensor by tensor, and only the rows (and
columns) asked for.

Supported layouts, looked for in this order (as transformers does):
    model.safetensors.index.json + shards | model.safetensors
    pytorch_model.bin.index.json + shards | pytorch_model.bin

Nothing is read up front but file headers: safetensors files are opened with
`safe_open`, whose `get_slice` reads only the requested slice from disk; .bin files are
opened with `torch.load(mmap=True, weights_only=True)`, so tensors are views of the
memory-mapped file and a slice copies only its own pages. Peak memory is therefore the
largest slice a caller asks for, never the state dict. Only one file stays open: a
mapping keeps every page it has read resident (counted in RSS, and against a Slurm job's
memory limit) until it is closed, so a reader holding all shards open would end up
showing the whole checkpoint resident.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from megatron_longalign.convert.errors import ConversionError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_FILE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_FILE = "pytorch_model.bin"
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}

Range = tuple[int, int]


class HFCheckpointReader:
    """Tensor names, shapes and (sliced) contents of the weights in `hf_dir`. Raises
    ConversionError naming the file when the layout is incomplete (an index names a
    missing shard, or a tensor its shard does not hold)."""

    def __init__(self, hf_dir: str | Path) -> None:
        self.dir = Path(hf_dir)
        self.index_file, self.weight_map = _discover(self.dir)
        self.files = sorted(set(self.weight_map.values()))
        self.format = "safetensors" if self.files[0].endswith(".safetensors") else "bin"
        self._handles: dict[str, Any] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        for file in self.files:
            self._read_header(file)

    # ------------------------------------------------------------ metadata

    def names(self) -> list[str]:
        return list(self.weight_map)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def dtype(self, name: str) -> torch.dtype:
        return self._dtypes[name]

    def file_of(self, name: str) -> str:
        return self.weight_map[name]

    def _read_header(self, file: str) -> None:
        handle = self._open(file)
        if self.format == "safetensors":
            present = set(handle.keys())
        else:
            present = {k for k, v in handle.items() if isinstance(v, torch.Tensor)}
        for name, mapped in self.weight_map.items():
            if mapped != file:
                continue
            if name not in present:
                where = f"{self.index_file} maps it to {file}" if self.index_file else file
                raise ConversionError(
                    f"tensor {name!r} is missing: {where}, which does not hold it"
                )
            if self.format == "safetensors":
                view = handle.get_slice(name)
                self._shapes[name] = tuple(view.get_shape())
                dtype = view.get_dtype()
                if dtype not in _SAFETENSORS_DTYPES:
                    raise ConversionError(
                        f"tensor {name!r} in {file} has dtype {dtype}; expected a float type"
                    )
                self._dtypes[name] = _SAFETENSORS_DTYPES[dtype]
            else:
                self._shapes[name] = tuple(handle[name].shape)
                self._dtypes[name] = handle[name].dtype

    def _open(self, file: str):
        if file in self._handles:
            return self._handles[file]
        self._handles.clear()  # unmap the previous file (see the module docstring)
        path = self.dir / file
        try:
            if self.format == "safetensors":
                from safetensors import safe_open

                handle = safe_open(str(path), framework="pt", device="cpu")
            else:
                handle = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
                if not isinstance(handle, dict):
                    raise ConversionError(f"{path} does not hold a state dict")
        except ConversionError:
            raise
        except Exception as err:  # corrupt or foreign file: say which
            raise ConversionError(f"cannot read {path}: {type(err).__name__}: {err}") from err
        self._handles[file] = handle
        return handle

    # ------------------------------------------------------------ data

    def read(self, name: str, rows: Range | None = None, cols: Range | None = None) -> torch.Tensor:
        """Tensor `name`, or rows [a, b) (and columns [c, d)) of it, read from disk
        without touching the rest of the file."""
        handle = self._open(self.weight_map[name])
        rows_slice = slice(*rows) if rows is not None else slice(None)
        index: tuple[slice, ...] = (rows_slice,) if cols is None else (rows_slice, slice(*cols))
        if self.format == "safetensors":
            view = handle.get_slice(name)
            return view[index] if (rows or cols) else view[:]
        # A view of the mmapped storage; the copy pages in only these rows.
        return handle[name][index].clone()

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> HFCheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _discover(hf_dir: Path) -> tuple[str | None, dict[str, str]]:
    """(index file name or None, tensor name -> file name)."""
    if not hf_dir.is_dir():
        raise ConversionError(f"{hf_dir} is not a directory")
    for index_name, single in ((SAFETENSORS_INDEX, SAFETENSORS_FILE), (BIN_INDEX, BIN_FILE)):
        index_path = hf_dir / index_name
        if index_path.is_file():
            weight_map = _read_index(index_path)
            missing = sorted({f for f in weight_map.values() if not (hf_dir / f).is_file()})
            if missing:
                raise ConversionError(
                    f"{index_path} names shard {missing[0]}, which is missing from {hf_dir}"
                    + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                )
            return index_name, weight_map
        if (hf_dir / single).is_file():
            return None, _single_file_map(hf_dir, single)
    raise ConversionError(
        f"no weights in {hf_dir}: expected {SAFETENSORS_INDEX}, {SAFETENSORS_FILE}, "
        f"{BIN_INDEX} or {BIN_FILE}"
    )


def _read_index(path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ConversionError(f"{path} is not a valid index (no weight_map): {err}") from err
    if not weight_map:
        raise ConversionError(f"{path} has an empty weight_map")
    return dict(weight_map)


def _single_file_map(hf_dir: Path, file: str) -> dict[str, str]:
    if file.endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(str(hf_dir / file), framework="pt", device="cpu") as handle:
                names = list(handle.keys())
        except Exception as err:
            raise ConversionError(f"cannot read {hf_dir / file}: {err}") from err
    else:
        try:
            state = torch.load(hf_dir / file, map_location="cpu", mmap=True, weights_only=True)
        except Exception as err:
            raise ConversionError(
                f"cannot read {hf_dir / file}: {type(err).__name__}: {err}"
            ) from err
        names = [k for k, v in state.items() if isinstance(v, torch.Tensor)]
    return dict.fromkeys(names, file)
