"""Reading a store as an `xarray.Dataset` (`open_store`), and Datasets of the store's form.

`open_store` checks a store before opening it (`check_store`: metadata, schema, and every
chunk the finished sequences need), so a damaged store is an error naming the array and
chunk. `dataset_from_arrays` builds an in-memory Dataset with the store's names, dims, dtypes
and attributes; `token_pieces` and `describe` read a Dataset of either kind.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import zarr

from grokscope.record import QUANTITIES
from grokscope.store.schema import StoreError, Variable
from grokscope.store.verify import check_store

__all__ = ["open_store", "dataset_from_arrays", "token_pieces", "describe"]


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
