"""Chunk framing checks: a read-only view of a store that refuses damaged chunk objects.

Blosc and Zstandard frames declare their own length. A chunk object whose length disagrees
with its compressor's framing (a truncated or padded chunk) is refused by `_CheckedStore` as
`_DamagedChunk`, a `StoreError` naming the array and the chunk key, instead of being handed to
the decompressor. `check_store` and the Datasets `open_store` returns read through it.
"""

from __future__ import annotations

from typing import Mapping

import zarr

from grokscope.store.schema import StoreError


class _DamagedChunk(StoreError):
    """A chunk object whose bytes cannot be what its codec wrote (e.g. truncated)."""

    def __init__(self, store: str, problem: str):
        super().__init__(store, problem)  # args rebuild it when pickled (dask.distributed workers)
        self.store, self.problem = store, problem

    def __str__(self) -> str:
        return (f"{self.store}: {self.problem}; the store is damaged (`grokscope verify --deep {self.store}` "
                f"lists every damaged chunk)")


def _blosc_problem(data: memoryview) -> str | None:
    """Blosc frames declare their own length (compressed size, header included) in bytes 12..16."""
    if len(data) < 16:
        return f"{len(data)} bytes, shorter than a Blosc header (16)"
    declared = int.from_bytes(data[12:16], "little")
    if declared != len(data):
        return f"its Blosc header declares {declared} bytes, the object has {len(data)}"
    return None


_ZSTD_MAGIC = 0xFD2FB528


def _zstd_problem(data: memoryview) -> str | None:
    """Walks the Zstandard frames' block headers: the length they add up to must be the object's."""
    n, pos = len(data), 0
    if n == 0:
        return "an empty object, not a Zstandard frame"
    while pos < n:
        if pos + 5 > n:
            return f"its Zstandard frame is cut short ({n} bytes)"
        magic = int.from_bytes(data[pos:pos + 4], "little")
        if magic & 0xFFFFFFF0 == 0x184D2A50:  # a skippable frame: magic, size, payload
            if pos + 8 > n:
                return f"its Zstandard frame is cut short ({n} bytes)"
            pos += 8 + int.from_bytes(data[pos + 4:pos + 8], "little")
            continue
        if magic != _ZSTD_MAGIC:
            return f"no Zstandard frame at byte {pos}"
        descriptor = data[pos + 4]
        single_segment = (descriptor >> 5) & 1
        content_size_bytes = (single_segment, 2, 4, 8)[descriptor >> 6]
        pos += 5 + (1 - single_segment) + (0, 1, 2, 4)[descriptor & 3] + content_size_bytes
        while True:
            if pos + 3 > n:
                return f"its Zstandard frame is cut short (a block header past the object's {n} bytes)"
            header = int.from_bytes(data[pos:pos + 3], "little")
            kind = (header >> 1) & 3
            if kind == 3:
                return f"a corrupt Zstandard block header at byte {pos}"
            pos += 3 + (1 if kind == 1 else header >> 3)
            if header & 1:
                break
        pos += 4 * ((descriptor >> 2) & 1)  # content checksum
    if pos != n:
        return f"its Zstandard frame needs {pos} bytes, the object has {n}"
    return None


_FRAME_CHECKS = {"blosc": _blosc_problem, "zstd": _zstd_problem}


def _frame_kind(meta) -> str | None:
    """'blosc' or 'zstd' when that compressor writes the stored bytes of the array's chunks."""
    codecs = getattr(meta, "codecs", ())
    if not codecs:
        return None
    if isinstance(codecs[-1], zarr.codecs.BloscCodec):
        return "blosc"
    if isinstance(codecs[-1], zarr.codecs.ZstdCodec):
        return "zstd"
    return None


def _owner(key: str, arrays) -> str | None:
    """The array (a key of `arrays`) whose chunk `key` is; None for metadata and other objects."""
    if key.endswith("zarr.json") or key.endswith(".partial"):
        return None
    pos = key.find("/")
    while pos != -1:
        if key[:pos] in arrays:
            return key[:pos]
        pos = key.find("/", pos + 1)
    return None


class _CheckedStore(zarr.storage.WrapperStore):
    """A read-only view of another store that refuses chunk objects whose length disagrees with
    their compressor's framing (a truncated or padded chunk), naming the array and the key,
    instead of handing them to the decompressor."""

    def __init__(self, store, frames: Mapping[str, str] | None = None, name: str = ""):
        super().__init__(store)
        self._frames = dict(frames or {})
        self._name = name

    def _with_store(self, store):
        return type(self)(store, self._frames, self._name)

    def __str__(self) -> str:
        return self._name or str(self._store)

    async def get(self, key, prototype, byte_range=None):
        value = await self._store.get(key, prototype, byte_range)
        if value is not None and byte_range is None:
            array = _owner(key, self._frames)
            if array is not None:
                problem = _FRAME_CHECKS[self._frames[array]](memoryview(value.as_numpy_array()))
                if problem is not None:
                    raise _DamagedChunk(self._name, f"{array}: chunk {key}: {problem}")
        return value

    async def _get_many(self, requests):
        for key, prototype, byte_range in requests:
            yield key, await self.get(key, prototype, byte_range)
