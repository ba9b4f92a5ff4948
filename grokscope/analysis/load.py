"""Expert load and balance per layer: hard and soft load, balance loss, CV, MaxVio, drop rate.

Definitions and their sources:
  - hard load / assignment share: Mixtral (Jiang et al., arXiv 2401.04088, Fig. 7);
  - importance (soft load) and the load-balancing loss: Switch Transformers (Fedus et al.,
    arXiv 2101.03961, Eqs. 4-6), ST-MoE (Zoph et al., arXiv 2202.08906, App. A), and the
    Hugging Face `load_balancing_loss_func` for the top-k (Mixtral) variant;
  - expert capacity and dropped tokens: Switch Transformers §2.2;
  - MaxVio: Wang et al., "Auxiliary-Loss-Free Load Balancing" (arXiv 2408.15664);
  - coefficient of variation: standard, no single source.

Every function takes a store's Dataset (`open_store`, `Session.run`, `synthetic_store`),
excludes padding (positions >= `length`, see `valid_tokens`) and stays lazy on dask-backed
Datasets; results are small (layer, expert) or (layer,) DataArrays whose `attrs` hold
`long_name`, `description` and a null `baseline` (the value under perfectly uniform routing)
where one exists.
"""

from __future__ import annotations

import math

import numpy as np
import xarray as xr

from grokscope.analysis.common import Choice, resolve_choice, router_probs, valid_tokens

__all__ = ["expert_counts", "hard_load", "soft_load", "balance_loss", "load_cv", "load_cv_sampling_baseline",
           "max_vio", "drop_rate", "load_entropy"]


# ----------------------------------------------------------------------------- helpers
def _num_experts(ds: xr.Dataset) -> int:
    if "expert" not in ds.sizes:
        raise ValueError("the Dataset has no `expert` dim (need router_logits or an expert coordinate)")
    return int(ds.sizes["expert"])


def _experts(ds: xr.Dataset) -> xr.DataArray:
    """(expert,) the expert numbers 0..E-1, with the Dataset's `expert` coordinate if any."""
    E = _num_experts(ds)
    values = xr.DataArray(np.arange(E), dims="expert")
    if "expert" in ds.coords:
        values = values.assign_coords(expert=ds["expert"])
    return values


def _slots(ds: xr.Dataset, first_choice_only: bool) -> xr.DataArray:
    """expert_index restricted to slot 0 (kept as a size-1 `slot` dim) or all k slots."""
    index = ds["expert_index"]
    return index.isel(slot=slice(0, 1)) if first_choice_only else index


def _choice(first: bool) -> str:
    return "first" if first else "all"


def _safe_div(num: xr.DataArray, den: xr.DataArray | float) -> xr.DataArray:
    """num / den, NaN (without a numpy warning) where den == 0."""
    den = xr.DataArray(den) if not isinstance(den, xr.DataArray) else den
    return num / den.where(den != 0)


def expert_counts(ds: xr.Dataset, choice: Choice = "all", first_choice_only: bool | None = None,
                  per_sequence: bool = False) -> xr.DataArray:
    """Number of valid-token assignments to each expert: Σ_t Σ_r 1[e_t^(r) = e].

    Args:
      ds: a store's Dataset.
      choice: "first" counts slot 0 only (r = 1), "all" (default) all k slots.
      per_sequence: keep the `sequence` dim (one count per batch = sequence).

    Returns:
      int64 (layer, expert), or (sequence, layer, expert) with `per_sequence`.
    """
    first_choice_only = resolve_choice(choice, first_choice_only) == "first"
    onehot = (_slots(ds, first_choice_only) == _experts(ds)) & valid_tokens(ds)
    dims = ["position", "slot"] if per_sequence else ["sequence", "position", "slot"]
    counts = onehot.sum(dims, dtype=np.int64)
    order = ("sequence", "layer", "expert") if per_sequence else ("layer", "expert")
    return counts.transpose(*order)


def _num_valid(ds: xr.Dataset, per_sequence: bool = False) -> xr.DataArray:
    """N, the number of valid (non-pad) tokens (scalar, or (sequence,))."""
    valid = valid_tokens(ds)
    return valid.sum("position", dtype=np.int64) if per_sequence else valid.sum(dtype=np.int64)


