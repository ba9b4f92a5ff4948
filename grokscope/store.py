"""The zarr v3 store of a dump: its schema, the background writer, and `open_store`.

One store per dump, every array in the root group with `dimension_names`, so that
`xarray.open_zarr(path)` alone opens everything. Arrays are pre-sized from the prompt count
and filled by region; chunks along `sequence` equal the batch size (in a multi-process job,
the rows of a batch one process writes), so writers never share a chunk. A batch's `done` flags are written only after all of its data, which is what makes
resuming exact: a batch that is not `done` is simply computed and written again.

Schema (N sequences, P = max_len positions):
  tokens        (sequence, position) int32, pad = 0
  length        (sequence,) int32, tokens before padding
  prompt        (sequence,) string, the prompt text
  <metadata>    (sequence,) per-sequence fields of a .jsonl prompt file, e.g. `label`
  done          (sequence,) bool, the sequence's data is complete
  vocab_piece   (vocab,) string, the tokenizer's piece for every id (labels without a tokenizer)
  + the recorded quantities of `grokscope.record.QUANTITIES` selected by the RecordSpec,
  + coordinates layer, expert, slot, attn_layer, head, residual_layer, expert_layer (true numbers).
Root attributes: see `provenance` in `grokscope.dump`.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from typing import Any, Mapping, Sequence

import jax
import numpy as np
import zarr

from grokscope.record import QUANTITIES, RecordSpec

__all__ = ["Variable", "layout", "record_bytes_per_token", "create", "row_blocks", "write_batch", "StoreWriter", "open_store", "token_pieces", "dataset_from_arrays", "describe", "column_dtype", "mask_padding",
           "StoreError", "RESERVED_NAMES"]

_TARGET_CHUNK_BYTES = 8 * 1024**2
# Blosc LZ4 with byte shuffle: compresses activations about as well as zarr's default zstd
# here, at several times its speed, so writing keeps up with the forward.
_NUMERIC_COMPRESSORS = [zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")]
_FILL = {"expert_index": -1, "attn_topk_index": -1}

RESERVED_NAMES = frozenset({"tokens", "length", "prompt", "done", "vocab_piece", "layer", "expert", "slot",
                            "attn_layer", "head", "residual_layer", "expert_layer"} | set(QUANTITIES))


class StoreError(ValueError):
    """A store cannot be created, resumed or opened as asked."""


@dataclasses.dataclass(frozen=True)
class Variable:
    """One array of the store: its dims, shape, dtype, chunks and attributes."""

    name: str
    dims: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: Any
    chunks: tuple[int, ...]
    attrs: dict
    fill_value: Any = 0


_POSITION_CHUNK = 128


def column_dtype(values: Sequence[Any]):
    """The store dtype of a per-sequence metadata column: bool, int64, float64 or str."""
    if all(isinstance(v, bool) for v in values):
        return np.dtype(bool)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return np.dtype(np.int64)
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return np.dtype(np.float64)
    return str


def _chunks(shape: tuple[int, ...], dims: tuple[str, ...], itemsize: int, seq_chunk: int) -> tuple[int, ...]:
    """Sequence chunk = the batch; positions/queries in blocks of 128 (a short batch then
    writes whole chunks, not a padded copy of a long one); then halve the largest other dim
    until a chunk is <= 8 MB."""
    chunks = [min(seq_chunk, shape[0])] + [min(_POSITION_CHUNK, n) if d in ("position", "query") else n
                                           for d, n in zip(dims[1:], shape[1:])]
    while np.prod(chunks) * itemsize > _TARGET_CHUNK_BYTES:
        i = 1 + int(np.argmax(chunks[1:]))
        if chunks[i] == 1:
            break
        chunks[i] = (chunks[i] + 1) // 2
    return tuple(max(1, c) for c in chunks)


def layout(config, spec: RecordSpec, num_sequences: int, max_len: int, batch_size: int,
           metadata: Mapping[str, np.dtype] | None = None, vocab_size: int | None = None
           ) -> tuple[dict[str, Variable], dict[str, np.ndarray]]:
    """Every variable of a store for these settings, and the coordinate arrays.

    Returns ({name: Variable}, {coord name: values}).
    """
    spec = spec.resolved(config)
    attention = spec.attention
    sizes = {
        "sequence": num_sequences, "position": max_len, "layer": config.num_layers,
        "expert": config.num_experts, "slot": config.num_selected_experts,
        "query": max_len, "key": max_len, "hidden": config.emb_size,
        "attn_layer": len(attention.layers) if attention else 0,
        "head": len(attention.heads) if attention else 0,
        "rank": min(attention.k, max_len) if attention else 0,
        "residual_layer": len(spec.residual) if spec.residual is not None else 0,
        "expert_layer": len(spec.expert_outputs) if spec.expert_outputs is not None else 0,
        "vocab": vocab_size or 0,
    }

    def var(name, dims, dtype, attrs, fill=0):
        shape = tuple(sizes[d] for d in dims)
        itemsize = np.dtype(dtype).itemsize if dtype is not str else 16
        chunks = _chunks(shape, dims, itemsize, batch_size) if dims[0] == "sequence" else shape
        return Variable(name, dims, shape, dtype, chunks, attrs, fill)

    variables = {
        "tokens": var("tokens", ("sequence", "position"), np.int32,
                      {"long_name": "token id", "units": "id", "description": "token ids, right-padded with 0"}),
        "length": var("length", ("sequence",), np.int32,
                      {"long_name": "length", "units": "tokens", "description": "tokens before padding"}),
        "prompt": var("prompt", ("sequence",), str, {"long_name": "prompt", "units": "text",
                                                       "description": "the prompt text"}, ""),
        "done": var("done", ("sequence",), bool, {"long_name": "done", "units": "flag",
                                                  "description": "the sequence's data is complete"}, False),
    }
    for name, dtype in (metadata or {}).items():
        variables[name] = var(name, ("sequence",), dtype, {"long_name": name, "units": "",
                                                             "description": "prompt metadata"},
                              "" if dtype is str else 0)
    if vocab_size:
        variables["vocab_piece"] = var("vocab_piece", ("vocab",), str, {
            "long_name": "token piece", "units": "text", "description": "the tokenizer's piece for every id"}, "")
    for name in spec.names:
        q = QUANTITIES[name]
        variables[name] = var(name, q.dims, np.dtype(q.dtype),
                              {"long_name": q.long_name, "units": q.units, "description": q.description},
                              _FILL.get(name, 0))
    coords = {"layer": np.arange(config.num_layers, dtype=np.int32),
              "expert": np.arange(config.num_experts, dtype=np.int32),
              "slot": np.arange(config.num_selected_experts, dtype=np.int32)}
    if attention:
        coords["attn_layer"] = np.array(attention.layers, dtype=np.int32)
        coords["head"] = np.array(attention.heads, dtype=np.int32)
    if spec.residual is not None:
        coords["residual_layer"] = np.array(spec.residual, dtype=np.int32)
    if spec.expert_outputs is not None:
        coords["expert_layer"] = np.array(spec.expert_outputs, dtype=np.int32)
    return variables, coords


def record_bytes_per_token(config, spec: RecordSpec, context: int) -> dict[str, float]:
    """Uncompressed bytes per token of each recorded quantity, from the schema (dims and store
    dtypes), for sequences of `context` tokens (attention maps grow with it)."""
    spec = spec.resolved(config)
    attention = spec.attention
    sizes = {"layer": config.num_layers, "expert": config.num_experts, "slot": config.num_selected_experts,
             "hidden": config.emb_size, "key": context,
             "attn_layer": len(attention.layers) if attention else 0,
             "head": len(attention.heads) if attention else 0,
             "rank": min(attention.k, context) if attention else 0,
             "residual_layer": len(spec.residual) if spec.residual is not None else 0,
             "expert_layer": len(spec.expert_outputs) if spec.expert_outputs is not None else 0}
    out = {}
    for name in spec.names:
        q = QUANTITIES[name]
        per_token = np.prod([sizes[d] for d in q.dims if d not in ("sequence", "position", "query")])
        out[name] = float(per_token * np.dtype(q.dtype).itemsize)
    return out


def create(path, variables: Mapping[str, Variable], coords: Mapping[str, np.ndarray], attrs: dict) -> zarr.Group:
    """Creates the store (refusing to touch an existing path)."""
    group = zarr.open_group(store=str(path), mode="w-", zarr_format=3)
    for v in variables.values():
        compressors = "auto" if v.dtype is str else _NUMERIC_COMPRESSORS
        group.create_array(v.name, shape=v.shape, dtype=v.dtype, chunks=v.chunks, dimension_names=v.dims,
                           fill_value=v.fill_value, attributes=v.attrs, compressors=compressors,
                           chunk_key_encoding={"name": "default", "separator": "."})
    for name, values in coords.items():
        array = group.create_array(name, shape=values.shape, dtype=values.dtype, chunks=values.shape,
                                   dimension_names=(name,), attributes={"long_name": name, "units": "index"})
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
            moved[row, start:] = _FILL.get(name, 0)
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
    write, at about twice the speed of going through its pipeline chunk by chunk. Others
    (strings, blocks split over devices) take zarr's `setitem`.
    """
    import asyncio

    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    lengths = np.asarray(values["length"])
    pieces = {name: row_blocks(arrays[name], value, row0, n_valid, lengths, name, rows)
              for name, value in values.items()}
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
                # One array's zarr writes in turn: blocks of one batch may share a chunk (rows
                # of a batch split over devices), and concurrent writes to one chunk lose updates.
                await array._async_array.setitem(selection, block)
            else:
                await asyncio.gather(*(write_chunk(array, encoder, coords, data) for coords, data in chunks))

    async def write_all():
        await asyncio.gather(*(write_array(arrays[name], blocks) for name, blocks in pieces.items()))

    sync(write_all())
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


