"""Writing a store: `create` it from its layout, then write batches into it by region.

`write_batch` writes one batch's arrays, the rows this process owns (`row_blocks`), with the
padding positions of recorded quantities written as the fill value (`mask_padding`);
`StoreWriter` does so from background threads. A batch's `done` flags are written only after
all of its data, which is what makes resuming exact: a batch that is not `done` is simply
computed and written again. Whole chunks take the fast path of
`grokscope.store.zarr_internals`.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Mapping, Sequence

import jax
import numpy as np
import zarr

from grokscope.record import QUANTITIES
from grokscope.store.schema import StoreError, Variable

__all__ = ["create", "mask_padding", "row_blocks", "write_batch", "StoreWriter"]

# Blosc LZ4 with byte shuffle: compresses activations about as well as zarr's default zstd
# here, at several times its speed, so writing keeps up with the forward.
_NUMERIC_COMPRESSORS = [zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")]


def create(path, variables: Mapping[str, Variable], coords: Mapping[str, np.ndarray], attrs: dict) -> zarr.Group:
    """Creates the store (refusing to touch an existing path)."""
    group = zarr.open_group(store=str(path), mode="w-", zarr_format=3)
    for v in variables.values():
        compressors = "auto" if v.dtype is str else _NUMERIC_COMPRESSORS
        group.create_array(v.name, shape=v.shape, dtype=v.dtype, chunks=v.chunks, dimension_names=v.dims,
                           fill_value=v.fill_value, attributes=v.attrs, compressors=compressors,
                           chunk_key_encoding={"name": "default", "separator": "."})
    for name, values in coords.items():
        # Written even when every value equals the fill (a coordinate [0]): a dump has all its chunks.
        array = group.create_array(name, shape=values.shape, dtype=values.dtype, chunks=values.shape,
                                   dimension_names=(name,), attributes={"long_name": name, "units": "index"},
                                   config={"write_empty_chunks": True})
        array[...] = values
    group.attrs.update(attrs)
    return group


def _normalise(index: tuple, shape: tuple[int, ...]) -> list[slice]:
    return [slice(*s.indices(n)[:2]) if isinstance(s, slice) else slice(s, s + 1) for s, n in zip(index, shape)]


def mask_padding(name: str, block: np.ndarray, lengths: np.ndarray, starts: Sequence[int]) -> np.ndarray:
    """Replaces values at padding positions (position or query >= the row's length) by the fill.

    What the model computes at pads depends on how far a batch was padded; the store keeps
    only what does not. `block` covers rows with these `lengths`, starting at `starts` in
    each dim of the quantity.
    """
    q = QUANTITIES.get(name)
    if q is None:
        return block
    for axis, dim in enumerate(q.dims):
        if dim not in ("position", "query"):
            continue
        first_pad = np.clip(np.asarray(lengths) - starts[axis], 0, block.shape[axis])
        if (first_pad == block.shape[axis]).all():
            continue
        if not block.flags.writeable or block.base is not None:
            block = block.copy()
        moved = np.moveaxis(block, axis, 1)  # a view: [rows, position, ...]
        for row, start in enumerate(first_pad):
            moved[row, start:] = q.fill
    return block


def row_blocks(array: zarr.Array, value, row0: int, n_valid: int, lengths, name, rows=None):
    """(selection in `array`, block) pieces of a batch array [B, ...], first n_valid rows only.

    A `jax.Array` gives its addressable shards with replica_id 0 (the rows this process
    writes); a host array all its rows, or only the [start, stop) ranges in `rows`.
    """
    if hasattr(value, "addressable_shards"):
        pieces = [(s.index, s.data) for s in value.addressable_shards if s.replica_id == 0]
    elif rows is not None:
        rest = (slice(None),) * (np.ndim(value) - 1)
        pieces = [((slice(r0, r1),) + rest, np.asarray(value)[r0:r1]) for r0, r1 in rows]
    else:
        pieces = [((slice(None),) * np.ndim(value), value)]
    out = []
    for index, data in pieces:
        region = _normalise(tuple(index) + (slice(None),) * (np.ndim(value) - len(index)), np.shape(value))
        r0, r1 = region[0].start, min(region[0].stop, n_valid)
        if r1 <= r0:
            continue
        block = np.asarray(data)[: r1 - r0].astype(array.dtype, copy=False)
        if lengths is not None and name is not None:
            block = mask_padding(name, block, lengths[r0:r1], [sl.start for sl in region])
        out.append(((slice(row0 + r0, row0 + r1),) + tuple(region[1:]), block))
    return out


def write_batch(arrays: Mapping[str, zarr.Array], values: Mapping[str, Any], row0: int, n_valid: int,
                rows=None) -> int:
    """Writes one batch's arrays [B, ...] at rows row0.. (first n_valid rows), concurrently.

    A `jax.Array` is written shard by shard (each addressable shard with replica_id 0, i.e.
    every block exactly once on any mesh); other dims are written from index 0. `values`
    must hold `length` (per batch row): padding positions of recorded quantities are written
    as the fill value. Host arrays are written whole, or only the row ranges in `rows` (the
    rows this process owns in a multi-process job). Returns the bytes written (before
    compression).

    Blocks that cover whole chunks of an array with the store's numeric codecs are encoded
    here, in worker threads, and stored as chunk objects directly: the same bytes zarr would
    write, at about twice the speed of going through its pipeline chunk by chunk
    (`grokscope.store.zarr_internals`, with the zarr versions it was tested with). Others (strings,
    blocks split over devices), and every block with an untested zarr, take zarr's own path.
    """
    from grokscope.store import zarr_internals

    lengths = np.asarray(values["length"])
    pieces = {name: row_blocks(arrays[name], value, row0, n_valid, lengths, name, rows)
              for name, value in values.items()}
    if zarr_internals.SUPPORTED:
        zarr_internals.write_pieces(arrays, pieces)
    else:  # a zarr this code was not tested with: its public, slower path
        for name, blocks in pieces.items():
            for selection, block in blocks:
                arrays[name][selection] = block
    return sum(block.nbytes for blocks in pieces.values() for _, block in blocks)


class StoreWriter:
    """Writes batches to a store from background threads, through a bounded queue.

    `put` blocks while `max_pending` batches wait, so memory stays bounded however long the
    run. Each batch owns its chunks (chunks along `sequence` are batches), so `threads`
    writers work on different batches at once without sharing a chunk. A failed write is
    raised (as `StoreError`) from the next `put` or from `close`; the batch it belonged to is
    not marked done, so the store stays resumable.

    Attributes:
      bytes_written: bytes handed to zarr (before compression).
      seconds_writing: wall time during which at least one batch was being written.
    """

    def __init__(self, group: zarr.Group, max_pending: int = 2, threads: int = 2):
        self.group = group
        self.bytes_written = 0
        self._intervals: list[tuple[float, float]] = []
        self._lock = threading.Lock()
        # Every written chunk holds data: skip zarr's per-chunk comparison with the fill value.
        self._arrays = {name: group[name].with_config({"write_empty_chunks": True}) for name in group.array_keys()}
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._threads = [threading.Thread(target=self._run, name=f"grokscope-store-writer-{i}", daemon=True)
                         for i in range(threads)]
        for thread in self._threads:
            thread.start()

    @property
    def seconds_writing(self) -> float:
        total, end = 0.0, float("-inf")
        for t0, t1 in sorted(self._intervals):
            if t1 > end:
                total += t1 - max(t0, end)
                end = t1
        return total

    def put(self, row0: int, n_valid: int, arrays: Mapping[str, Any], rows=None) -> None:
        """Queues one batch: `arrays` maps variable names to [B, ...] arrays (B >= n_valid),
        including `length`, which masks the padding positions of recorded quantities. `rows`:
        the [start, stop) row ranges of the batch this process writes (None: all)."""
        self._raise_if_failed()
        self._queue.put((row0, n_valid, dict(arrays), rows))

    def _run(self):
        import time

        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue
            row0, n_valid, arrays, rows = item
            try:
                jax.block_until_ready(arrays)  # the forward's results; waiting is not writing
                t0 = time.perf_counter()
                written = write_batch(self._arrays, arrays, row0, n_valid, rows)
                for r0, r1 in rows if rows is not None else [(0, n_valid)]:
                    if min(r1, n_valid) > r0:
                        self._arrays["done"][row0 + r0:row0 + min(r1, n_valid)] = True
                with self._lock:
                    self.bytes_written += written
                    self._intervals.append((t0, time.perf_counter()))
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                self._error = e

    def _raise_if_failed(self):
        if self._error is not None:
            raise StoreError(f"writing {self.group.store} failed: {type(self._error).__name__}: {self._error}; "
                             f"the store is resumable: run the same command again") from self._error

    def close(self) -> None:
        """Waits for queued batches to be written; raises a write failure if there was one."""
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()
        self._raise_if_failed()

