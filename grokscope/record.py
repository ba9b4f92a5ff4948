"""What the forward pass records, besides logits, and under which names.

Vocabulary (one name per quantity, used for the `Record` key, the zarr array and the docs):

Dims:
  sequence  a row of a batch / of a store
  position  0-based token index within the sequence (pads included)
  layer     decoder layer index, 0..num_layers-1, as in `decoder_layer_{i}`
  expert    expert index, 0..num_experts-1
  slot      top-k rank, 0 = the expert with the largest gate

Quantities:
  router_logits  [sequence, position, layer, expert] float32: the router's fp32 logits
                 `rms_norm_2(h) @ router.w`, before the softmax.
  expert_index   [sequence, position, layer, slot] int32: the top-k experts of
                 softmax(router_logits), largest first (ties go to the lower index).
  expert_gate    [sequence, position, layer, slot] float32: the top-k probabilities of
                 softmax(router_logits) over *all* experts, not renormalised (this is what
                 multiplies each expert's output). Pads are routed too and are not masked.

Modules emit quantities with `probe(name, value)`. `RecordSpec` selects which probes are
kept: the selection happens at trace time, so an unselected probe is never returned and
anything computed only for it is never lowered.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, NamedTuple

import haiku as hk
import jax.numpy as jnp

__all__ = ["RecordSpec", "Quantity", "QUANTITIES", "probe", "record_filter", "collect"]


class Quantity(NamedTuple):
    """Registry entry for one recorded quantity."""

    dims: tuple[str, ...]
    dtype: str
    long_name: str
    units: str
    description: str


QUANTITIES: dict[str, Quantity] = {
    "router_logits": Quantity(
        ("sequence", "position", "layer", "expert"), "float32", "router logits", "logit",
        "fp32 router logits rms_norm_2(h) @ router.w, before the softmax over all experts"),
    "expert_index": Quantity(
        ("sequence", "position", "layer", "slot"), "int32", "selected expert", "expert",
        "top-k experts of softmax(router_logits), largest probability first"),
    "expert_gate": Quantity(
        ("sequence", "position", "layer", "slot"), "float32", "expert gate", "probability",
        "top-k probabilities of softmax(router_logits) over all experts, not renormalised"),
}

_ROUTING = ("router_logits", "expert_index", "expert_gate")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RecordSpec:
    """What `forward` records besides logits. Frozen and hashable: it is part of the jit key.

    Attributes:
      routing: record `router_logits`, `expert_index` and `expert_gate` for every layer.
    """

    routing: bool = True

    @property
    def names(self) -> frozenset[str]:
        """Names of the probes this spec keeps."""
        return frozenset(_ROUTING if self.routing else ())

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def probe(name: str, value) -> None:
    """Offers `value` for recording under `name` (a no-op unless a RecordSpec selects it)."""
    hk.set_state(name, value)


def record_filter(spec: RecordSpec):
    """A haiku state setter that drops every probe `spec` does not select."""
    wanted = spec.names

    def setter(next_setter, value, context):
        if context.full_name.rsplit("/", 1)[-1] in wanted:
            return next_setter(value)
        return hk.DO_NOT_STORE

    return setter


_LAYER = re.compile(r"decoder_layer_(\d+)")


def collect(state: Mapping[str, Mapping[str, Any]], num_layers: int) -> dict[str, Any]:
    """Stacks per-layer probes from haiku state into `Record` arrays with a `layer` dim.

    Per-layer probes are [batch, position, ...]; the result is [batch, position, layer, ...].
    """
    per_name: dict[str, dict[int, Any]] = {}
    for module, values in state.items():
        match = _LAYER.search(module)
        if match is None:
            continue
        for name, value in values.items():
            per_name.setdefault(name, {})[int(match.group(1))] = value
    record = {}
    for name, layers in per_name.items():
        if sorted(layers) != list(range(num_layers)):
            raise ValueError(f"probe {name!r}: expected layers 0..{num_layers - 1}, got {sorted(layers)}")
        record[name] = jnp.stack([layers[i] for i in range(num_layers)], axis=2)
    return record
