"""Routing agreement between two runs of the same prompts (e.g. int8 vs bf16, JAX vs another engine,
clean vs perturbed).

Definitions (per layer):
top-1 agreement, exact top-k set match and flip rate = 1 - set match, binned by the flip margin
delta23 = p^(2) - p^(3) of item 12). Top-1 agreement is the top-1 variant of OLMoE's router
saturation (arXiv 2409.02060 §5, item 15) reused as stability between variants.

Padding (positions >= `length`) is excluded; all per-token work is xarray (lazy on dask).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import xarray as xr

from grokscope.analysis.common import router_probs, valid_tokens
from grokscope.analysis.shape import top_probs

__all__ = ["flip_margin", "routing_agreement", "DEFAULT_MARGIN_BINS"]

DEFAULT_MARGIN_BINS = (0.0, 1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 1.0)


def flip_margin(ds: xr.Dataset) -> xr.DataArray:
    """(sequence, position, layer) the flip margin p^(k) - p^(k+1) of softmax(router_logits).

    For Grok-1 (k = 2) this is delta23 = p^(2) - p^(3), the gap between the last chosen and
    the first unchosen expert: `router_margins(ds)["margin_23"]`. NaN at padding.
    """
    k = ds.sizes["slot"]
    E = ds.sizes["expert"]
    if E <= k:
        raise ValueError(f"the flip margin needs more experts ({E}) than slots ({k})")
    ranked = top_probs(router_probs(ds), k + 1)  # the same sorted probabilities as router_margins
    margin = ranked.isel(rank=k - 1) - ranked.isel(rank=k)
    return margin.where(valid_tokens(ds)).transpose("sequence", "position", "layer")


def _same_prompts(a: xr.Dataset, b: xr.Dataset) -> tuple[xr.Dataset, xr.Dataset]:
    """Check that a and b hold the same prompts; both cut to their common number of positions.

    Tokens are compared at real positions only (padding may differ between engines), so the
    two Datasets may be padded to different widths.
    """
    for name in ("tokens", "length"):
        if name not in a or name not in b:
            raise ValueError(f"both Datasets need {name!r} to be compared")
    la, lb = np.asarray(a["length"].values), np.asarray(b["length"].values)
    if la.shape != lb.shape or not np.array_equal(la, lb):
        raise ValueError(f"the Datasets are not the same prompts: 'length' differs (shapes {la.shape} vs {lb.shape})")
    width = min(a.sizes["position"], b.sizes["position"])
    longest = int(la.max(initial=0))
    if longest > width:
        raise ValueError(f"the Datasets are not the same prompts: 'tokens' has {width} positions in one Dataset, "
                         f"fewer than the longest sequence ({longest})")
    a, b = a.isel(position=slice(0, width)), b.isel(position=slice(0, width))
    valid = np.asarray(valid_tokens(a).values)
    ta = np.asarray(a["tokens"].transpose("sequence", "position").values)
    tb = np.asarray(b["tokens"].transpose("sequence", "position").values)
    if not np.array_equal(ta[valid], tb[valid]):
        raise ValueError("the Datasets are not the same prompts: 'tokens' differs at real positions")
    for dim in ("layer", "slot", "expert"):
        if a.sizes.get(dim) != b.sizes.get(dim):
            raise ValueError(f"the Datasets differ in size of {dim!r}: {a.sizes.get(dim)} vs {b.sizes.get(dim)}")
    if not np.array_equal(a["layer"].values, b["layer"].values):
        raise ValueError("the Datasets record different layers")
    return a, b


def routing_agreement(ds_a: xr.Dataset, ds_b: xr.Dataset,
                      margin_bins: Sequence[float] | None = DEFAULT_MARGIN_BINS) -> xr.Dataset:
    """Per-layer routing agreement of two Datasets of the same prompts, also binned by flip margin.

    Top-1 agreement = mean 1[e^(1)_A = e^(1)_B];
    set match = mean 1[S_A = S_B] (exact top-k set, order ignored); flip rate = 1 - set match;
    all three binned by the flip margin delta23 = p^(2) - p^(3) (item 12) of `ds_a`'s router
    probabilities, to tell numerical noise (small margins) from real divergence. Means are over
    real tokens (positions < `length`).

    Args:
      ds_a: the reference run (its router logits define the margin).
      ds_b: the other run; `length`, and `tokens` at real positions, must equal ds_a's (the
        padding and the padded width may differ).
      margin_bins: increasing bin edges of the margin; bins are [lo, hi) except the last, which
        is [lo, hi]. Margins outside every bin are left out of the binned values. None: no
        binned values (and ds_a needs no router_logits).

    Returns:
      Dataset with `top1_agreement`, `set_match`, `flip_rate` (layer,), `tokens` (scalar), and,
      with bins, `tokens_by_margin`, `top1_agreement_by_margin`, `set_match_by_margin`,
      `flip_rate_by_margin` (layer, margin_bin), NaN for empty bins; coordinates `margin_lo`
      and `margin_hi` on `margin_bin`.

    Raises:
      ValueError: the Datasets' `length` or real `tokens` differ, or their layer/slot/expert dims do.
    """
    ds_a, ds_b = _same_prompts(ds_a, ds_b)
    valid = valid_tokens(ds_a)
    ia = ds_a["expert_index"].astype(np.int64)
    ib = ds_b["expert_index"].astype(np.int64).assign_coords(ia.coords)
    top1 = (ia.isel(slot=0) == ib.isel(slot=0)).drop_vars("slot", errors="ignore")
    expert = xr.DataArray(np.arange(ds_a.sizes["expert"]), dims="expert")
    set_a = (ia == expert).any("slot")
    set_b = (ib == expert).any("slot")
    same_set = (set_a == set_b).all("expert")
    n = valid.sum()
    out = xr.Dataset({
        "top1_agreement": top1.where(valid, False).sum(("sequence", "position")) / n,
        "set_match": same_set.where(valid, False).sum(("sequence", "position")) / n,
        "tokens": n})
    out["flip_rate"] = 1 - out["set_match"]
    if margin_bins is not None:
        edges = np.asarray(margin_bins, np.float64)
        if edges.ndim != 1 or edges.size < 2 or np.any(np.diff(edges) <= 0):
            raise ValueError(f"margin_bins must be at least two increasing edges, got {margin_bins!r}")
        margin = flip_margin(ds_a)
        lo = xr.DataArray(edges[:-1], dims="margin_bin")
        hi = xr.DataArray(edges[1:], dims="margin_bin")
        last = xr.DataArray(np.arange(edges.size - 1) == edges.size - 2, dims="margin_bin")
        in_bin = (margin >= lo) & ((margin < hi) | (last & (margin <= hi)))  # NaN (padding) -> False
        count = in_bin.sum(("sequence", "position"))
        denom = count.where(count > 0)
        out["tokens_by_margin"] = count.transpose("layer", "margin_bin")
        agree = (in_bin & top1).sum(("sequence", "position")) / denom
        match = (in_bin & same_set).sum(("sequence", "position")) / denom
        out["top1_agreement_by_margin"] = agree.transpose("layer", "margin_bin")
        out["set_match_by_margin"] = match.transpose("layer", "margin_bin")
        out["flip_rate_by_margin"] = (1 - match).transpose("layer", "margin_bin")
        out = out.assign_coords(margin_lo=("margin_bin", edges[:-1]), margin_hi=("margin_bin", edges[1:]))
    return out
