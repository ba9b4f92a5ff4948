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
  rank            place in a list sorted largest first, 0 = the largest: here the keys of an
                  attention row by weight (the analysis uses the same word for the same idea:
                  paths and tokens by count, router probabilities by size); the router's
                  own top-k order has its own name, `slot`
  residual_layer  the recorded subset of layers for the residual stream (coordinate: true numbers)
  expert_layer    the recorded subset of layers for expert outputs (coordinate: true numbers)
  hidden          the residual stream's width (emb_size)

Quantities (see `QUANTITIES` for dims and dtypes):
  router_logits            fp32 router logits `rms_norm_2(h) @ router.w`, before the softmax.
  expert_index             top-k experts of softmax(router_logits), largest probability first
                           (ties go to the lower index).
  expert_gate              top-k probabilities of softmax(router_logits) over *all* experts,
                           not renormalized (this is what multiplies each expert's output).
                           Pads are routed too.
  attn_weights             attention probabilities per selected head ("full").
  attn_weights_head_mean   their mean over the selected heads ("head_mean").
  attn_topk_index/weight   for each query, the k keys with the largest weights and those
                           weights ("topk"; sparse, scales to long contexts); index -1 where a
                           query has fewer than k keys it may attend to.
  residual                 the residual stream after the decoder layer.
  expert_output            what every expert would output for the token (its GeGLU, before the
                           gate), chosen or not.
  moe_input                rms_norm_2(h): what the router and every expert read.
  moe_output               the gate-weighted sum of the chosen experts' outputs.
  mlp_output               the dense MLP's output beside the experts (models that have one,
                           as Grok-2; the FFN output is then (mlp_output + moe_output) / sqrt(2)).
  (`RecordSpec.expert_outputs` names the layers of this family of four.)

Modules offer quantities with `probe(name, value)`; a `RecordSpec` decides, at trace time,
which are kept and in which form (`record_filter`), so an unselected quantity is never
returned and anything computed only for it is never lowered.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Literal, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["RecordSpec", "AttentionSpec", "Quantity", "QUANTITIES", "probe", "record_filter", "collect",
           "resolve_selection", "store_dtype", "to_store_dtypes", "dim_sizes", "dim_coords", "LAYER_DIMS"]

Selection = Literal["all"] | tuple[int, ...]


class Quantity(NamedTuple):
    """Registry entry for one recorded quantity: the one definition every other place reads.

    Attributes:
      dims: dims as stored, `sequence` first; exactly one is a layer dim (`layer`,
        `attn_layer`, `residual_layer` or `expert_layer`), on which per-layer values stack.
      dtype: the dtype in the store.
      long_name, units, description: the store's attributes (and the views' labels).
      selected_by: the `RecordSpec` field that selects it: "routing" (every layer),
        "attention", "residual" or "expert_outputs" (the layers that field names).
      fill: the store's fill value (also written at padding positions).
      requires: a `ModelConfig` property that must be true for the model to have the
        quantity (e.g. "has_dense_mlp"); None: every model has it.
    """

    dims: tuple[str, ...]
    dtype: str
    long_name: str
    units: str
    description: str
    selected_by: str
    fill: int | float = 0
    requires: str | None = None

    @property
    def layer_dim(self) -> str:
        return next(d for d in self.dims if d in LAYER_DIMS)

    @property
    def layer_axis(self) -> int:
        """The axis of the layer dim (where `collect` stacks the per-layer probes)."""
        return self.dims.index(self.layer_dim)

    @property
    def position_axis(self) -> int:
        """The axis of `position` (or `query`, for attention maps)."""
        return next(i for i, d in enumerate(self.dims) if d in ("position", "query"))


LAYER_DIMS = ("layer", "attn_layer", "residual_layer", "expert_layer")

