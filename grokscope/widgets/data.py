"""What the views show, taken from a store's Dataset: one sequence's routing and attention.

Pure functions of a Dataset (a dump from `open_store` or `Session.run`'s in-memory one): the
widgets and the static report draw these, and tests check them against the stored arrays.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import xarray as xr

from grokscope.analysis.common import router_probs
from grokscope.tokenizer import display_piece

__all__ = ["SequenceRouting", "sequence_routing", "sequence_labels", "group_columns", "attention_matrix", "attention_options",
           "next_token_distributions", "InterventionEffect", "intervention_effect", "rerouted"]

@dataclasses.dataclass(frozen=True)
class SequenceRouting:
    """One sequence's routing, layer-major, real tokens only (T = the sequence's length).

    Attributes:
      pieces: the model's pieces with whitespace made visible, [T].
      token_ids: [T].
      layers: layer labels, [L].
      expert_index: chosen experts, largest gate first, int [L, T, K].
      expert_gate: their gates (probabilities, not renormalized), [L, T, K].
      probs: softmax of the router logits, [L, T, E] (None when router logits were not recorded).
      num_experts: E.
    """

    pieces: list[str]
    token_ids: np.ndarray
    layers: np.ndarray
    expert_index: np.ndarray
    expert_gate: np.ndarray
    probs: np.ndarray | None
    num_experts: int

    @property
    def top1(self) -> np.ndarray:
        """First-choice expert per (layer, token), [L, T]."""
        return self.expert_index[..., 0]


def _pieces(ds: xr.Dataset, ids: np.ndarray) -> list[str]:
    if "vocab_piece" in ds:
        vocab = np.asarray(ds["vocab_piece"].values)
        return [display_piece(str(vocab[i])) for i in ids]
    return [str(int(i)) for i in ids]


def group_columns(ds: xr.Dataset) -> list[str]:
    """Per-sequence columns with 2..50 distinct values (e.g. `label`), usable for grouping."""
    out = []
    for name, var in ds.data_vars.items():
        if var.dims != ("sequence",) or name in ("length", "done", "prompt"):
            continue
        values = np.asarray(var.values)
        if 2 <= len({str(v) for v in values}) <= 50:
            out.append(name)
    return out


def sequence_labels(ds: xr.Dataset, width: int = 60) -> list[str]:
    """A short label per sequence for selectors: its number, label column if any, and text."""
    n = ds.sizes["sequence"]
    prompts = ds["prompt"].values if "prompt" in ds else [""] * n
    labels = ds["label"].values if "label" in ds else None
    out = []
    for i in range(n):
        text = " ".join(str(prompts[i]).split())
        text = text if len(text) <= width else text[:width - 1] + "…"
        tag = f"[{labels[i]}] " if labels is not None else ""
        out.append(f"{i}: {tag}{text}")
    return out


def sequence_routing(ds: xr.Dataset, sequence: int) -> SequenceRouting:
    """The routing of one sequence (by position in `ds`), from `expert_index`, `expert_gate`
    and `router_logits`."""
    if "expert_index" not in ds:
        raise ValueError("this Dataset has no routing (expert_index): record it with RecordSpec(routing=True)")
    one = ds.isel(sequence=sequence)
    length = int(one["length"].values)
    ids = np.asarray(one["tokens"].values[:length])
    index = np.asarray(one["expert_index"].values[:length]).astype(np.int64)  # [T, L, K]
    gate = np.asarray(one["expert_gate"].values[:length], np.float32)
    probs = None
    if "router_logits" in ds:
        probs = np.asarray(router_probs(one.isel(position=slice(0, length))).values)  # [T, L, E]
        probs = probs.transpose(1, 0, 2)
    return SequenceRouting(pieces=_pieces(ds, ids), token_ids=ids, layers=np.asarray(ds["layer"].values),
                           expert_index=index.transpose(1, 0, 2), expert_gate=gate.transpose(1, 0, 2),
                           probs=probs, num_experts=int(ds.sizes["expert"]))


def attention_options(ds: xr.Dataset) -> dict:
    """What attention a Dataset holds: {"format", "layers", "heads"} (heads empty for
    head_mean); raises if it holds none."""
    if "attn_weights" in ds:
        fmt = "full"
    elif "attn_weights_head_mean" in ds:
        fmt = "head_mean"
    elif "attn_topk_index" in ds:
        fmt = "topk"
    else:
        raise ValueError("this Dataset has no attention record: record it with "
                         "RecordSpec(attention=AttentionSpec(...)) (any of the formats full, head_mean, topk)")
    heads = [] if fmt == "head_mean" else [int(h) for h in ds["head"].values]
    return {"format": fmt, "layers": [int(x) for x in ds["attn_layer"].values], "heads": heads}


def attention_matrix(ds: xr.Dataset, sequence: int, layer: int, head: int | None) -> np.ndarray:
    """Attention probabilities [query, key] of one sequence (real tokens only) at one recorded
    layer, for one head or (head=None) the mean of the recorded heads.

    From `full` records directly; from `head_mean` (head must be None); from `topk` the
    matrix holds the recorded k weights per query and zeros elsewhere (not renormalized: the
    missing mass is what the top-k leaves out).
    """
    opts = attention_options(ds)
    if layer not in opts["layers"]:
        raise ValueError(f"layer {layer} was not recorded; recorded attention layers: {opts['layers']}")
    if head is not None and head not in opts["heads"]:
        if opts["format"] == "head_mean":
            raise ValueError("this store holds only the mean over heads (format head_mean): use head=None")
        raise ValueError(f"head {head} was not recorded; recorded heads: {opts['heads']}")
    one = ds.isel(sequence=sequence).sel(attn_layer=layer)
    T = int(one["length"].values)
    if opts["format"] == "head_mean":
        return np.asarray(one["attn_weights_head_mean"].values[:T, :T], np.float32)
    if opts["format"] == "full":
        weights = one["attn_weights"]
        weights = weights.sel(head=head) if head is not None else weights.astype(np.float32).mean("head")
        return np.asarray(weights.values[:T, :T], np.float32)
    index = one["attn_topk_index"]
    weight = one["attn_topk_weight"]
    heads = [head] if head is not None else opts["heads"]
    out = np.zeros((T, T), np.float32)
    for h in heads:
        idx = np.asarray(index.sel(head=h).values[:T])
        w = np.asarray(weight.sel(head=h).values[:T], np.float32)
        rows = np.broadcast_to(np.arange(T)[:, None], idx.shape)
        keep = (idx >= 0) & (idx < T)
        np.add.at(out, (rows[keep], idx[keep]), w[keep])
    return out / len(heads)


def next_token_distributions(session, token_ids, position: int, interventions, n: int = 10):
    """The next-token distribution after `position`, as the model has it and under
    `interventions` (computed by the Session, on its mesh and compute dtype): (pieces,
    p_original, p_intervened) over the union of both top-n tokens, ordered by the original
    probability."""
    ids, p, q = session.next_token_distributions(token_ids, position, interventions, n)
    pieces = [display_piece(x) for x in session.tokenizer.pieces(ids)]
    return pieces, p, q


def rerouted(original: SequenceRouting, intervened: SequenceRouting) -> np.ndarray:
    """bool [layer, token]: where the intervened model sends a token to other experts than the
    original does (the set of its k chosen experts differs; their order is not compared)."""
    a = np.sort(original.expert_index, axis=-1)
    b = np.sort(intervened.expert_index, axis=-1)
    if a.shape != b.shape:
        raise ValueError(f"the two routings differ in shape: {a.shape} and {b.shape}")
    return (a != b).any(-1)


@dataclasses.dataclass(frozen=True)
class InterventionEffect:
    """What an intervention does to one sequence, seen from one position.

    Attributes:
      position: the position whose next token is predicted.
      pieces: the tokens shown (the union of both top-n, by original probability), [N].
      original: their probabilities as the model has them, [N].
      intervened: under the intervention, [N] (None without one).
      kl: KL(original‖intervened) of the whole next-token distribution, nats (None without one).
      delta_loss: the change of the loss of the actual next token, intervened minus original,
        nats (None without an intervention or at the last token).
      rerouted: `rerouted(original routing, intervened routing)`, bool [layer, token] (None
        without an intervention).
      routing: the intervened model's routing (None without an intervention).
    """

    position: int
    pieces: list[str]
    original: np.ndarray
    intervened: np.ndarray | None
    kl: float | None
    delta_loss: float | None
    rerouted: np.ndarray | None
    routing: SequenceRouting | None


def intervention_effect(session, token_ids, position: int, interventions=(), n: int = 10,
                        original: SequenceRouting | None = None) -> InterventionEffect:
    """`InterventionEffect` of `interventions` on `token_ids` at `position`, computed by the
    Session (its mesh and compute dtype; whole-layer bans share one compiled program, and
    recent results are kept). `original`: the routing of the unintervened run, if at hand."""
    ids = [int(t) for t in token_ids]
    interventions = tuple(interventions)
    base, logp = session._run_one(ids, (), position)
    p = np.exp(logp)
    if not interventions:
        top = [int(i) for i in np.argsort(-p)[:n]]
        return InterventionEffect(position, _vocab_pieces(session, top), p[top], None, None, None, None, None)
    changed, logq = session._run_one(ids, interventions, position)
    q = np.exp(logq)
    top = list(dict.fromkeys([int(i) for i in np.argsort(-p)[:n]] + [int(i) for i in np.argsort(-q)[:n]]))
    top.sort(key=lambda i: -p[i])
    with np.errstate(invalid="ignore", divide="ignore"):
        kl = float(max(0.0, np.sum(np.where(p > 0, p * (logp - logq), 0.0))))
    delta = float(logp[ids[position + 1]] - logq[ids[position + 1]]) if position + 1 < len(ids) else None
    routing = sequence_routing(changed, 0)
    return InterventionEffect(position, _vocab_pieces(session, top), p[top], q[top], kl, delta,
                              rerouted(original or sequence_routing(base, 0), routing), routing)


def _vocab_pieces(session, ids: list[int]) -> list[str]:
    return [display_piece(x) for x in session.tokenizer.pieces(ids)]
