"""Streaming reader and writer for the safetensors format, bfloat16 included.

Format (https://huggingface.co/docs/safetensors): 8-byte little-endian header size N, N bytes
of JSON {name: {"dtype", "shape", "data_offsets": [begin, end)}, "__metadata__": {...}}, then
the raw little-endian tensor bytes. `safetensors.safe_open(framework="numpy")` cannot return
bfloat16 (numpy has no such dtype) and the released Qwen3/Llama checkpoints are bfloat16, so this
module reads the documented layout itself: a block of rows is read with one positioned read into
a fresh buffer (ml_dtypes supplies bfloat16), never the whole file, never through pickle. (The
library's slicing reader, `get_slice`, has the same numpy limit, and its torch path would add a
torch copy of every block.) Since the reads trust the header, `check_header` first validates it
as the library does: known dtypes, byte lengths equal to dtype size times shape, and offsets in
order, without gaps or overlaps, ending exactly at the end of the file.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from typing import Iterable, Iterator

import ml_dtypes
import numpy as np

from topd_jax.errors import CheckpointError

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
NAMES = {v: k for k, v in DTYPES.items()}
Block = tuple[tuple[int, int], ...]  # [start, stop) per dimension
if sys.byteorder != "little":  # the format is little-endian and arrays are read without swapping
    raise ImportError("topd_jax.models.safetensors_io needs a little-endian host")


def check_header(tensors: dict, data_size: int, where: str) -> None:
    """A one-line CheckpointError (a ValueError) unless the header describes the data section
    exactly, as the `safetensors` library requires: every dtype known, every tensor's byte
    length equal to its dtype's size times its shape, and the [begin, end) ranges in order,
    without gaps or overlaps, covering the `data_size` bytes after the header. Reading trusts these offsets, so a header
    that says F64 for F32 data, or points past the end, must never get as far as a read."""
    spans = []
    for name, info in tensors.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise CheckpointError(f"{where}: tensor {name!r} needs dtype, shape and data_offsets in the header")
        code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if code not in DTYPES:
            raise CheckpointError(f"{where}: tensor {name!r} has unsupported dtype {code!r} "
                                  f"(known: {', '.join(DTYPES)})")
        if not (isinstance(shape, list) and all(isinstance(n, int) and n >= 0 for n in shape)):
            raise CheckpointError(f"{where}: tensor {name!r} has an invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise CheckpointError(f"{where}: tensor {name!r} has invalid data_offsets {offsets!r}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[code].itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise CheckpointError(f"{where}: tensor {name!r} spans {offsets[1] - offsets[0]} bytes, but {code} "
                             f"{tuple(shape)} needs {nbytes}")
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            raise CheckpointError(f"{where}: tensor {name!r} starts at byte {begin} of the data, expected {end} "
                             f"({'an overlap' if begin < end else 'a gap'})")
        end = stop
    if end != data_size:
        raise CheckpointError(f"{where}: the tensors end at byte {end} of the data but the file holds {data_size} "
                         f"({'truncated' if end > data_size else 'trailing bytes'})")


class SafetensorsFile:
    """Header of one .safetensors file plus block reads: read(name, ((r0, r1), (c0, c1), ...))."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise CheckpointError(f"{self.path} is not a safetensors file (shorter than 8 bytes)")
            (size,) = struct.unpack("<Q", head)
            if size > os.path.getsize(self.path) - 8:
                raise CheckpointError(f"{self.path} is not a safetensors file (header size {size} past the end)")
            try:
                header = json.loads(f.read(size))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise CheckpointError(f"{self.path} is not a safetensors file (unreadable header)") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path} is not a safetensors file (the header is not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + size
        self.tensors: dict[str, dict] = header
        check_header(self.tensors, os.path.getsize(self.path) - self.data_start, self.path)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        code = self.tensors[name]["dtype"]
        if code not in DTYPES:
            raise CheckpointError(f"tensor {name!r} in {self.path} has unsupported dtype {code}")
        return DTYPES[code]

    def read(self, name: str, block: Block | None = None) -> np.ndarray:
        """The block [start, stop) per dim of tensor `name`; reads only the rows block[0] spans."""
        info, dtype, shape = self.tensors[name], self.dtype(name), self.shape(name)
        block = tuple((0, n) for n in shape) if block is None else tuple(block)
        if not shape:
            rows, inner = (0, 1), ()
        else:
            rows, inner = block[0], shape[1:]
        row_items = int(np.prod(inner, dtype=np.int64))
        count = (rows[1] - rows[0]) * row_items
        offset = self.data_start + info["data_offsets"][0] + rows[0] * row_items * dtype.itemsize
        with open(self.path, "rb") as f:
            data = np.fromfile(f, dtype=dtype, count=count, offset=offset)
        if data.size != count:
            raise CheckpointError(f"{self.path} is truncated: tensor {name!r} is incomplete")
        data = data.reshape((rows[1] - rows[0],) + inner if shape else ())
        rest = tuple(slice(a, b) for a, b in block[1:])
        return data[(slice(None),) + rest] if rest else data


def write_file(path: str | os.PathLike, tensors: list[tuple[str, np.dtype, tuple[int, ...]]],
               data: Iterable[np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (name, dtype, shape, in order) whose arrays `data` yields one at a time."""
    header: dict = {"__metadata__": dict(metadata or {})}
    offset = 0
    for name, dtype, shape in tensors:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": NAMES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        arrays: Iterator[np.ndarray] = iter(data)
        for name, dtype, shape in tensors:
            array = next(arrays)
            if array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
                raise ValueError(f"tensor {name!r}: got {array.dtype}{array.shape}, "
                                 f"header says {np.dtype(dtype)}{tuple(shape)}")
            f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