QUANTITIES: dict[str, Quantity] = {
    "router_logits": Quantity(
        ("sequence", "position", "layer", "expert"), "float32", "router logits", "logit",
        "fp32 router logits rms_norm_2(h) @ router.w, before the softmax over all experts", "routing"),
    "expert_index": Quantity(
        ("sequence", "position", "layer", "slot"), "int8", "selected expert", "expert",
        "top-k experts of softmax(router_logits), largest probability first", "routing", -1),
    "expert_gate": Quantity(
        ("sequence", "position", "layer", "slot"), "float32", "expert gate", "probability",
        "top-k probabilities of softmax(router_logits) over all experts, not renormalized", "routing"),
    "attn_weights": Quantity(
        ("sequence", "attn_layer", "head", "query", "key"), "float16", "attention weight", "probability",
        "softmax attention probabilities of each selected head", "attention"),
    "attn_weights_head_mean": Quantity(
        ("sequence", "attn_layer", "query", "key"), "float16", "mean attention weight", "probability",
        "attention probabilities averaged over the selected heads", "attention"),
    "attn_topk_index": Quantity(
        ("sequence", "attn_layer", "head", "query", "rank"), "int32", "attended key", "position",
        "for each query, the keys with the largest attention weights, largest first", "attention", -1),
    "attn_topk_weight": Quantity(
        ("sequence", "attn_layer", "head", "query", "rank"), "float16", "attention weight", "probability",
        "the attention weights of attn_topk_index", "attention"),
    "residual": Quantity(
        ("sequence", "position", "residual_layer", "hidden"), "float32", "residual stream", "activation",
        "the residual stream after the decoder layer", "residual"),
    "expert_output": Quantity(
        ("sequence", "position", "expert_layer", "expert", "hidden"), "float32", "expert output", "activation",
        "what every expert outputs for the token (its GeGLU, before the gate), chosen or not", "expert_outputs"),
    "moe_input": Quantity(
        ("sequence", "position", "expert_layer", "hidden"), "float32", "MoE input", "activation",
        "the normalised residual the router and every expert read, rms_norm_2(h)", "expert_outputs"),
    "moe_output": Quantity(
        ("sequence", "position", "expert_layer", "hidden"), "float32", "MoE output", "activation",
        "the gate-weighted sum of the chosen experts' outputs (the MoE block's output, before rms_norm_3)",
        "expert_outputs"),
    "mlp_output": Quantity(
        ("sequence", "position", "expert_layer", "hidden"), "float32", "dense MLP output", "activation",
        "the dense MLP's output beside the experts, on the same input (the FFN output is "
        "(mlp_output + moe_output) / sqrt(2), before rms_norm_3)", "expert_outputs", requires="has_dense_mlp"),
}

_ATTENTION_PROBE = "attn_weights"  # every attention quantity is a form of this one probe


def dim_sizes(config, spec: "RecordSpec", context: int) -> dict[str, int]:
    """The size of every dim of the recorded quantities for `spec` (resolved against
    `config`) and sequences of `context` positions."""
    spec = spec.resolved(config)
    attention = spec.attention
    return {"position": context, "query": context, "key": context, "layer": config.num_layers,
            "expert": config.num_experts, "slot": config.num_selected_experts, "hidden": config.emb_size,
            "attn_layer": len(attention.layers) if attention else 0,
            "head": len(attention.heads) if attention else 0,
            "rank": min(attention.k, context) if attention else 0,
            "residual_layer": len(spec.residual) if spec.residual is not None else 0,
            "expert_layer": len(spec.expert_outputs) if spec.expert_outputs is not None else 0}


def dim_coords(config, spec: "RecordSpec") -> dict[str, tuple[int, ...]]:
    """The true numbers along each indexed dim (layers, experts, slots and the recorded
    subsets `attn_layer`, `head`, `residual_layer`, `expert_layer`) for `spec` resolved."""
    spec = spec.resolved(config)
    coords = {"layer": tuple(range(config.num_layers)), "expert": tuple(range(config.num_experts)),
              "slot": tuple(range(config.num_selected_experts))}
    if spec.attention is not None:
        coords["attn_layer"] = spec.attention.layers
        coords["head"] = spec.attention.heads
    if spec.residual is not None:
        coords["residual_layer"] = spec.residual
    if spec.expert_outputs is not None:
        coords["expert_layer"] = spec.expert_outputs
    return coords