# ----------------------------------------------------------------------------- metrics
def hard_load(ds: xr.Dataset, choice: Choice = "all", first_choice_only: bool | None = None) -> xr.DataArray:
    """Assignment share (hard load) per layer and expert.

    Load_{l,e} = (1/(kN)) Σ_t Σ_{r=1..k} 1[e_t^(r) = e] over the N valid tokens (all k slots,
    "first or second choice" for Grok's k = 2, as in Mixtral arXiv 2401.04088 Fig. 7); the
    first-choice variant uses r = 1 only and 1/N. Each layer's loads sum to 1. Null
    baseline: uniform 1/E. Source: Mixtral (arXiv 2401.04088, Fig. 7).

    Args:
      ds: a store's Dataset.
      choice: "first" (slot 0 only) or "all" (default: all k slots).

    Returns:
      float64 (layer, expert).
    """
    first_choice_only = resolve_choice(choice, first_choice_only) == "first"
    k = 1 if first_choice_only else int(ds.sizes["slot"])
    E = _num_experts(ds)
    load = _safe_div(expert_counts(ds, _choice(first_choice_only)).astype(np.float64), k * _num_valid(ds))
    which = "first choice" if first_choice_only else f"any of the top-{k} choices"
    load.attrs = {
        "long_name": "hard load (assignment share)",
        "description": f"fraction of valid-token expert assignments ({which}) that go to each expert; "
                       "sums to 1 over experts (Mixtral arXiv 2401.04088 Fig. 7)",
        "baseline": 1.0 / E,
        "baseline_description": "uniform routing: 1/E",
    }
    return load


def soft_load(ds: xr.Dataset) -> xr.DataArray:
    """Importance (soft load): mean router probability per layer and expert.

    P_{l,e} = (1/N) Σ_t p_{t,e}, p_t = softmax(router_logits_t), over the N valid tokens.
    Null baseline: uniform 1/E. Source: Switch Transformers (arXiv 2101.03961, Eq. 6).

    Returns:
      float64 (layer, expert); each layer sums to 1.
    """
    probs = router_probs(ds).astype(np.float64).where(valid_tokens(ds), 0.0)
    importance = _safe_div(probs.sum(["sequence", "position"]), _num_valid(ds)).transpose("layer", "expert")
    importance.attrs = {
        "long_name": "importance (soft load)",
        "description": "mean router probability softmax(router_logits) of each expert over valid tokens "
                       "(Switch arXiv 2101.03961 Eq. 6)",
        "baseline": 1.0 / _num_experts(ds),
        "baseline_description": "uniform routing: 1/E",
    }
    return importance


def balance_loss(ds: xr.Dataset, variant: str = "switch", alpha: float = 1.0) -> xr.DataArray:
    """Load-balancing auxiliary loss per layer (a diagnostic: Grok-1's training loss is not public).

    "switch": L = α·E·Σ_e f_e·P_e with top-1 f_e = (1/N) Σ_t 1[argmax p_t = e] (the recorded
    first choice, slot 0) and P_e the importance (`soft_load`); its minimum under uniform
    routing is α (Switch arXiv 2101.03961 Eqs. 4-6; ST-MoE arXiv 2202.08906 App. A).
    "mixtral": the Hugging Face `load_balancing_loss_func` top-k variant,
    L = α·E·Σ_{r,e} f_{r,e}·P_e with f_{r,e} the share of tokens whose slot r is e; uniform
    minimum α·k. Sources: Switch Transformers (arXiv 2101.03961, Eqs. 4-6), ST-MoE
    (arXiv 2202.08906, App. A), and the Mixtral top-k variant of Hugging Face transformers. Default α = 1 (the papers train with
    α = 1e-2), so the baseline reads 1 (resp. k).

    Args:
      ds: a store's Dataset.
      variant: "switch" (top-1 f, the recommended definition) or "mixtral" (all k slots).
      alpha: the loss coefficient α.

    Returns:
      float64 (layer,).
    """
    if variant not in ("switch", "mixtral"):
        raise ValueError(f"variant must be 'switch' or 'mixtral', got {variant!r}")
    first = variant == "switch"
    E = _num_experts(ds)
    k = 1 if first else int(ds.sizes["slot"])
    f = _safe_div(expert_counts(ds, "first" if first else "all").astype(np.float64), _num_valid(ds))
    loss = (alpha * E * (f * soft_load(ds)).sum("expert", skipna=False)).transpose("layer")
    loss.attrs = {
        "long_name": f"load-balancing loss ({variant})",
        "description": ("alpha*E*sum_e f_e*P_e, f = first-choice (top-1) share, P = importance "
                        "(Switch arXiv 2101.03961 Eqs. 4-6)" if first else
                        "alpha*E*sum_{r,e} f_{r,e}*P_e over the k slots (HF load_balancing_loss_func)"),
        "alpha": float(alpha),
        "baseline": float(alpha * k),
        "baseline_description": "minimum, reached under uniform routing: alpha" + ("" if first else "*k"),
    }
    return loss


