"""Write safetensors files one tensor at a time.

`safetensors.torch.save_file` needs every tensor of a file in memory at once (a 5 GB
shard = 5 GB of converted tensors). The format is simple enough to stream instead: an
8-byte little-endian header length, a JSON header giving each tensor's dtype, shape and
[begin, end) byte offsets into the data section, then the tensors' raw little-endian
bytes back to back. Since shapes and dtypes are known before any data is computed, the
header is written first and each tensor is appended as soon as it exists, so memory
holds one tensor at a time. Files written here are read back with safetensors'
`safe_open` (and by transformers) in the tests.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

_DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
}


def tensor_nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count * torch.empty((), dtype=dtype).element_size()


class SafetensorsStreamWriter:
    """`add(name, tensor)` in exactly the order of `layout` [(name, shape, dtype)];
    `close()` checks that every tensor was written."""

    def __init__(
        self,
        path: str | Path,
        layout: list[tuple[str, tuple[int, ...], torch.dtype]],
        metadata: dict[str, str] | None = None,
    ) -> None:
        if sys.byteorder != "little":
            raise RuntimeError("safetensors stores little-endian data; this host is big-endian")
        self.path = Path(path)
        self._layout = list(layout)
        self._next = 0
        header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        for name, shape, dtype in self._layout:
            size = tensor_nbytes(shape, dtype)
            header[name] = {
                "dtype": _DTYPE_NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned, as the spec pads
        self._file = open(self.path, "wb")  # noqa: SIM115 (closed in close())
        self._file.write(len(encoded).to_bytes(8, "little"))
        self._file.write(encoded)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._layout):
            raise ValueError(f"{self.path}: {name} was not declared in the header")
        want_name, shape, dtype = self._layout[self._next]
        if name != want_name or tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise ValueError(
                f"{self.path}: expected {want_name} {list(shape)} {dtype}, got {name} "
                f"{list(tensor.shape)} {tensor.dtype}"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(data.numpy()))
        self._next += 1

    def close(self) -> None:
        try:
            if self._next != len(self._layout):
                missing = self._layout[self._next][0]
                raise ValueError(f"{self.path}: closed before {missing} was written")
            self._file.flush()
            os.fsync(self._file.fileno())
        finally:
            self._file.close()
