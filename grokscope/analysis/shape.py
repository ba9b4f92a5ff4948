"""Per-token routing shape: router entropy, top-k gate mass, decision and flip margins.

Definitions:
  - routing entropy H_t = -Σ_e p_{t,e} ln p_{t,e}, normalized by ln E (standard);
  - top-k gate mass m_t = Σ_r g_t^(r), Grok-specific: Grok-1 does not renormalize its top-2
    gates, so m_t directly scales the MoE output (item 11; Grok-1 reference code, xai-org/grok-1
    `model.py`, as recorded in `grokscope/record.py`);
  - margins δ12 = p^(1) - p^(2) (decision) and δ23 = p^(2) - p^(3) (flip) from the sorted
    router probabilities (item 12; standard quantities, no specific paper).

Per-token results are (sequence, position, layer) with NaN at padding; `layer_mean` and the
`mean_*` functions average over valid tokens only. Everything stays lazy on dask-backed
Datasets. `attrs` hold `long_name`, `description` and the uniform-routing `baseline`.
"""

from __future__ import annotations

import math

import numpy as np
import xarray as xr

from grokscope.analysis.common import valid_tokens

__all__ = ["router_entropy", "mean_router_entropy", "topk_gate_mass", "router_margins", "layer_mean"]


def layer_mean(values: xr.DataArray, ds: xr.Dataset) -> xr.DataArray:
    """Per-layer mean of a per-token quantity over the valid (non-pad) tokens of `ds`.

    Args:
      values: (sequence, position, layer, ...) per-token values (padding may hold anything).
      ds: the Dataset they come from (for `length`).

    Returns:
      float64 (layer, ...), with the attrs of `values` (NaN if the store has no valid token).
    """
    valid = valid_tokens(ds)
    total = values.astype(np.float64).where(valid, 0.0).sum(["sequence", "position"])
    count = valid.sum(dtype=np.int64)
    mean = total / count.where(count != 0)
    mean = mean.transpose("layer", ...)
    mean.attrs = dict(values.attrs)
    mean.attrs["description"] = values.attrs.get("description", "") + "; mean over valid tokens"
    return mean


def router_entropy(ds: xr.Dataset) -> xr.DataArray:
    """Normalized router entropy per token, H_t / ln E.

    H_t = -Σ_e p_{t,e} ln p_{t,e} with p_t = softmax(router_logits_t), computed stably as
    ln Z - Σ_e p_e s_e with s = logits - max (no 0·log 0). 1 = uniform routing (the null
    baseline), 0 = one-hot. A standard statistic.

    Returns:
      float32 (sequence, position, layer), NaN at padding.
    """
    logits = ds["router_logits"].astype(np.float64)
    shifted = logits - logits.max("expert")
    exp = np.exp(shifted)
    z = exp.sum("expert")
    entropy = np.log(z) - (exp * shifted).sum("expert") / z
    E = int(ds.sizes["expert"])
    out = (entropy / math.log(E)).astype(np.float32).where(valid_tokens(ds))
    out = out.transpose("sequence", "position", "layer")
    out.attrs = {
        "long_name": "normalized router entropy",
        "description": "-sum_e p_e ln p_e / ln E of softmax(router_logits)",
        "baseline": 1.0,
        "baseline_description": "uniform router probabilities; 0 = one-hot",
    }
    return out


def mean_router_entropy(ds: xr.Dataset) -> xr.DataArray:
    """Per-layer mean of `router_entropy` over valid tokens (float64 (layer,)); baseline 1."""
    return layer_mean(router_entropy(ds), ds)


def topk_gate_mass(ds: xr.Dataset) -> xr.DataArray:
    """Top-k gate mass per token, m_t = Σ_r g_t^(r) (the k recorded gates, not renormalized).

    Grok-1 multiplies each selected expert's output by its softmax probability over all E
    experts, so m_t ∈ [k/E, 1) directly scales the MoE output. Null baseline: k/E (= 0.25
    for Grok), reached only for uniform routing. Grok-1 specific: the release multiplies expert outputs by
    the raw top-k probabilities.

    Returns:
      float32 (sequence, position, layer), NaN at padding; `layer_mean` gives the per-layer mean.
    """
    mass = ds["expert_gate"].sum("slot").where(valid_tokens(ds)).transpose("sequence", "position", "layer")
    k, E = int(ds.sizes["slot"]), int(ds.sizes["expert"]) if "expert" in ds.sizes else None
    mass.attrs = {
        "long_name": f"top-{k} gate mass",
        "description": f"sum of the {k} gates (softmax over all experts, not renormalized)",
    }
    if E is not None:
        mass.attrs["baseline"] = k / E
        mass.attrs["baseline_description"] = "uniform routing: k/E"
    return mass


def top_probs(probs: xr.DataArray, n: int) -> xr.DataArray:
    """The `n` largest values over `expert`, descending, along a new `rank` dim (0 = largest)."""
    if probs.chunks is not None:
        probs = probs.chunk({"expert": -1})

    def top(x):
        return -np.sort(-x, axis=-1)[..., :n]

    return xr.apply_ufunc(top, probs, input_core_dims=[["expert"]], output_core_dims=[["rank"]],
                          dask="parallelized", output_dtypes=[probs.dtype],
                          dask_gufunc_kwargs={"output_sizes": {"rank": n}})


def router_margins(ds: xr.Dataset) -> xr.Dataset:
    """Decision and flip margins per token, from the sorted router probabilities.

    margin_12 = p^(1) - p^(2) (decision margin δ12) and margin_23 = p^(2) - p^(3) (flip margin
    δ23: small values predict a change of the routed top-2 set under perturbation,
    quantization or another implementation). p = softmax(router_logits). Null baseline: 0
    (uniform routing). Standard quantities.

    Returns:
      Dataset with float32 `margin_12` and `margin_23` (sequence, position, layer), NaN at
      padding; apply `layer_mean` for per-layer means.
    """
    from grokscope.analysis.common import router_probs

    if ds.sizes["expert"] < 3:
        raise ValueError("margins need at least 3 experts")
    top = top_probs(router_probs(ds), 3)
    valid = valid_tokens(ds)
    out = {}
    for name, (a, b), what in (("margin_12", (0, 1), "decision margin p1 - p2"),
                               ("margin_23", (1, 2), "flip margin p2 - p3")):
        margin = (top.isel(rank=a) - top.isel(rank=b)).where(valid).transpose("sequence", "position", "layer")
        margin.attrs = {"long_name": what,
                        "description": f"{what} of the sorted router probabilities softmax(router_logits)",
                        "baseline": 0.0, "baseline_description": "uniform routing"}
        out[name] = margin
    return xr.Dataset(out)
