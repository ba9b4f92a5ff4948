"""A per-layer summary of a store's routing, each number beside its null baseline
(what `grokscope analyze` prints and writes)."""

from __future__ import annotations

import numpy as np
import xarray as xr

from grokscope.analysis.load import hard_load, load_cv, load_cv_sampling_baseline
from grokscope.analysis.shape import mean_router_entropy, layer_mean, topk_gate_mass
from grokscope.analysis.specialization import expert_enrichment
from grokscope.analysis.temporal import repetition_test

__all__ = ["summarize", "format_summary", "require_routing", "SUMMARY_LEGEND"]


_ROUTING = ("expert_index", "expert_gate", "router_logits")


def require_routing(ds: xr.Dataset) -> None:
    """Raises ValueError, saying what is missing, unless `ds` holds routing of at least one sequence."""
    if "expert_index" not in ds:
        raise ValueError("no routing recorded (expert_index missing); dump with --record routing to analyze it")
    missing = [name for name in _ROUTING if name not in ds]
    if missing:
        raise ValueError(f"incomplete routing ({', '.join(missing)} missing); dump with --record routing to analyze it")
    if ds.sizes.get("sequence", 0) == 0:
        raise ValueError(f"0 finished sequences (store status {ds.attrs.get('status', '?')}); nothing to analyze")


def summarize(ds: xr.Dataset, by: str | None = None, n_permutations: int = 200, seed: int = 0) -> xr.Dataset:
    """Per layer: load balance, router entropy, gate mass, repetition against its baselines and,
    with `by` (a per-sequence column such as `label`), each group's most enriched expert.

    Returns a computed Dataset along `layer` (and `group` for the specialization columns).
    Raises ValueError for a Dataset without routing or without sequences.
    """
    require_routing(ds)
    load = hard_load(ds)
    repetition = repetition_test(ds, choice="first", n_permutations=n_permutations, seed=seed)
    out = xr.Dataset({
        "load_cv": load_cv(ds), "load_cv_sampling_baseline": load_cv_sampling_baseline(ds),
        "load_min": load.min("expert"), "load_max": load.max("expert"),
        "router_entropy": mean_router_entropy(ds), "gate_mass": layer_mean(topk_gate_mass(ds), ds),
        "repetition": repetition["repetition"], "repetition_random": repetition["random_baseline"],
        "repetition_load_aware": repetition["load_aware_baseline"],
        "repetition_shuffle": repetition["shuffle_mean"], "repetition_p_value": repetition["p_value"],
    }).compute()
    out.attrs = {"num_sequences": int(ds.sizes["sequence"]), "num_tokens": int(ds["length"].sum()),
                 "uniform_load": 1 / ds.sizes["expert"], "n_permutations": n_permutations}
    if by is not None:
        if by not in ds:
            raise ValueError(f"--by {by!r}: no such per-sequence variable; have {sorted(ds.data_vars)}")
        enrichment = expert_enrichment(ds, by=by, n_permutations=n_permutations, seed=seed)
        best = enrichment["enrichment"].fillna(-np.inf).argmax("expert")
        out["top_expert"] = best.astype(np.int32)
        out["top_expert_enrichment"] = enrichment["enrichment"].isel(expert=best)
        out["top_expert_share"] = enrichment["share"].isel(expert=best)
        out["top_expert_p_value"] = enrichment["p_value"].isel(expert=best)
        out = out.drop_vars("expert", errors="ignore")
        out.attrs["by"] = by
    return out


#: What each column of `format_summary`'s table holds: (header, meaning). N = valid tokens,
#: E = experts, k = experts per token.
SUMMARY_LEGEND = (
    ("layer", "decoder layer"),
    ("load CV", "coefficient of variation (std / mean over experts) of the load, the share of all top-k "
                "assignments each expert takes; 0 = uniform"),
    ("(null)", "the load CV that sampling noise alone gives: sqrt((E-k)/(kN)) for N tokens routed uniformly "
               "at random"),
    ("min, max", "the smallest and largest expert load (uniform: 1/E)"),
    ("entropy", "mean over tokens of the router entropy H / ln E (1 = uniform routing, 0 = one expert)"),
    ("gates", "mean over tokens of the sum of the k gates (softmax over all E experts, not renormalized; "
              "uniform routing: k/E)"),
    ("repeat", "share of adjacent token pairs with the same first-choice expert"),
    ("random", "the same for random routing: 1/E"),
    ("load-aw", "load-aware baseline: sum over experts of the first-choice load squared (two independent "
                "draws from the layer's own load)"),
    ("shuffle", "mean repetition with the tokens shuffled within each sequence"),
    ("p", "permutation p-value of repeat against the shuffles (two-sided)"),
)


def format_summary(summary: xr.Dataset) -> str:
    """A readable table of `summarize`'s result."""
    a = summary.attrs
    lines = [f"{a['num_sequences']} sequences, {a['num_tokens']} tokens; uniform load {a['uniform_load']:.3f}; "
             f"p-values from {a['n_permutations']} shuffles",
             f"{'layer':>5} {'load CV':>8} {'(null)':>7} {'min':>6} {'max':>6} {'entropy':>8} {'gates':>6} "
             f"{'repeat':>7} {'random':>7} {'load-aw':>7} {'shuffle':>7} {'p':>6}"]
    for i, layer in enumerate(summary["layer"].values):
        s = summary.isel(layer=i)
        lines.append(f"{int(layer):>5} {float(s.load_cv):>8.3f} {float(s.load_cv_sampling_baseline):>7.3f} "
                     f"{float(s.load_min):>6.3f} {float(s.load_max):>6.3f} {float(s.router_entropy):>8.3f} "
                     f"{float(s.gate_mass):>6.3f} {float(s.repetition):>7.3f} {float(s.repetition_random):>7.3f} "
                     f"{float(s.repetition_load_aware):>7.3f} {float(s.repetition_shuffle):>7.3f} "
                     f"{float(s.repetition_p_value):>6.3f}")
    if "top_expert" in summary:
        lines.append(f"most enriched expert per {a['by']} (share of the group's top-k assignments, "
                     f"enrichment = share / overall share, permutation p-value):")
        for i, layer in enumerate(summary["layer"].values):
            parts = []
            for g, group in enumerate(summary["group"].values):
                s = summary.isel(layer=i, group=g)
                parts.append(f"{group}: expert {int(s.top_expert)} {float(s.top_expert_share):.1%} "
                             f"x{float(s.top_expert_enrichment):.2f} p={float(s.top_expert_p_value):.3f}")
            lines.append(f"  layer {int(layer)}: " + "; ".join(parts))
    return "\n".join(lines)
