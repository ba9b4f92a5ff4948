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
Root attributes: see `provenance` in `grokscope.dump`; `grokscope.schema` is `SCHEMA_VERSION`.

`open_store` checks a store before opening it (`check_store`: metadata, schema, and every chunk
the finished sequences need), so a damaged store is an error naming the array and chunk.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import queue
import threading
from typing import Any, Mapping, Sequence

import jax
import numpy as np
import zarr

from grokscope.record import LAYER_DIMS, QUANTITIES, RecordSpec, dim_coords, dim_sizes, store_dtype
from grokscope.tokenizer import lone_surrogate

__all__ = ["Variable", "layout", "record_bytes_per_token", "create", "row_blocks", "write_batch", "StoreWriter", "open_store", "token_pieces", "dataset_from_arrays", "describe", "column_dtype", "mask_padding",
           "StoreError", "RESERVED_NAMES", "metadata_name_problem", "metadata_value_problem",
           "metadata_column_problem", "SCHEMA_VERSION", "StoreCheck", "check_store", "verify_store"]

_TARGET_CHUNK_BYTES = 8 * 1024**2
# Blosc LZ4 with byte shuffle: compresses activations about as well as zarr's default zstd
# here, at several times its speed, so writing keeps up with the forward.
_NUMERIC_COMPRESSORS = [zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")]

# The store layout this code reads and writes (root attribute `grokscope.schema`).
SCHEMA_VERSION = 1

# Names a metadata column may not take: the store's own arrays, every recorded quantity and
# every dim that has a coordinate array.
RESERVED_NAMES = frozenset({"tokens", "length", "prompt", "done", "vocab_piece", "layer", "expert", "slot",
                            "head", *LAYER_DIMS, *QUANTITIES})


# Dimension names of a store: a metadata array of one of these names would clash with the dimension.
_DIMENSIONS = frozenset({"sequence", "position", "vocab"} | {d for q in QUANTITIES.values() for d in q.dims})
_INT64_MIN, _INT64_MAX = -2**63, 2**63 - 1
_FLOAT64_EXACT_INT = 2**53
_RESERVED_FOLDED = frozenset(n.casefold() for n in RESERVED_NAMES | _DIMENSIONS | {"zarr.json"})


def metadata_name_problem(name: str, seen: dict[str, str]) -> str | None:
    """Why `name` cannot be a metadata array of the store (None: it can). `seen` maps the
    casefolded names already accepted to their spelling."""
    if name == "":
        return "an empty name"
    surrogate = lone_surrogate(name)
    if surrogate:
        return f"not valid Unicode ({surrogate})"
    if name.casefold() in _RESERVED_FOLDED:
        return "reserved by the store (its own arrays, dimensions and metadata use it)"
    if "/" in name or "\\" in name:
        return "contains a path separator ('/' or '\\')"
    if name.startswith("."):
        return "starts with '.'"
    if name.startswith("__"):
        return "starts with '__' (reserved by zarr)"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "contains a control character"
    if len(name.encode("utf-8")) > 255:
        return "longer than 255 bytes (a file name)"
    other = seen.get(name.casefold())
    if other is not None and other != name:
        return f"differs from field {other!r} only in case (one directory on a case-insensitive filesystem)"
    return None


def metadata_value_problem(value) -> str | None:
    """Why the store cannot hold this metadata value exactly (None: it can)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        if not _INT64_MIN <= value <= _INT64_MAX:
            return f"{value} does not fit in a 64-bit integer (expected -2**63 .. 2**63-1)"
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{value} is not a finite number"
    if isinstance(value, str):
        surrogate = lone_surrogate(value)
        return f"not valid Unicode ({surrogate})" if surrogate else None
    return f"expected a string, number or boolean, got {type(value).__name__}"


def metadata_column_problem(values: Sequence[Any]) -> tuple[int, str] | None:
    """(index, why) of the first value a metadata column cannot hold exactly as a whole (an
    integer beyond 2**53 in a column that `column_dtype` makes float64); None: it can."""
    if column_dtype(values) == np.float64:
        for i, value in enumerate(values):
            if isinstance(value, int) and abs(value) > _FLOAT64_EXACT_INT:
                return i, (f"the integer {value} cannot be stored exactly in this field's float64 column "
                           f"(other values are fractional numbers)")
    return None


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
    sizes = {**dim_sizes(config, spec, max_len), "sequence": num_sequences, "vocab": vocab_size or 0}

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
        variables[name] = var(name, q.dims, store_dtype(name, config),
                              {"long_name": q.long_name, "units": q.units, "description": q.description},
                              q.fill)
    coords = {name: np.array(values, dtype=np.int32) for name, values in dim_coords(config, spec).items()}
    return variables, coords


def record_bytes_per_token(config, spec: RecordSpec, context: int) -> dict[str, float]:
    """Uncompressed bytes per token of each recorded quantity, from the schema (dims and store
    dtypes), for sequences of `context` tokens (attention maps grow with it)."""
    sizes = dim_sizes(config, spec, context)
    out = {}
    for name in spec.resolved(config).names:
        q = QUANTITIES[name]
        per_token = np.prod([sizes[d] for d in q.dims if d not in ("sequence", "position", "query")])
        out[name] = float(per_token * store_dtype(name, config).itemsize)
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
    (`grokscope._zarr_private`, with the zarr versions it was tested with). Others (strings,
    blocks split over devices), and every block with an untested zarr, take zarr's own path.
    """
    from grokscope import _zarr_private

    lengths = np.asarray(values["length"])
    pieces = {name: row_blocks(arrays[name], value, row0, n_valid, lengths, name, rows)
              for name, value in values.items()}
    if _zarr_private.SUPPORTED:
        _zarr_private.write_pieces(arrays, pieces)
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


# Dims along which a row's data ends at its length: the writer writes each batch over positions
# [0, bucket length), so chunks past a row's length may never exist.
_LENGTH_BOUND_DIMS = frozenset({"position", "query", "key", "rank"})
_LISTED_PER_ARRAY = 5  # missing chunks of one array named one by one, the rest counted


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


def _raw_store(path_or_url: str, storage_options: Mapping[str, Any]):
    """The zarr store of a local path or an fsspec URL, read-only."""
    text = str(path_or_url)
    if "://" in text or "::" in text:
        return zarr.storage.FsspecStore.from_url(text, storage_options=dict(storage_options) or None,
                                                 read_only=True)
    if storage_options:
        raise StoreError(f"{text}: storage options apply to fsspec URLs only, not to a local path")
    return zarr.storage.LocalStore(text, read_only=True)


@dataclasses.dataclass
class StoreCheck:
    """What `check_store` found.

    Attributes:
      path: the store, as given.
      problems: one line per problem, each naming the array and chunk key or the file; empty if fine.
      attrs: the root group's attributes.
      arrays: {name: zarr ArrayV3Metadata} of every array whose metadata parses.
      done, length: the `done` flags and `length`s of a dump (None for other stores or if unreadable).
      chunks: chunk objects in the store; decoded: those read and decoded (`deep`).
      store: the zarr store the check read through (it refuses damaged chunk objects).
    """

    path: str
    problems: list[str] = dataclasses.field(default_factory=list)
    attrs: dict = dataclasses.field(default_factory=dict)
    arrays: dict = dataclasses.field(default_factory=dict)
    done: np.ndarray | None = None
    length: np.ndarray | None = None
    chunks: int = 0
    decoded: int = 0
    store: Any = dataclasses.field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """One line: "PATH: ok (N sequences complete, ...)" or "PATH: N problems"."""
        if self.problems:
            return f"{self.path}: {len(self.problems)} problem{'s' if len(self.problems) > 1 else ''}"
        parts = []
        if self.done is not None:
            finished, total = int(np.sum(self.done)), len(self.done)
            parts.append(f"{finished} sequences complete" + (f" of {total}" if finished != total else ""))
        parts.append(f"status {self.attrs.get('status', '?')}")
        parts.append(f"{len(self.arrays)} arrays, {self.chunks} chunks"
                     + (f", all {self.decoded} decoded" if self.decoded else ""))
        return f"{self.path}: ok ({', '.join(parts)})"


def _expected_layout(attrs: Mapping[str, Any]) -> tuple[set[str], dict[str, np.ndarray]]:
    """The arrays a dump with these root attributes holds, and its coordinate values."""
    from grokscope.config import ModelConfig

    required = {"tokens", "length", "prompt", "done", "vocab_piece"}
    try:
        config = ModelConfig.from_dict(attrs["model_config"])
        spec = RecordSpec.from_dict(attrs["record_spec"])
        variables, coords = layout(config, spec, 1, int(attrs["max_len"]), 1)
    except (AttributeError, KeyError, TypeError, ValueError):  # attributes not a dump's: the core arrays only
        return required, {}
    return required | set(variables) | set(coords), coords


def _grid(meta) -> list[range]:
    return [range(-(-n // c)) for n, c in zip(meta.shape, meta.chunk_grid.chunk_shape)]


def _chunk_region(meta, coords) -> tuple[slice, ...]:
    return tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(coords, meta.chunk_grid.chunk_shape, meta.shape))


def _missing_chunks(name: str, meta, present: set[str], done: np.ndarray | None, length: np.ndarray | None,
                    coords: Mapping[str, np.ndarray]) -> list[str]:
    """The chunks of one array that a dump's finished sequences (or, without a `sequence` dim,
    the array itself) need and that are not in the store, one line each."""
    dims = tuple(meta.dimension_names or ())
    chunk_shape = meta.chunk_grid.chunk_shape
    missing: list[tuple[str, str]] = []

    def want(chunk, note=""):
        key = f"{name}/{meta.encode_chunk_key(tuple(chunk))}"
        if key not in present:
            missing.append((key, note))

    if "sequence" not in dims:
        expected = coords.get(name) if dims == (name,) else None
        for chunk in itertools.product(*_grid(meta)):
            if expected is not None:
                values = expected[_chunk_region(meta, chunk)[0]]
                if values.size and np.all(values == meta.fill_value):
                    continue  # e.g. a coordinate [0]: older versions skipped chunks equal to the fill value
            want(chunk)
    elif done is not None:
        axis = dims.index("sequence")
        rows = np.flatnonzero(done[: meta.shape[axis]])
        if rows.size:
            lengths = (np.asarray(length)[rows] if length is not None and len(length) >= len(done)
                       else np.ones(rows.size, np.int64))
            block = rows // chunk_shape[axis]
            starts = np.flatnonzero(np.r_[True, block[1:] != block[:-1]])
            longest = np.maximum.reduceat(lengths, starts)
            for j, first, last, n_tokens in zip(block[starts], rows[starts],
                                                 rows[np.r_[starts[1:] - 1, rows.size - 1]], longest):
                ranges = []
                for d, (dim, n, c) in enumerate(zip(dims, meta.shape, chunk_shape)):
                    if d == axis:
                        ranges.append([int(j)])
                    elif dim in _LENGTH_BOUND_DIMS:
                        ranges.append(range(-(-min(int(n_tokens), n) // c)))
                    else:
                        ranges.append(range(-(-n // c)))
                note = f" (sequence {first} is done)" if first == last else f" (sequences {first}..{last} are done)"
                for chunk in itertools.product(*ranges):
                    want(chunk, note)
    lines = [f"{name}: chunk {key} missing{note}" for key, note in missing[:_LISTED_PER_ARRAY]]
    if len(missing) > _LISTED_PER_ARRAY:
        lines.append(f"{name}: {len(missing) - _LISTED_PER_ARRAY} more chunks missing")
    return lines


def check_store(path_or_url: str, deep: bool = False, **storage_options) -> StoreCheck:
    """Checks a store's integrity; the problems found are in the result's `problems`.

    The cheap check (what `open_store` runs) lists the store's keys once and reads the
    metadata, `done` and `length`: every zarr.json parses; the root is a grokscope store of a
    schema this code knows; a store whose status is "complete" has every `done` chunk, every
    flag True; every chunk that a finished sequence's data needs exists (along `position`,
    `query`, `key` and `rank` the chunks covering the sequence's length, all chunks of other
    dims) in every array with a `sequence` dim, and arrays without one have all their chunks.
    `deep` also reads and decodes every chunk, naming those that fail.
    """
    import asyncio
    import json

    from grokscope._zarr_private import ArrayV3Metadata, default_buffer_prototype, sync

    name = str(path_or_url)
    report = StoreCheck(name)
    problems = report.problems
    raw = _raw_store(name, storage_options)
    prototype = default_buffer_prototype()

    async def list_keys():
        return [key async for key in raw.list()]

    async def read(keys):
        values = await asyncio.gather(*(raw.get(key, prototype) for key in keys))
        return [None if v is None else v.to_bytes() for v in values]

    def parse(key, data):
        try:
            return json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            problems.append(f"{key}: not valid JSON ({e})")
            return None

    arrays_read: dict[str, Any] = {}  # zarr.json key -> its ArrayV3Metadata, None if absent or bad

    def load_arrays(documents):
        todo = [key for key in documents if key not in arrays_read]
        for key, data in zip(todo, sync(read(todo))):
            doc = parse(key, data) if data is not None else None
            arrays_read[key] = None
            if isinstance(doc, dict) and doc.get("node_type") == "array":
                try:
                    arrays_read[key] = ArrayV3Metadata.from_dict(dict(doc))
                except Exception as e:  # noqa: BLE001 - zarr raises many types for bad metadata
                    problems.append(f"{key}: not valid zarr array metadata ({type(e).__name__}: {e})")

    def checked_store(arrays):
        frames = {a: kind for a, meta in arrays.items() if (kind := _frame_kind(meta)) is not None}
        return _CheckedStore(raw, frames, name)

    def read_array(store, array):
        try:
            return np.asarray(zarr.open_array(store=store, path=array, mode="r", zarr_format=3)[...])
        except _DamagedChunk as e:
            problems.append(e.problem)
        except Exception as e:  # noqa: BLE001 - any decode failure is reported, not raised
            problems.append(f"{array}: cannot be read ({type(e).__name__}: {e})")
        return None

    try:
        root_data = sync(read(["zarr.json"]))[0]
        if root_data is None:
            v2 = any(v is not None for v in sync(read([".zgroup", ".zarray"])))
            problems.append("not a grokscope store (no zarr.json at its root" + (": a zarr v2 store)" if v2 else ")"))
            return report
    except FileNotFoundError as e:
        problems.append(f"not a grokscope store ({e})")
        return report
    except OSError as e:
        problems.append(f"cannot read the store ({type(e).__name__}: {e})")
        return report
    root = parse("zarr.json", root_data)
    if root is None:
        return report
    if not isinstance(root, dict) or root.get("node_type") == "array":
        problems.append("a zarr array, not a grokscope store (a zarr group of arrays)")
        return report
    if root.get("node_type") != "group" or root.get("zarr_format") != 3:
        problems.append("zarr.json: not a zarr v3 group's metadata, so not a grokscope store")
        return report
    attrs = report.attrs = dict(root.get("attributes") or {})
    marker = attrs.get("grokscope")
    if not isinstance(marker, dict):
        problems.append("a zarr group, but not a grokscope store (no 'grokscope' attribute)")
        return report
    # Datasets grokscope writes through xarray (Session, effects, synthetic) carry a `kind`;
    # dumps carry the schema version instead.
    is_dump = "kind" not in marker
    if is_dump and marker.get("schema") != SCHEMA_VERSION:
        problems.append(f"zarr.json: attribute grokscope.schema: expected {SCHEMA_VERSION}, got "
                        f"{marker.get('schema')!r} (a store layout this version of grokscope does not read)")
        return report
    if is_dump:
        # Read before the keys are listed: a writer marks a batch done only after writing all
        # its data, so every chunk a done flag vouches for is in the listing that follows.
        load_arrays(["done/zarr.json", "length/zarr.json"])
        first = {key[: -len("/zarr.json")]: meta for key, meta in arrays_read.items() if meta is not None}
        early = checked_store(first)
        if "done" in first:
            report.done = read_array(early, "done")
        if "length" in first:
            report.length = read_array(early, "length")

    try:
        keys = set(sync(list_keys()))
    except OSError as e:
        problems.append(f"cannot list the store ({type(e).__name__}: {e})")
        return report
    load_arrays(sorted(k for k in keys if k.endswith("/zarr.json")))
    arrays = report.arrays = {key[: -len("/zarr.json")]: meta for key, meta in sorted(arrays_read.items())
                              if meta is not None and key in keys}
    present: dict[str, set[str]] = {a: set() for a in arrays}
    orphans: dict[str, int] = {}
    for key in keys:
        owner = _owner(key, arrays)
        if owner is not None:
            present[owner].add(key)
        elif "/" in key and not key.endswith("zarr.json") and not key.endswith(".partial"):
            top = key.split("/", 1)[0]
            orphans[top] = orphans.get(top, 0) + 1
    report.chunks = sum(len(v) for v in present.values())
    for top, count in sorted(orphans.items()):
        if f"{top}/zarr.json" not in keys:
            problems.append(f"{top}/zarr.json missing: {count} chunk objects under {top}/ have no array metadata")
    checked = report.store = checked_store(arrays)

    if is_dump:
        expected, coords = _expected_layout(attrs)
        for array in sorted(expected):
            if array not in arrays and f"{array}/zarr.json" not in keys:
                problems.append(f"{array}: array missing (no {array}/zarr.json)")
        done_meta, done = arrays.get("done"), report.done
        if done_meta is not None and done is not None:
            done = report.done = done.astype(bool)
            if attrs.get("status") == "complete":
                lost = [f"done/{done_meta.encode_chunk_key(c)}" for c in itertools.product(*_grid(done_meta))]
                lost = [key for key in lost if key not in present["done"]]
                problems.extend(f"done: chunk {key} missing in a store whose status is complete"
                                for key in lost[:_LISTED_PER_ARRAY])
                if len(lost) > _LISTED_PER_ARRAY:
                    problems.append(f"done: {len(lost) - _LISTED_PER_ARRAY} more chunks missing")
                if not lost and not done.all():
                    pending = np.flatnonzero(~done)
                    problems.append(f"done: {pending.size} of {done.size} sequences not done (first: "
                                    f"{pending[0]}) in a store whose status is complete")
            for array, meta in arrays.items():
                dims = tuple(meta.dimension_names or ())
                if "sequence" in dims and meta.shape[dims.index("sequence")] != done.size:
                    problems.append(f"{array}: {meta.shape[dims.index('sequence')]} sequences, "
                                    f"done has {done.size}")
        for array, meta in sorted(arrays.items()):
            problems.extend(_missing_chunks(array, meta, present[array], report.done, report.length, coords))

    if deep:
        for array, meta in sorted(arrays.items()):
            try:
                reader = zarr.open_array(store=checked, path=array, mode="r", zarr_format=3)
            except Exception as e:  # noqa: BLE001
                problems.append(f"{array}: cannot be opened ({type(e).__name__}: {e})")
                continue
            for chunk in itertools.product(*_grid(meta)):
                key = f"{array}/{meta.encode_chunk_key(tuple(chunk))}"
                if key not in present[array]:
                    continue
                try:
                    reader[_chunk_region(meta, chunk)]
                    report.decoded += 1
                except _DamagedChunk as e:
                    problems.append(e.problem)
                except Exception as e:  # noqa: BLE001 - every failing chunk is named
                    problems.append(f"{array}: chunk {key} does not decode ({type(e).__name__}: {e})")
    return report


def verify_store(path_or_url: str, deep: bool = False, **storage_options) -> list[str]:
    """The problems found in a store (empty if it is fine): see `check_store`."""
    return check_store(path_or_url, deep=deep, **storage_options).problems


def _problems_error(path: str, problems: Sequence[str]) -> StoreError:
    more = len(problems) - 1
    tail = (f" (and {more} more problem{'s' if more > 1 else ''}; `grokscope verify {path}` lists them)"
            if more else "")
    return StoreError(f"{path}: {problems[0]}{tail}")


def open_store(path_or_url: str, only_done: bool = True, **storage_options):
    """Opens a dump as a lazy, dask-backed `xarray.Dataset`.

    The store is checked first (`check_store`'s cheap check: its keys listed once, `done` and
    `length` read): a damaged store raises `StoreError` naming the first problem, never reads
    as data. Chunks read later whose bytes disagree with their compressor's framing (e.g.
    truncated) raise `StoreError` naming the array and chunk.

    Args:
      path_or_url: a local path or any fsspec URL (`file://`, `memory://`, `s3://` with s3fs).
      only_done: keep only sequences whose data is complete (the default, so a store that is
        still being written shows what is finished).
      storage_options: passed to fsspec (e.g. credentials).
    """
    import xarray as xr

    check = check_store(path_or_url, **storage_options)
    if check.problems:
        raise _problems_error(str(path_or_url), check.problems)
    try:
        ds = xr.open_zarr(check.store, consolidated=False, chunks={}, zarr_format=3)
    except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError) as e:
        raise StoreError(f"{path_or_url}: not a grokscope store ({type(e).__name__}: {e})") from None
    if only_done and "done" in ds:
        done = check.done if check.done is not None else ds["done"].values
        ds = ds.isel(sequence=np.flatnonzero(done))
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