def load_cv(ds: xr.Dataset, choice: Choice = "all", first_choice_only: bool | None = None) -> xr.DataArray:
    """Coefficient of variation of the hard load across experts, per layer.

    CV_l = std_e(Load_{l,e}) / mean_e(Load_{l,e}) (population std, ddof = 0), so CV = 0 for a
    perfectly uniform load and sqrt(E - 1) when a single expert takes every first choice.
    Null baselines: 0 (uniform, `attrs["baseline"]`) and sqrt((E - k)/(kN)), the approximate
    CV of N tokens routed uniformly at random (multinomial sampling noise; k = 1 for the
    first-choice variant; see `load_cv_sampling_baseline`). With all k slots the maximum is
    sqrt(E/k - 1) (k experts share every token). A standard statistic
    (no single source).

    Returns:
      float64 (layer,).
    """
    first_choice_only = resolve_choice(choice, first_choice_only) == "first"
    load = hard_load(ds, _choice(first_choice_only))
    cv = _safe_div(load.std("expert", skipna=False), load.mean("expert", skipna=False))
    cv = cv.transpose("layer")
    E = _num_experts(ds)
    k = 1 if first_choice_only else int(ds.sizes["slot"])
    cv.attrs = {
        "long_name": "coefficient of variation of the load",
        "description": "std over experts / mean over experts of the hard load (ddof=0)"
                       + (", first choice only" if first_choice_only else f", all {k} slots"),
        "baseline": 0.0,
        "baseline_description": "uniform load; the maximum sqrt(E/k-1) is reached when k experts take everything",
        "baseline_sampling_description": "sampling-noise null sqrt((E-k)/(k*N)) of uniform random routing "
                                         "of the N valid tokens: see load_cv_sampling_baseline",
        "max": math.sqrt(E / k - 1),
    }
    return cv


def load_cv_sampling_baseline(ds: xr.Dataset, choice: Choice = "all",
                              first_choice_only: bool | None = None) -> xr.DataArray:
    """sqrt((E - k)/(kN)): the CV of the load expected from sampling noise alone.

    If each of N tokens picks a uniformly random k-set of experts, the shares have
    Var = (E - k)/(E²kN) each, and the root of the expected squared CV is sqrt((E - k)/(kN))
    (an upper bound on E[CV] by Jensen). Use it next to `load_cv` on small stores.

    Returns:
      float64 scalar DataArray.
    """
    first_choice_only = resolve_choice(choice, first_choice_only) == "first"
    E = _num_experts(ds)
    k = 1 if first_choice_only else int(ds.sizes["slot"])
    out = np.sqrt(_safe_div(xr.DataArray(float(E - k)), k * _num_valid(ds).astype(np.float64)))
    out.attrs = {"long_name": "CV under uniform random routing",
                 "description": "sqrt((E-k)/(k*N)), multinomial sampling noise of N valid tokens"}
    return out


def max_vio(ds: xr.Dataset, choice: Choice = "all", first_choice_only: bool | None = None,
            per_sequence: bool = False) -> xr.DataArray:
    """MaxVio, the maximal relative overload of an expert, per layer.

    MaxVio = (max_e Load_e - mean_e Load_e) / mean_e Load_e (Wang et al., Auxiliary-Loss-Free
    Load Balancing, arXiv 2408.15664). Computed over the whole
    store (MaxVio_global) or, with `per_sequence`, per batch = sequence (MaxVio_batch, NaN for a
    sequence without valid tokens). Null baseline: 0 (uniform); the maximum is E - 1.

    Returns:
      float64 (layer,), or (sequence, layer) with `per_sequence`.
    """
    first_choice_only = resolve_choice(choice, first_choice_only) == "first"
    counts = expert_counts(ds, _choice(first_choice_only), per_sequence=per_sequence).astype(np.float64)
    mean = counts.mean("expert")  # the 1/(kN) normalization cancels in the ratio
    vio = _safe_div(counts.max("expert") - mean, mean)
    vio = vio.transpose("sequence", "layer") if per_sequence else vio.transpose("layer")
    vio.attrs = {
        "long_name": "MaxVio" + (" (per sequence)" if per_sequence else " (global)"),
        "description": "(max_e Load_e - mean_e Load_e) / mean_e Load_e (Wang et al. arXiv 2408.15664)"
                       + (", first choice only" if first_choice_only else ", all slots"),
        "baseline": 0.0,
        "baseline_description": "uniform load; the maximum is E-1",
        "max": float(_num_experts(ds) - 1),
    }
    return vio