def _selected_layers(quantity: Quantity, spec: "RecordSpec", num_layers: int) -> tuple[int, ...] | None:
    """The layers at which `spec` (resolved) records `quantity`; None: not recorded."""
    field = quantity.selected_by
    if field == "routing":
        return tuple(range(num_layers)) if spec.routing else None
    if field == "attention":
        return spec.attention.layers if spec.attention is not None else None
    return getattr(spec, field)


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
        for each token (`expert_output`, E x hidden per token: large), the gate-weighted sum of
        the chosen ones (`moe_output`), their input (`moe_input`) and, in models with one, the
        dense MLP's output (`mlp_output`). None: not at all.
      model_features: set by `resolved(config)`: the `Quantity.requires` features the model
        has, which decide whether such quantities are among `names` (not part of `to_dict`:
        the store holds the model's config).
    """

    routing: bool = True
    attention: AttentionSpec | None = None
    residual: Selection | None = None
    expert_outputs: Selection | None = None
    model_features: tuple[str, ...] = dataclasses.field(default=(), repr=False)

    def __post_init__(self):
        for name in ("residual", "expert_outputs"):
            value = getattr(self, name)
            if value is not None and value != "all":
                object.__setattr__(self, name, tuple(sorted(set(int(i) for i in value))))

    @property
    def names(self) -> tuple[str, ...]:
        """Names of the recorded quantities, in registry order."""
        forms = set(self.attention.names) if self.attention is not None else set()
        return tuple(name for name, q in QUANTITIES.items()
                     if (q.selected_by == "routing" and self.routing)
                     or (q.selected_by == "attention" and name in forms)
                     or (q.selected_by not in ("routing", "attention") and getattr(self, q.selected_by) is not None)
                     if q.requires is None or q.requires in self.model_features)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        del d["model_features"]
        return d

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
        features = tuple(sorted({q.requires for q in QUANTITIES.values()
                                 if q.requires is not None and getattr(config, q.requires)}))
        return dataclasses.replace(self, attention=attention, residual=residual, expert_outputs=experts,
                                   model_features=features)

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
        given: set[str] = set()
        for name, *options in items:
            if name in given:
                raise ValueError(f"--record: {name} given twice; give each quantity once")
            given.add(name)
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
                try:
                    attention = AttentionSpec(
                        layers=_parse_indices(opts.get("layers", "all"), "attention layers"),
                        heads=_parse_indices(opts.get("heads", "all"), "attention heads"),
                        format=opts.get("format", "topk"), k=_parse_int(opts.get("k", "16"), "attention k"))
                except ValueError as e:
                    message = str(e)
                    raise ValueError(message if message.startswith("--record") else f"--record: {message}") from None
            elif name == "residual":
                unknown = set(opts) - {"layers"}
                if unknown:
                    raise ValueError(f"--record: unknown residual options {sorted(unknown)}")
                residual = _parse_indices(opts.get("layers", "all"), "residual layers")
            elif name == "expert_outputs":
                unknown = set(opts) - {"layers"}
                if unknown:
                    raise ValueError(f"--record: unknown expert_outputs options {sorted(unknown)}")
                experts = _parse_indices(opts.get("layers", "all"), "expert_outputs layers")
            else:
                raise ValueError(f"--record: unknown quantity {name!r}; expected routing, attention, residual "
                                 f"or expert_outputs")
        return cls(routing=routing, attention=attention, residual=residual, expert_outputs=experts)


def _parse_int(text: str, what: str) -> int:
    """A decimal integer option of --record, e.g. `k=16`; the error names the option."""
    if not re.fullmatch(r"[+-]?[0-9]+", text):
        raise ValueError(f"--record: {what}: expected an integer, got {text!r}")
    return int(text)


def _parse_indices(text: str, what: str = "layers") -> Selection:
    """`all`, or numbers and LOW-HIGH ranges separated by commas; the error names the option."""
    if text == "all":
        return "all"
    out: list[int] = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*([0-9]+)\s*(?:-\s*([0-9]+)\s*)?", part)
        if match is None:
            raise ValueError(f"--record: {what}: expected 'all', numbers or ranges like 0-3, got {text!r}")
        lo, hi = int(match.group(1)), int(match.group(2) if match.group(2) is not None else match.group(1))
        if hi < lo:
            raise ValueError(f"--record: {what}: the range {part.strip()!r} is empty (expected LOW-HIGH, LOW <= HIGH)")
        if hi - lo >= 1_000_000:
            raise ValueError(f"--record: {what}: the range {part.strip()!r} is larger than any model's layers or heads")
        out.extend(range(lo, hi + 1))
    return tuple(out)


def probe(name: str, value) -> None:
    """Offers `value` for recording under `name` (a no-op unless a RecordSpec selects it)."""
    import haiku as hk  # here, not at the top: the registry and RecordSpec need no model code

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
    import haiku as hk

    spec = spec.resolved(config)
    layers = {name: frozenset(_selected_layers(QUANTITIES[name], spec, config.num_layers))
              for name in spec.names if QUANTITIES[name].selected_by != "attention"}

    def setter(next_setter, value, context):
        name = context.full_name.rsplit("/", 1)[-1]
        layer = _layer_of(context.full_name)
        if layer in layers.get(name, ()):
            return next_setter(value.astype(jnp.float32) if jnp.issubdtype(value.dtype, jnp.floating) else value)
        attention = spec.attention
        if name == _ATTENTION_PROBE and attention is not None and layer in attention.layers:
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

    Per-layer values are stacked, in layer order, on the axis of the quantity's layer dim
    (`Quantity.layer_axis`).
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
    return {name: jnp.stack([layers[i] for i in sorted(layers)], axis=QUANTITIES[name].layer_axis)
            for name, layers in per_name.items()}


def store_dtype(name: str, config) -> np.dtype:
    """The store dtype of quantity `name` for this model: the registry's, except that an
    expert index is widened to int16 when the model has more experts than int8 holds."""
    q = QUANTITIES[name]
    dtype = np.dtype(q.dtype)
    if q.units == "expert" and config.num_experts > np.iinfo(dtype).max:
        return np.dtype(np.int16)
    return dtype


@functools.partial(jax.jit, static_argnames="config")
def to_store_dtypes(record: Mapping[str, Any], config) -> dict[str, Any]:
    """Casts a record to the store's dtypes on the device (float16 attention, int8 experts):
    cheaper there than on the host, and fewer bytes to move."""
    return {name: value.astype(store_dtype(name, config)) for name, value in record.items()}
