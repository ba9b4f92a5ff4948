"""What the forward pass records, besides logits, and under which names.

Vocabulary (one name per quantity: the `Record` key, the zarr array, the widget label, the docs):

Dims:
  sequence        a row of a batch / of a store
  position        0-based token index within the sequence (pads included)
  layer           decoder layer index, 0..num_layers-1, as in `decoder_layer_{i}`
  expert          expert index, 0..num_experts-1
  slot            top-k rank of the router, 0 = the expert with the largest gate
  attn_layer      the recorded subset of layers for attention (coordinate: true layer numbers)
  head            query head, 0..num_q_heads-1 (kv group = head // (num_q_heads / num_kv_heads));
                  the recorded subset (coordinate: true head numbers)
  query, key      the two positions of an attention map
  rank            top-k rank of an attention row, 0 = the key with the largest weight
  residual_layer  the recorded subset of layers for the residual stream (coordinate: true numbers)
  expert_layer    the recorded subset of layers for expert outputs (coordinate: true numbers)
  hidden          the residual stream's width (emb_size)

Quantities (see `QUANTITIES` for dims and dtypes):
  router_logits            fp32 router logits `rms_norm_2(h) @ router.w`, before the softmax.
  expert_index             top-k experts of softmax(router_logits), largest probability first
                           (ties go to the lower index).
  expert_gate              top-k probabilities of softmax(router_logits) over *all* experts,
                           not renormalised (this is what multiplies each expert's output).
                           Pads are routed too.
  attn_weights             attention probabilities per selected head ("full").
  attn_weights_head_mean   their mean over the selected heads ("head_mean").
  attn_topk_index/weight   for each query, the k keys with the largest weights and those
                           weights ("topk"; sparse, scales to long contexts); index -1 where a
                           query has fewer than k keys it may attend to.
  residual                 the residual stream after the decoder layer.

Modules offer quantities with `probe(name, value)`; a `RecordSpec` decides, at trace time,
which are kept and in which form (`record_filter`), so an unselected quantity is never
returned and anything computed only for it is never lowered.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal, Mapping, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp

__all__ = ["RecordSpec", "AttentionSpec", "Quantity", "QUANTITIES", "probe", "record_filter", "collect",
           "resolve_selection", "to_store_dtypes"]

Selection = Literal["all"] | tuple[int, ...]


class Quantity(NamedTuple):
    """Registry entry for one recorded quantity (dims as stored, with `sequence` first)."""

    dims: tuple[str, ...]
    dtype: str  # dtype in the store
    long_name: str
    units: str
    description: str


QUANTITIES: dict[str, Quantity] = {
    "router_logits": Quantity(
        ("sequence", "position", "layer", "expert"), "float32", "router logits", "logit",
        "fp32 router logits rms_norm_2(h) @ router.w, before the softmax over all experts"),
    "expert_index": Quantity(
        ("sequence", "position", "layer", "slot"), "int8", "selected expert", "expert",
        "top-k experts of softmax(router_logits), largest probability first"),
    "expert_gate": Quantity(
        ("sequence", "position", "layer", "slot"), "float32", "expert gate", "probability",
        "top-k probabilities of softmax(router_logits) over all experts, not renormalised"),
    "attn_weights": Quantity(
        ("sequence", "attn_layer", "head", "query", "key"), "float16", "attention weight", "probability",
        "softmax attention probabilities of each selected head"),
    "attn_weights_head_mean": Quantity(
        ("sequence", "attn_layer", "query", "key"), "float16", "mean attention weight", "probability",
        "attention probabilities averaged over the selected heads"),
    "attn_topk_index": Quantity(
        ("sequence", "attn_layer", "head", "query", "rank"), "int32", "attended key", "position",
        "for each query, the keys with the largest attention weights, largest first"),
    "attn_topk_weight": Quantity(
        ("sequence", "attn_layer", "head", "query", "rank"), "float16", "attention weight", "probability",
        "the attention weights of attn_topk_index"),
    "residual": Quantity(
        ("sequence", "position", "residual_layer", "hidden"), "float32", "residual stream", "activation",
        "the residual stream after the decoder layer"),
    "expert_output": Quantity(
        ("sequence", "position", "expert_layer", "expert", "hidden"), "float32", "expert output", "activation",
        "what every expert outputs for the token (its GeGLU, before the gate), chosen or not"),
    "moe_output": Quantity(
        ("sequence", "position", "expert_layer", "hidden"), "float32", "MoE output", "activation",
        "the gate-weighted sum of the chosen experts' outputs (the MoE block's output, before rms_norm_3)"),
}

# The probe each quantity comes from, and the axis its per-layer values are stacked on.
_SOURCE = {
    "router_logits": ("router_logits", 2), "expert_index": ("expert_index", 2),
    "expert_gate": ("expert_gate", 2), "attn_weights": ("attn_weights", 1),
    "attn_weights_head_mean": ("attn_weights", 1), "attn_topk_index": ("attn_weights", 1),
    "attn_topk_weight": ("attn_weights", 1), "residual": ("residual", 2),
    "expert_output": ("expert_output", 2), "moe_output": ("moe_output", 2),
}

ATTENTION_FORMATS = ("full", "head_mean", "topk")


def resolve_selection(selection: Selection, size: int, what: str) -> tuple[int, ...]:
    """`"all"` or a tuple of indices -> a sorted tuple of valid indices."""
    if selection == "all":
        return tuple(range(size))
    chosen = tuple(sorted(set(int(i) for i in selection)))
    bad = [i for i in chosen if not 0 <= i < size]
    if bad or not chosen:
        raise ValueError(f"{what}: expected indices in [0, {size}), got {list(selection)}")
    return chosen


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionSpec:
    """Which attention maps to record, and how.

    Attributes:
      layers: "all" or a tuple of layer numbers.
      heads: "all" or a tuple of query-head numbers.
      format: "full" ([query, key] per head), "head_mean" (mean over the selected heads) or
        "topk" (for each query the `k` largest keys: indices and weights).
      k: keys kept per query for "topk".
    """

    layers: Selection = "all"
    heads: Selection = "all"
    format: Literal["full", "head_mean", "topk"] = "topk"
    k: int = 16

    def __post_init__(self):
        if self.format not in ATTENTION_FORMATS:
            raise ValueError(f"attention format: expected one of {ATTENTION_FORMATS}, got {self.format!r}")
        if self.k < 1:
            raise ValueError(f"attention k: expected >= 1, got {self.k}")
        for name in ("layers", "heads"):
            value = getattr(self, name)
            if value != "all":
                object.__setattr__(self, name, tuple(sorted(set(int(i) for i in value))))

    @property
    def names(self) -> tuple[str, ...]:
        return {"full": ("attn_weights",), "head_mean": ("attn_weights_head_mean",),
                "topk": ("attn_topk_index", "attn_topk_weight")}[self.format]


@dataclasses.dataclass(frozen=True, kw_only=True)
class RecordSpec:
    """What `forward` records besides logits. Frozen and hashable: it is part of the jit key.

    Attributes:
      routing: record `router_logits`, `expert_index` and `expert_gate` for every layer.
      attention: record attention maps (None: not at all).
      residual: "all" or a tuple of layers whose output residual stream to record (None: not at all).
      expert_outputs: "all" or a tuple of layers at which to record what *every* expert outputs
        for each token (`expert_output`, E x hidden per token: large) and the gate-weighted sum of
        the chosen ones (`moe_output`). None: not at all.
    """

    routing: bool = True
    attention: AttentionSpec | None = None
    residual: Selection | None = None
    expert_outputs: Selection | None = None

    def __post_init__(self):
        for name in ("residual", "expert_outputs"):
            value = getattr(self, name)
            if value is not None and value != "all":
                object.__setattr__(self, name, tuple(sorted(set(int(i) for i in value))))

    @property
    def names(self) -> tuple[str, ...]:
        """Names of the recorded quantities, in registry order."""
        names = set()
        if self.routing:
            names |= {"router_logits", "expert_index", "expert_gate"}
        if self.attention is not None:
            names |= set(self.attention.names)
        if self.residual is not None:
            names.add("residual")
        if self.expert_outputs is not None:
            names |= {"expert_output", "moe_output"}
        return tuple(n for n in QUANTITIES if n in names)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RecordSpec":
        attention = d.get("attention")
        residual = d.get("residual")
        experts = d.get("expert_outputs")
        return cls(routing=bool(d.get("routing", True)),
                   attention=None if attention is None else AttentionSpec(**{
                       k: (v if isinstance(v, (str, int)) else tuple(v)) for k, v in attention.items()}),
                   residual=residual if residual in (None, "all") else tuple(residual),
                   expert_outputs=experts if experts in (None, "all") else tuple(experts))

    def resolved(self, config) -> "RecordSpec":
        """The same spec with "all" replaced by explicit indices (validated against `config`)."""
        attention = self.attention
        if attention is not None:
            attention = dataclasses.replace(
                attention,
                layers=resolve_selection(attention.layers, config.num_layers, "attention layers"),
                heads=resolve_selection(attention.heads, config.num_q_heads, "attention heads"))
        residual = self.residual
        if residual is not None:
            residual = resolve_selection(residual, config.num_layers, "residual layers")
        experts = self.expert_outputs
        if experts is not None:
            experts = resolve_selection(experts, config.num_layers, "expert output layers")
        return dataclasses.replace(self, attention=attention, residual=residual, expert_outputs=experts)

    @classmethod
    def parse(cls, text: str) -> "RecordSpec":
        """Parses the command-line form, e.g.
        `routing,attention:layers=0-3:heads=all:format=topk:k=16,residual:layers=0,2,5-7`
        (and `expert_outputs:layers=...`).
        """
        items: list[list[str]] = []
        for token in (t.strip() for t in text.split(",")):
            if not token:
                continue
            continued = re.fullmatch(r"(\d+(?:-\d+)?)((?::.*)?)", token)
            if continued and items:
                # "heads=0,2:format=full": the number continues the previous key's list, and
                # any options after it belong to the same quantity
                items[-1][-1] += "," + continued.group(1)
                items[-1].extend(o for o in continued.group(2).split(":") if o)
            else:
                items.append(token.split(":"))
        routing, attention, residual, experts = False, None, None, None
        for name, *options in items:
            opts = {}
            for option in options:
                key, sep, value = option.partition("=")
                if not sep:
                    raise ValueError(f"--record: expected key=value in {option!r}")
                opts[key.strip()] = value.strip()
            if name == "routing":
                if opts:
                    raise ValueError(f"--record: routing takes no options, got {sorted(opts)}")
                routing = True
            elif name == "attention":
                unknown = set(opts) - {"layers", "heads", "format", "k"}
                if unknown:
                    raise ValueError(f"--record: unknown attention options {sorted(unknown)}")
                attention = AttentionSpec(
                    layers=_parse_indices(opts.get("layers", "all")), heads=_parse_indices(opts.get("heads", "all")),
                    format=opts.get("format", "topk"), k=int(opts.get("k", 16)))
            elif name == "residual":
                unknown = set(opts) - {"layers"}
                if unknown:
                    raise ValueError(f"--record: unknown residual options {sorted(unknown)}")
                residual = _parse_indices(opts.get("layers", "all"))
            elif name == "expert_outputs":
                unknown = set(opts) - {"layers"}
                if unknown:
                    raise ValueError(f"--record: unknown expert_outputs options {sorted(unknown)}")
                experts = _parse_indices(opts.get("layers", "all"))
            else:
                raise ValueError(f"--record: unknown quantity {name!r}; expected routing, attention, residual "
                                 f"or expert_outputs")
        return cls(routing=routing, attention=attention, residual=residual, expert_outputs=experts)


def _parse_indices(text: str) -> Selection:
    if text == "all":
        return "all"
    out: list[int] = []
    for part in text.split(","):
        lo, sep, hi = part.partition("-")
        try:
            out.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
        except ValueError:
            raise ValueError(f"--record: expected 'all', numbers or ranges like 0-3, got {text!r}") from None
    return tuple(out)


def probe(name: str, value) -> None:
    """Offers `value` for recording under `name` (a no-op unless a RecordSpec selects it)."""
    hk.set_state(name, value)


_LAYER = re.compile(r"decoder_layer_(\d+)")


def _layer_of(full_name: str) -> int | None:
    match = _LAYER.search(full_name)
    return None if match is None else int(match.group(1))


def record_filter(spec: RecordSpec, config):
    """A haiku state setter that keeps what `spec` selects, in the form it asks for.

    Attention probes arrive as full probabilities [B, H, T, S]; the setter selects heads and
    reduces them to the requested format inside the traced computation.
    """
    spec = spec.resolved(config)
    routing = {"router_logits", "expert_index", "expert_gate"} if spec.routing else set()

    def setter(next_setter, value, context):
        name = context.full_name.rsplit("/", 1)[-1]
        layer = _layer_of(context.full_name)
        if name in routing:
            return next_setter(value)
        if name == "residual" and spec.residual is not None and layer in spec.residual:
            return next_setter(value.astype(jnp.float32))
        if name in ("expert_output", "moe_output") and spec.expert_outputs is not None and \
                layer in spec.expert_outputs:
            return next_setter(value.astype(jnp.float32))
        attention = spec.attention
        if name == "attn_weights" and attention is not None and layer in attention.layers:
            heads = value[:, jnp.array(attention.heads)] if len(attention.heads) < value.shape[1] else value
            if attention.format == "full":
                return next_setter({"attn_weights": heads})
            if attention.format == "head_mean":
                return next_setter({"attn_weights_head_mean": heads.mean(axis=1)})
            k = min(attention.k, heads.shape[-1])
            weight, index = jax.lax.top_k(heads, k)  # [B, h, T, k]
            index = jnp.where(weight > 0, index, -1).astype(jnp.int32)  # -1: no key (fewer than k allowed)
            return next_setter({"attn_topk_index": index, "attn_topk_weight": weight})
        return hk.DO_NOT_STORE

    return setter


def collect(state: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Stacks per-layer probes from haiku state into `Record` arrays with a layer dim.

    Per-layer values are stacked, in layer order, on the axis the registry gives
    (`layer`/`residual_layer` after position; `attn_layer` after sequence).
    """
    per_name: dict[str, dict[int, Any]] = {}
    for module, values in state.items():
        layer = _layer_of(module)
        if layer is None:
            continue
        for name, value in values.items():
            leaves = value if isinstance(value, dict) else {name: value}
            for leaf_name, leaf in leaves.items():
                per_name.setdefault(leaf_name, {})[layer] = leaf
    return {name: jnp.stack([layers[i] for i in sorted(layers)], axis=_SOURCE[name][1])
            for name, layers in per_name.items()}


@jax.jit
def to_store_dtypes(record: Mapping[str, Any]) -> dict[str, Any]:
    """Casts a record to the store's dtypes on the device (float16 attention, int8 experts):
    cheaper there than on the host, and fewer bytes to move."""
    return {name: value.astype(QUANTITIES[name].dtype) for name, value in record.items()}
