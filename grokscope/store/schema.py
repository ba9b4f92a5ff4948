"""The layout of a dump's zarr v3 store, derived from the quantity registry (`grokscope.record`).

One store per dump, every array in the root group with `dimension_names`, so that
`xarray.open_zarr(path)` alone opens everything. Arrays are pre-sized from the prompt count
and filled by region; chunks along `sequence` equal the batch size (in a multi-process job,
the rows of a batch one process writes), so writers never share a chunk.

Schema (N sequences, P = max_len positions):
  tokens        (sequence, position) int32, pad = 0
  length        (sequence,) int32, tokens before padding
  prompt        (sequence,) string, the prompt text
  <metadata>    (sequence,) per-sequence fields of a .jsonl prompt file, e.g. `label`
  done          (sequence,) bool, the sequence's data is complete
  vocab_piece   (vocab,) string, the tokenizer's piece for every id (labels without a tokenizer)
  + the recorded quantities of `grokscope.record.QUANTITIES` selected by the RecordSpec,
  + coordinates layer, expert, slot, attn_layer, head, residual_layer, expert_layer (true numbers).
Root attributes: written by `grokscope.dump` (the dump's identity, which a resumed run must
match, and its provenance); `grokscope.schema` is `SCHEMA_VERSION`.

Also here: the rules a per-sequence metadata column must follow (its name, its values, its
dtype), `record_bytes_per_token`, and `StoreError`, the error of every part of the store.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import numpy as np

from grokscope.record import LAYER_DIMS, QUANTITIES, RecordSpec, dim_coords, dim_sizes, store_dtype
from grokscope.tokenizer import lone_surrogate

__all__ = ["Variable", "layout", "record_bytes_per_token", "column_dtype", "StoreError", "RESERVED_NAMES",
           "metadata_name_problem", "metadata_value_problem", "metadata_column_problem", "SCHEMA_VERSION"]

_TARGET_CHUNK_BYTES = 8 * 1024**2

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

