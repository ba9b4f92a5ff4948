"""A store's integrity: `check_store`, its result `StoreCheck`, and `verify_store`.

The cheap check (what `open_store` runs) lists the store's keys once and reads the metadata,
`done` and `length`, and finds every chunk the finished sequences need that is missing; the
deep check also reads and decodes every chunk. Every problem names the array and chunk key
or the file.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Mapping

import numpy as np
import zarr

from grokscope.record import RecordSpec
from grokscope.store.frames import _CheckedStore, _DamagedChunk, _frame_kind, _owner
from grokscope.store.schema import SCHEMA_VERSION, StoreError, layout

__all__ = ["StoreCheck", "check_store", "verify_store"]

# Dims along which a row's data ends at its length: the writer writes each batch over positions
# [0, bucket length), so chunks past a row's length may never exist.
_LENGTH_BOUND_DIMS = frozenset({"position", "query", "key", "rank"})
_LISTED_PER_ARRAY = 5  # missing chunks of one array named one by one, the rest counted


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

    from grokscope.store.zarr_internals import ArrayV3Metadata, default_buffer_prototype, sync

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
