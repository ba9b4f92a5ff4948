"""Shared pieces of the analysis functions: the padding mask, router probabilities, and
small synthetic stores for tests and examples."""

from __future__ import annotations

import warnings
from typing import Literal, Sequence

import numpy as np
import xarray as xr

Choice = Literal["first", "all"]
"""Which of a token's top-k experts a count or a rate takes: "first" (slot 0, the largest
gate) or "all" (every one of the k slots)."""

_OLD_CHOICES = {"any": "all", "topk": "all"}


def resolve_choice(choice, first_choice_only: bool | None = None) -> str:
    """`choice` as "first" or "all". The spellings of earlier versions (`first_choice_only=`
    True/False, `choice="any"` or `"topk"`) still work, with a DeprecationWarning."""
    if first_choice_only is not None:
        warnings.warn("first_choice_only= is deprecated: use choice='first' or choice='all'",
                      DeprecationWarning, stacklevel=3)
        choice = "first" if first_choice_only else "all"
    if isinstance(choice, bool):
        warnings.warn("a True/False choice is deprecated: use choice='first' or choice='all'",
                      DeprecationWarning, stacklevel=3)
        choice = "first" if choice else "all"
    if choice in _OLD_CHOICES:
        warnings.warn(f"choice={choice!r} is deprecated: use choice='all'", DeprecationWarning, stacklevel=3)
        choice = _OLD_CHOICES[choice]
    if choice not in ("first", "all"):
        raise ValueError(f"choice: expected 'first' (slot 0) or 'all' (every top-k slot), got {choice!r}")
    return choice

__all__ = ["valid_tokens", "router_probs", "synthetic_store"]


def valid_tokens(ds: xr.Dataset) -> xr.DataArray:
    """(sequence, position) bool: True at real tokens (position < length), False at padding."""
    position = xr.DataArray(np.arange(ds.sizes["position"]), dims="position")
    return (position < ds["length"]).transpose("sequence", "position")


def router_probs(ds: xr.Dataset) -> xr.DataArray:
    """softmax(router_logits) over `expert`, float32 (sequence, position, layer, expert)."""
    logits = ds["router_logits"]
    shifted = logits - logits.max("expert")
    exp = np.exp(shifted)
    return (exp / exp.sum("expert")).astype(np.float32)


def synthetic_store(expert_index: np.ndarray, lengths: Sequence[int], router_logits: np.ndarray | None = None,
                    metadata: dict[str, Sequence] | None = None, tokens: np.ndarray | None = None,
                    num_experts: int = 8) -> xr.Dataset:
    """A Dataset with a dump's names and dims, from given routing (for tests and examples).

    Args:
      expert_index: int [sequence, position, layer, slot].
      lengths: real tokens per sequence; positions beyond are padding (set to -1 here).
      router_logits: float [sequence, position, layer, expert]; default: logit 2 * (k - s)
        for the expert in slot s and 0 for the others, so `expert_index` is the top-k.
      metadata: per-sequence columns, e.g. {"label": [...]}.
      tokens: int [sequence, position]; default 1 + position.
      num_experts: size of `expert`.
    """
    index = np.asarray(expert_index).astype(np.int8)
    S, P, L, K = index.shape
    lengths = np.asarray(lengths, dtype=np.int32)
    pad = np.arange(P)[None, :] >= lengths[:, None]
    if router_logits is None:
        router_logits = np.zeros((S, P, L, num_experts), np.float32)
        for slot in range(K):
            np.put_along_axis(router_logits, index[..., slot:slot + 1].astype(np.int64).clip(0),
                              float(K - slot) * 2.0, axis=-1)
    router_logits = np.asarray(router_logits, np.float32).copy()
    probs = np.exp(router_logits - router_logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    gate = np.take_along_axis(probs, index.astype(np.int64).clip(0), axis=-1).astype(np.float32)
    index = index.copy()
    index[pad] = -1
    gate[pad] = 0
    router_logits[pad] = 0
    if tokens is None:
        tokens = np.broadcast_to(1 + np.arange(P, dtype=np.int32), (S, P)).copy()
    tokens = np.where(pad, 0, tokens).astype(np.int32)
    data = {
        "tokens": (("sequence", "position"), tokens),
        "length": (("sequence",), lengths),
        "done": (("sequence",), np.ones(S, bool)),
        "router_logits": (("sequence", "position", "layer", "expert"), router_logits),
        "expert_index": (("sequence", "position", "layer", "slot"), index),
        "expert_gate": (("sequence", "position", "layer", "slot"), gate),
    }
    for name, values in (metadata or {}).items():
        values = np.asarray(values)
        if values.dtype.kind in "UO":  # strings as a store holds them
            values = values.astype(np.dtypes.StringDType())
        data[name] = (("sequence",), values)
    coords = {"layer": np.arange(L), "expert": np.arange(num_experts), "slot": np.arange(K)}
    return xr.Dataset(data, coords=coords, attrs={"grokscope": {"kind": "synthetic"}})