def open_store(path_or_url: str, only_done: bool = True, **storage_options):
    """Opens a dump as a lazy, dask-backed `xarray.Dataset`.

    Args:
      path_or_url: a local path or any fsspec URL (`file://`, `memory://`, `s3://` with s3fs).
      only_done: keep only sequences whose data is complete (the default, so a store that is
        still being written shows what is finished).
      storage_options: passed to fsspec (e.g. credentials).
    """
    import xarray as xr

    try:
        ds = xr.open_zarr(path_or_url, consolidated=False, chunks={}, zarr_format=3,
                          storage_options=storage_options or None)
    except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError) as e:
        raise StoreError(f"{path_or_url}: not a grokscope store ({type(e).__name__}: {e})") from None
    if "grokscope" not in ds.attrs:
        raise StoreError(f"{path_or_url}: a zarr group, but not a grokscope store (no 'grokscope' attribute)")
    if only_done:
        ds = ds.isel(sequence=np.flatnonzero(ds["done"].values))
    return ds


def dataset_from_arrays(variables: Mapping[str, Variable], coords: Mapping[str, np.ndarray],
                        arrays: Mapping[str, np.ndarray], attrs: dict):
    """An in-memory Dataset with the store's names, dims, dtypes and attributes."""
    import xarray as xr

    data_vars = {}
    for name, v in variables.items():
        value = np.asarray(arrays[name])
        if v.dtype is str:
            value = value.astype(np.dtypes.StringDType())
        else:
            value = value.astype(v.dtype, copy=False)
        data_vars[name] = xr.Variable(v.dims, value, attrs=v.attrs)
    coord_vars = {name: xr.Variable((name,), values, attrs={"long_name": name, "units": "index"})
                  for name, values in coords.items()}
    return xr.Dataset(data_vars, coords=coord_vars, attrs=attrs)