def drop_rate(ds: xr.Dataset, capacity_factor: float = 1.25, batch: str = "sequence",
              choice: Choice = "all", first_choice_only: bool | None = None) -> xr.DataArray:
    """Hypothetical (would-be) token-drop rate at a given capacity factor, per layer.

    Switch Transformers (arXiv 2101.03961 §2.2): expert capacity C = (tokens per batch / E) ×
    capacity factor; assignments beyond C are dropped. Would-be drop rate =
    Σ_e max(0, n_e - C) / (kT), with n_e the assignments to expert e and T the tokens of the
    batch (Switch Transformers, arXiv 2101.03961, capacity factor). Grok-1 inference has no capacity limit: this is a
    hypothetical. Choices: with k slots the capacity counts assignments, C = ceil(CF·k·T/E)
    (so a perfectly balanced top-k routing drops nothing at CF 1, and k = 1 gives Switch's
    formula; rounded up to whole tokens); a batch is one sequence's valid tokens (`batch=
    "sequence"`, the default, rates pooled over sequences as Σ dropped / Σ kT) or all valid
    tokens of the store (`batch="store"`). Null baseline: 0 (balanced routing).

    Args:
      ds: a store's Dataset.
      capacity_factor: CF, e.g. 1.0, 1.25 or 2.0.
      batch: "sequence" or "store".
      choice: "first": k = 1, slot 0 only (the literal Switch top-1 setting); "all" (default).

    Returns:
      float64 (layer,).
    """
    first_choice_only = resolve_choice(choice, first_choice_only) == "first"
    if batch not in ("sequence", "store"):
        raise ValueError(f"batch must be 'sequence' or 'store', got {batch!r}")
    per_sequence = batch == "sequence"
    E = _num_experts(ds)
    k = 1 if first_choice_only else int(ds.sizes["slot"])
    counts = expert_counts(ds, _choice(first_choice_only), per_sequence=per_sequence)
    tokens = _num_valid(ds, per_sequence=per_sequence)
    capacity = np.ceil(capacity_factor * k * tokens / E)
    dropped = (counts - capacity).clip(min=0).sum("expert")
    if per_sequence:
        dropped, tokens = dropped.sum("sequence"), tokens.sum("sequence")
    rate = _safe_div(dropped.astype(np.float64), k * tokens).transpose("layer")
    rate.attrs = {
        "long_name": f"would-be drop rate at capacity factor {capacity_factor}",
        "description": "sum_e max(0, n_e - C) / (k*T), C = ceil(CF*k*T/E), T = valid tokens per "
                       f"{batch} (Switch arXiv 2101.03961 §2.2); hypothetical, Grok-1 has no capacity",
        "capacity_factor": float(capacity_factor),
        "batch": batch,
        "baseline": 0.0,
        "baseline_description": "perfectly balanced routing drops nothing for CF >= 1",
    }
    return rate


def load_entropy(ds: xr.Dataset, choice: Choice = "all", first_choice_only: bool | None = None) -> xr.DataArray:
    """Normalized entropy of the aggregate hard load, H(Load_l) / ln E, per layer.

    The entropy of the aggregate load (distinct from the
    mean per-token router entropy in `shape.mean_router_entropy`). 1 for a uniform load (the
    null baseline), 0 when one expert takes every assignment.

    Returns:
      float64 (layer,).
    """
    first_choice_only = resolve_choice(choice, first_choice_only) == "first"
    load = hard_load(ds, _choice(first_choice_only))
    plogp = load * np.log(load.where(load > 0, 1.0))  # 0 log 0 = 0; NaN (no tokens) stays NaN
    entropy = (-plogp.sum("expert", skipna=False) / math.log(_num_experts(ds))).transpose("layer")
    entropy.attrs = {
        "long_name": "normalized entropy of the load",
        "description": "-sum_e Load_e ln Load_e / ln E of the hard load",
        "baseline": 1.0,
        "baseline_description": "uniform load",
    }
    return entropy
