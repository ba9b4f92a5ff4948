"""Routing and attention interventions, declared as data and applied inside the jitted forward.

An `Intervention` is frozen and hashable: a forward compiles once per (shape, interventions).
Each applies at chosen layers (default every layer) and, optionally, only at chosen token
positions (the positions the model sees, 0 = the first token):

  ban(e)            expert e is removed before the top-k: tokens that chose it take their next
                    best expert (gates stay the router's probabilities, not renormalized)
  zero(e)           routing unchanged, expert e's contribution dropped (its gate set to 0; the
                    other gate unchanged)
  force(experts)    the tokens are routed to `experts` (one per slot) with the given gates, or
                    with the router's own probabilities of those experts
  swap(a, b)        experts a and b exchange roles: tokens routed to a run b's weights and the
                    other way round, with their gates
  renormalize()     gates divided by their sum over the k slots (the variant some ports use)
  ablate_head(h)    attention head h's output is zeroed before the output projection
  zero_dense()      the dense MLP's output is zeroed (models with a dense MLP beside the
                    experts, as Grok-2): the FFN output becomes moe / sqrt(2)

In a layer they apply in this order: ban (before the top-k), force, swap, zero, renormalize.
The recorded `expert_index`/`expert_gate` are what the model then used; `router_logits` are
the router's own.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp

__all__ = ["Intervention", "ban", "zero", "force", "swap", "renormalize", "ablate_head", "zero_dense", "for_layer",
           "apply_routing", "ablate_heads", "zero_dense_output", "KINDS"]

KINDS = ("ban", "zero", "force", "swap", "renormalize", "ablate_head", "zero_dense")
ROUTING_KINDS = ("ban", "zero", "force", "swap", "renormalize")


def _ints(value, what: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    values = (value,) if isinstance(value, int) else tuple(value)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ValueError(f"{what}: expected non-negative ints, got {value!r}")
    return tuple(sorted(set(values)))


@dataclasses.dataclass(frozen=True)
class Intervention:
    """One intervention (build it with `ban`, `zero`, `force`, `swap`, `renormalize`,
    `ablate_head`). `layers`/`positions` None mean every layer / every position."""

    kind: str
    layers: tuple[int, ...] | None = None
    positions: tuple[int, ...] | None = None
    experts: tuple[int, ...] = ()
    gates: tuple[float, ...] | None = None
    head: int | None = None

    def __post_init__(self):
        if self.kind == "renormalise":
            warnings.warn("Intervention kind 'renormalise' is deprecated: use 'renormalize'", DeprecationWarning,
                          stacklevel=3)
            object.__setattr__(self, "kind", "renormalize")
        if self.kind not in KINDS:
            raise ValueError(f"intervention kind: expected one of {KINDS}, got {self.kind!r}")

    def applies_to(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers

    def check(self, config) -> None:
        """Raises ValueError naming what does not fit the model."""
        for layer in self.layers or ():
            if layer >= config.num_layers:
                raise ValueError(f"{self}: layer {layer} out of range (the model has {config.num_layers})")
        for e in self.experts:
            if e >= config.num_experts:
                raise ValueError(f"{self}: expert {e} out of range (the model has {config.num_experts})")
        if self.kind == "force" and len(self.experts) != config.num_selected_experts:
            raise ValueError(f"{self}: force needs {config.num_selected_experts} experts (one per slot), "
                             f"got {len(self.experts)}")
        if self.kind == "zero_dense" and not config.has_dense_mlp:
            raise ValueError(f"{self}: the model has no dense MLP beside its experts (dense_ffn_size is None)")
        if self.head is not None and self.head >= config.num_q_heads:
            raise ValueError(f"{self}: head {self.head} out of range (the model has {config.num_q_heads})")

    def describe(self) -> str:
        what = {"ban": f"ban expert {self.experts[0]}" if self.experts else "ban",
                "zero": f"zero expert {self.experts[0]}" if self.experts else "zero",
                "force": f"force experts {list(self.experts)}" + (f" gates {list(self.gates)}" if self.gates else ""),
                "swap": f"swap experts {self.experts[0]} and {self.experts[1]}" if len(self.experts) == 2 else "swap",
                "renormalize": "renormalize gates", "ablate_head": f"ablate head {self.head}",
                "zero_dense": "zero the dense MLP"}[self.kind]
        where = "every layer" if self.layers is None else f"layer{'s' if len(self.layers) > 1 else ''} " + \
            ",".join(map(str, self.layers))
        at = "" if self.positions is None else " at positions " + ",".join(map(str, self.positions))
        return f"{what} ({where}{at})"


def ban(expert: int, layer: int | Iterable[int] | None = None, positions=None) -> Intervention:
    return Intervention("ban", _ints(layer, "layer"), _ints(positions, "positions"), _ints(expert, "expert"))


def zero(expert: int, layer: int | Iterable[int] | None = None, positions=None) -> Intervention:
    return Intervention("zero", _ints(layer, "layer"), _ints(positions, "positions"), _ints(expert, "expert"))


def force(experts: Sequence[int], layer: int | Iterable[int] | None = None, gates: Sequence[float] | None = None,
          positions=None) -> Intervention:
    experts = tuple(int(e) for e in experts)
    if gates is not None and len(gates) != len(experts):
        raise ValueError(f"force: {len(gates)} gates for {len(experts)} experts")
    if len(set(experts)) != len(experts) or any(e < 0 for e in experts):
        raise ValueError(f"force: experts must be distinct non-negative ints, got {experts}")
    return Intervention("force", _ints(layer, "layer"), _ints(positions, "positions"), experts,
                        None if gates is None else tuple(float(g) for g in gates))


def swap(a: int, b: int, layer: int | Iterable[int] | None = None, positions=None) -> Intervention:
    if a == b:
        raise ValueError(f"swap: two different experts, got {a} and {b}")
    return Intervention("swap", _ints(layer, "layer"), _ints(positions, "positions"), (int(a), int(b)))


def renormalize(layer: int | Iterable[int] | None = None, positions=None) -> Intervention:
    return Intervention("renormalize", _ints(layer, "layer"), _ints(positions, "positions"))


def renormalise(layer: int | Iterable[int] | None = None, positions=None) -> Intervention:
    """Deprecated spelling of `renormalize`."""
    warnings.warn("renormalise is deprecated: use renormalize", DeprecationWarning, stacklevel=2)
    return renormalize(layer, positions)


def ablate_head(head: int, layer: int | Iterable[int] | None = None, positions=None) -> Intervention:
    if not isinstance(head, int) or head < 0:
        raise ValueError(f"ablate_head: expected a head index, got {head!r}")
    return Intervention("ablate_head", _ints(layer, "layer"), _ints(positions, "positions"), head=head)


def zero_dense(layer: int | Iterable[int] | None = None, positions=None) -> Intervention:
    return Intervention("zero_dense", _ints(layer, "layer"), _ints(positions, "positions"))


def for_layer(interventions: Sequence[Intervention], layer: int) -> tuple[Intervention, ...]:
    return tuple(iv for iv in interventions if iv.applies_to(layer))


def _where_positions(iv: Intervention, positions: jax.Array) -> jax.Array:
    """[B, T] bool: the tokens the intervention applies to."""
    if iv.positions is None:
        return jnp.ones(positions.shape, bool)
    return jnp.isin(positions, jnp.asarray(iv.positions, positions.dtype))


def apply_routing(probs: jax.Array, positions: jax.Array, k: int, interventions: Sequence[Intervention],
                  banned: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Top-k routing of `probs` [B, T, E] under the layer's interventions: (gates, index) [B, T, k].

    `banned` [E] bool, a traced array: experts banned at every position of this layer, as
    `ban` does (one compiled program serves any set of such bans)."""
    E = probs.shape[-1]
    experts = jnp.arange(E)
    bans = [iv for iv in interventions if iv.kind == "ban"]
    if bans or banned is not None:
        scores = probs if banned is None else jnp.where(banned[None, None, :], -jnp.inf, probs)
        for iv in bans:
            banned = _where_positions(iv, positions)[..., None] & (experts == iv.experts[0])
            scores = jnp.where(banned, -jnp.inf, scores)
        _, index = jax.lax.top_k(scores, k)
        index = index.astype(jnp.int32)
        gates = jnp.take_along_axis(probs, index, axis=-1)
    else:
        gates, index = jax.lax.top_k(probs, k)
        index = index.astype(jnp.int32)
    for iv in interventions:
        if iv.kind not in ROUTING_KINDS or iv.kind == "ban":
            continue
        where = _where_positions(iv, positions)[..., None]  # [B, T, 1]
        if iv.kind == "force":
            forced = jnp.broadcast_to(jnp.asarray(iv.experts, jnp.int32), index.shape)
            forced_gates = (jnp.broadcast_to(jnp.asarray(iv.gates, probs.dtype), gates.shape) if iv.gates is not None
                            else jnp.take_along_axis(probs, forced, axis=-1))
            index = jnp.where(where, forced, index)
            gates = jnp.where(where, forced_gates, gates)
        elif iv.kind == "swap":
            a, b = iv.experts
            swapped = jnp.where(index == a, b, jnp.where(index == b, a, index))
            index = jnp.where(where, swapped, index)
        elif iv.kind == "zero":
            gates = jnp.where(where & (index == iv.experts[0]), jnp.zeros_like(gates), gates)
        elif iv.kind == "renormalize":
            total = gates.sum(-1, keepdims=True)
            gates = jnp.where(where, gates / jnp.where(total > 0, total, 1), gates)
    return gates, index


def ablate_heads(out: jax.Array, positions: jax.Array, interventions: Sequence[Intervention]) -> jax.Array:
    """Zeroes ablated heads of the per-head attention output `out` [B, T, H, K]."""
    for iv in interventions:
        if iv.kind != "ablate_head":
            continue
        where = _where_positions(iv, positions)[:, :, None] & (jnp.arange(out.shape[2]) == iv.head)[None, None, :]
        out = jnp.where(where[..., None], jnp.zeros_like(out), out)
    return out


def zero_dense_output(out: jax.Array, positions: jax.Array, interventions: Sequence[Intervention]) -> jax.Array:
    """Zeroes the dense MLP's output `out` [B, T, D] where a `zero_dense` intervention applies."""
    for iv in interventions:
        if iv.kind == "zero_dense":
            out = jnp.where(_where_positions(iv, positions)[..., None], jnp.zeros_like(out), out)
    return out
