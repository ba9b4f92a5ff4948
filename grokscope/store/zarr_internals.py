"""The parts of zarr-python's non-public API grokscope relies on, in one place.

The store writer (`grokscope.store.writer.write_batch`) encodes whole chunks itself and
stores them directly (`write_pieces`: the bytes zarr's own pipeline would write, about twice
as fast), and `check_store` reads raw keys and array metadata; both need zarr internals
(`zarr.core.sync`, `zarr.core.buffer`, `zarr.core.metadata.v3`, `Array._async_array`). They
were tested with the zarr versions in `TESTED`; with any other version `SUPPORTED` is False
and the writer takes zarr's public path instead (`pyproject.toml` keeps installs within the
tested range).
"""

from __future__ import annotations

import asyncio
import re
from typing import Mapping

import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.metadata.v3 import ArrayV3Metadata
from zarr.core.sync import sync


def _release(version: str) -> tuple[int, ...]:
    """(major, minor, patch) of a version string such as "3.1.6" or "3.2.0rc1"."""
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


TESTED = ((3, 1, 6), (3, 2, 0))  # [lowest tested release, first untested release)
SUPPORTED = TESTED[0] <= _release(zarr.__version__) < TESTED[1]

__all__ = ["TESTED", "SUPPORTED", "sync", "default_buffer_prototype", "ArrayV3Metadata", "write_pieces"]


def _chunk_encoder(array: zarr.Array):
    """A numcodecs Blosc equal to the array's codec chain, or None when the array has another
    chain (then its blocks go through zarr's own pipeline)."""
    import sys

    from numcodecs import Blosc

    codecs = array.metadata.codecs if array.metadata.zarr_format == 3 else ()
    if (len(codecs) != 2 or not isinstance(codecs[0], zarr.codecs.BytesCodec)
            or not isinstance(codecs[1], zarr.codecs.BloscCodec) or sys.byteorder != "little"
            or codecs[0].endian is not None and codecs[0].endian.value != "little"):
        return None
    blosc = codecs[1]
    shuffle = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}
    return Blosc(cname=blosc.cname.value, clevel=blosc.clevel, shuffle=shuffle[blosc.shuffle.value],
                 blocksize=blosc.blocksize, typesize=blosc.typesize)


def _whole_chunks(array: zarr.Array, selection, block: np.ndarray):
    """(chunk coords, full-size chunk data) for every chunk `block` covers, when `selection`
    is aligned with the chunk grid (every chunk whole, or cut only by the array's end);
    None otherwise. Edge chunks are padded with the fill value, as zarr stores them."""
    chunk_shape = array.metadata.chunk_grid.chunk_shape
    grid = []
    for sl, c, n in zip(selection, chunk_shape, array.shape):
        if sl.start % c or (sl.stop % c and sl.stop != n):
            return None
        grid.append(range(sl.start // c, -(-sl.stop // c)))
    out = []
    for coords in np.ndindex(*(len(g) for g in grid)):
        chunk = tuple(g[i] for g, i in zip(grid, coords))
        piece = block[tuple(slice(k * c - sl.start, (k + 1) * c - sl.start)
                            for k, c, sl in zip(chunk, chunk_shape, selection))]
        if piece.shape != tuple(chunk_shape):
            full = np.full(chunk_shape, array.metadata.fill_value, dtype=block.dtype)
            full[tuple(slice(0, m) for m in piece.shape)] = piece
            piece = full
        out.append((chunk, np.ascontiguousarray(piece)))
    return out


def _write_local_chunk(path, encoder, data: np.ndarray) -> None:
    """Encodes a chunk and writes it as zarr's LocalStore does: a temporary file in the same
    directory, then an atomic rename, so a reader or a killed writer never sees half a chunk."""
    import os
    import uuid

    encoded = encoder.encode(data)
    partial = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
    try:
        handle = open(partial, "wb")
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(partial, "wb")
    try:
        with handle:
            handle.write(encoded)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def write_pieces(arrays: Mapping[str, zarr.Array], pieces: Mapping[str, list[tuple[tuple, np.ndarray]]]) -> None:
    """Writes `pieces` ({name: [(selection, block)]}) into `arrays`, arrays concurrently:
    blocks covering whole chunks of a Blosc-coded array are encoded here in worker threads
    and stored as chunk objects; other blocks go through zarr's own async setitem, one at a
    time per array (blocks of one batch may share a chunk, and concurrent writes to one chunk
    would lose updates)."""
    to_buffer = default_buffer_prototype().buffer.from_bytes

    async def write_chunk(array, encoder, coords, data):
        key = array.metadata.encode_chunk_key(coords)
        path = f"{array.store_path.path}/{key}" if array.store_path.path else key
        store = array.store_path.store
        if isinstance(store, zarr.storage.LocalStore):
            await asyncio.to_thread(_write_local_chunk, store.root / path, encoder, data)
        else:
            encoded = await asyncio.to_thread(encoder.encode, data)
            await store.set(path, to_buffer(encoded))

    async def write_array(array, blocks):
        encoder = _chunk_encoder(array)
        for selection, block in blocks:
            chunks = _whole_chunks(array, selection, block) if encoder is not None else None
            if chunks is None:
                await array._async_array.setitem(selection, block)
            else:
                await asyncio.gather(*(write_chunk(array, encoder, coords, data) for coords, data in chunks))

    async def write_all():
        await asyncio.gather(*(write_array(arrays[name], blocks) for name, blocks in pieces.items()))

    sync(write_all())