def token_pieces(ds, sequence: int, visible: bool = True) -> list[str]:
    """The pieces of one sequence's tokens (up to its length), whitespace made visible."""
    from grokscope.tokenizer import display_piece

    length = int(ds["length"].values[sequence])
    ids = np.asarray(ds["tokens"][sequence, :length].values)
    pieces = np.asarray(ds["vocab_piece"].values)[ids]
    return [display_piece(str(p)) if visible else str(p) for p in pieces]


def describe(ds, path: str) -> str:
    """A short text summary of a store: where it is, what it holds, and a first look at routing."""
    lines = [f"store: {path}  (status {ds.attrs.get('status')}, open with grokscope.open_store)"]
    n_tokens = int(ds["length"].sum())
    lines.append(f"  {ds.sizes['sequence']} sequences, {n_tokens} tokens, "
                 f"{ds.attrs['model_config']['num_layers']} layers x {ds.attrs['model_config']['num_experts']} experts")
    recorded = [name for name in QUANTITIES if name in ds]
    for name in recorded:
        dims = ", ".join(f"{d}={ds.sizes[d]}" for d in ds[name].dims)
        lines.append(f"  {name:<24} ({dims}) {ds[name].dtype}")
    extra = [name for name in ds.data_vars if name not in QUANTITIES and name not in
             ("tokens", "length", "prompt", "done", "vocab_piece")]
    if extra:
        lines.append(f"  per-sequence metadata: {', '.join(extra)}")
    if "expert_index" in ds and "label" in ds and ds.sizes["sequence"]:
        index = ds["expert_index"].isel(slot=0).values  # [S, P, L]
        valid = np.arange(index.shape[1])[None, :] < ds["length"].values[:, None]
        labels = np.array([str(x) for x in ds["label"].values])
        groups = sorted(set(labels))
        lines.append("  first-choice expert share by label (the expert whose share differs most):")
        for layer in range(index.shape[2]):
            shares = {}
            for g in groups:
                chosen = index[labels == g][:, :, layer][valid[labels == g]]
                shares[g] = np.bincount(chosen, minlength=ds.sizes["expert"]) / max(chosen.size, 1)
            spread = np.max([shares[g] for g in groups], axis=0) - np.min([shares[g] for g in groups], axis=0)
            e = int(np.argmax(spread))
            lines.append(f"    layer {layer}: expert {e}: " + ", ".join(f"{g} {shares[g][e]:.0%}" for g in groups))
    return "\n".join(lines)
