"""The safetensors file format, read and written with numpy (bfloat16 included).

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, offsets
relative to the end of the header), then the tensors' raw little-endian bytes. The
`safetensors` package's numpy API cannot return bfloat16 arrays, which is what Grok-2's
release holds, so this module reads the format directly: headers are validated, and each
tensor is read straight into one numpy buffer (no second copy), optionally hashed as read.
"""

from __future__ import annotations

import json
import math
import mmap
import os
from pathlib import Path
from typing import Mapping, NamedTuple

import ml_dtypes
import numpy as np

__all__ = ["SafetensorsError", "TensorInfo", "read_header", "read_tensor", "write_file", "aligned_empty", "DTYPES"]

DTYPES: dict[str, np.dtype] = {
    "BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16), "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "I16": np.dtype(np.int16),
    "I32": np.dtype(np.int32), "I64": np.dtype(np.int64), "BOOL": np.dtype(np.bool_),
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A file that is not a valid safetensors file; the message starts with its path."""


class TensorInfo(NamedTuple):
    """Where one tensor lies: its file, name, dtype, shape and absolute byte range."""

    file: Path
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(file: str | os.PathLike) -> dict[str, TensorInfo]:
    """The tensors of a safetensors file, validated, in file order; reads only the header.

    Raises:
      SafetensorsError: naming the file and the first problem (short file, header not JSON,
        unknown dtype, a byte range that does not match the shape or lies outside the file,
        overlapping tensors).
    """
    file = Path(file)
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise SafetensorsError(f"{file}: not a safetensors file ({size} bytes, shorter than the 8-byte header "
                                       f"length)")
            n = int.from_bytes(prefix, "little")
            if n > min(_MAX_HEADER, size - 8):
                raise SafetensorsError(f"{file}: not a safetensors file (header length {n} does not fit the "
                                       f"{size}-byte file)")
            raw = f.read(n)
    except OSError as e:
        raise SafetensorsError(f"{file}: cannot read it ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{file}: not a safetensors file (its header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{file}: not a safetensors file (its header is not a JSON object)")
    data_start, data_size = 8 + n, size - 8 - n
    tensors = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        where = f"{file}: tensor {name!r}"
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise SafetensorsError(f"{where}: expected keys dtype, shape, data_offsets, got {entry!r:.200}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPES:
            raise SafetensorsError(f"{where}: unsupported dtype {dtype!r} (expected one of {', '.join(DTYPES)})")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise SafetensorsError(f"{where}: shape must be a list of non-negative ints, got {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise SafetensorsError(f"{where}: data_offsets must be [begin, end], got {offsets!r}")
        begin, end = offsets
        expected = math.prod(shape) * DTYPES[dtype].itemsize
        if not 0 <= begin <= end <= data_size or end - begin != expected:
            raise SafetensorsError(f"{where}: data_offsets {offsets} do not hold {expected} bytes of {dtype} "
                                   f"{shape} inside the {data_size}-byte data section")
        tensors.append(TensorInfo(file, name, DTYPES[dtype], tuple(shape), data_start + begin, data_start + end))
    tensors.sort(key=lambda t: t.begin)
    for a, b in zip(tensors, tensors[1:]):
        if b.begin < a.end:
            raise SafetensorsError(f"{file}: tensors {a.name!r} and {b.name!r} overlap")
    return {t.name: t for t in tensors}


def aligned_empty(shape, dtype) -> np.ndarray:
    """An uninitialized array in fresh page-aligned memory (an anonymous mmap).

    numpy's own large buffers start 16 bytes past a page boundary, and XLA's CPU backend copies
    a host buffer that is not 64-byte aligned when it is placed, so the tensor would be held
    twice while it is placed; this one is shared instead (and never written after placing).
    """
    dtype = np.dtype(dtype)
    n = math.prod(shape) * dtype.itemsize
    return np.frombuffer(mmap.mmap(-1, max(n, 1)), np.uint8, count=n).view(dtype).reshape(shape)


def read_tensor(info: TensorInfo, hasher=None, out: np.ndarray | None = None) -> np.ndarray:
    """Reads one tensor into a new array (or into `out`, a C-contiguous array of its shape and
    dtype); `hasher` (e.g. an xxhash object) sees its raw bytes."""
    if out is None:
        out = np.empty(info.shape, info.dtype)
    elif out.shape != info.shape or out.dtype != info.dtype or not out.flags.c_contiguous:
        raise ValueError(f"read_tensor: out must be a C-contiguous {info.dtype} array of shape {info.shape}")
    view = memoryview(out.reshape(-1).view(np.uint8))
    try:
        with open(info.file, "rb") as f:
            f.seek(info.begin)
            got = 0
            while got < info.nbytes:
                n = f.readinto(view[got:])
                if not n:
                    raise SafetensorsError(f"{info.file}: tensor {info.name!r}: the file ends before its data "
                                           f"(truncated?)")
                got += n
    except OSError as e:
        raise SafetensorsError(f"{info.file}: cannot read tensor {info.name!r} ({e.strerror or e})") from None
    if hasher is not None:
        hasher.update(view)
    return out


def write_file(file: str | os.PathLike, tensors: Mapping[str, np.ndarray],
               metadata: Mapping[str, str] | None = None) -> None:
    """Writes `tensors` (in the given order) as a safetensors file, atomically (via a
    temporary name in the same directory)."""
    file = Path(file)
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    arrays = []
    for name, value in tensors.items():
        array = np.ascontiguousarray(value)
        if array.dtype not in _NAMES:
            raise ValueError(f"write_file: tensor {name!r}: unsupported dtype {array.dtype}")
        header[name] = {"dtype": _NAMES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        arrays.append(array)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = file.with_name(f".{file.name}.partial")
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for array in arrays:
            f.write(array.reshape(-1).view(np.uint8).data)
    os.replace(tmp, file)
