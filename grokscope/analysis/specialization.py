"""Expert specialization: per-group load, vocabulary specialization, co-activation, enrichment.

Definitions and their sources:

* Load / assignment share, per domain (item 1 and 14): Mixtral, arXiv 2401.04088 §5, Fig. 7.
* Domain specialization (item 17): OLMoE, arXiv 2409.02060 §5, Eq. 7.
* Vocabulary specialization (item 18) and co-activation (item 16): OLMoE §5 and allenai/OLMoE
  `scripts/run_moe_analysis.py` / `scripts/run_routing_analysis.py`.
* Risk difference (item 24): SteerMoE, arXiv 2509.09660.

Padding (positions >= `length`) is excluded everywhere. Per-token work is done with xarray
operations (lazy on dask-backed stores); only small per-sequence / per-layer tables, and the
first-choice expert of the real tokens where a metric needs per-token grouping (vocabulary),
are computed eagerly.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import xarray as xr

from grokscope.analysis.common import Choice, resolve_choice, valid_tokens

__all__ = ["group_load", "vocabulary_specialization", "top_tokens_per_expert", "coactivation",
           "expert_enrichment"]



def _assignments(ds: xr.Dataset, choice: Choice) -> xr.DataArray:
    """(sequence, position, layer, expert) int: how many of the token's chosen slots pick the expert.

    Padding is zero. `choice="all"` counts every slot, `"first"` only slot 0.
    """
    index = ds["expert_index"]
    if choice == "first":
        index = index.isel(slot=slice(0, 1))
    expert = xr.DataArray(np.arange(ds.sizes["expert"], dtype=np.int64), dims="expert")
    hits = (index == expert).sum("slot")
    return hits.where(valid_tokens(ds), 0).astype(np.int64)


def _num_slots(ds: xr.Dataset, choice: Choice) -> int:
    return 1 if choice == "first" else ds.sizes["slot"]


def _per_sequence_counts(ds: xr.Dataset, choice: Choice) -> tuple[np.ndarray, np.ndarray]:
    """Computed (sequence, layer, expert) assignment counts and (sequence,) real-token counts."""
    counts = _assignments(ds, choice).sum("position").transpose("sequence", "layer", "expert")
    ntok = valid_tokens(ds).sum("position")
    counts, ntok = xr.align(counts, ntok)
    return np.asarray(counts.values, np.int64), np.asarray(ntok.values, np.int64)


def _group_matrix(ds: xr.Dataset, by: str) -> tuple[np.ndarray, np.ndarray]:
    """Unique group labels and the (sequence, group) one-hot membership matrix of column `by`."""
    if by not in ds:
        raise KeyError(f"no per-sequence column {by!r} in the Dataset")
    column = ds[by]
    if column.dims != ("sequence",):
        raise ValueError(f"{by!r} must have dims ('sequence',), got {column.dims}")
    labels = np.asarray(column.values)
    groups, inverse = np.unique(labels, return_inverse=True)
    onehot = np.zeros((labels.size, groups.size), np.int64)
    onehot[np.arange(labels.size), inverse.reshape(-1)] = 1
    return groups, onehot


def _safe_divide(num, den):
    """num / den with NaN (and no warning) where den == 0."""
    num = np.asarray(num, np.float64)
    den = np.asarray(den, np.float64)
    out = np.full(np.broadcast_shapes(num.shape, den.shape), np.nan)
    np.divide(num, den, out=out, where=np.broadcast_to(den != 0, out.shape))
    return out


def group_load(ds: xr.Dataset, by: str = "label", choice: Choice = "all") -> xr.Dataset:
    """Assignment share of each expert per layer, separately for each group of sequences.

    Load_{l,e}(D) = (1/(k N_D)) sum_{t in D} sum_{r=1..k} 1[e_t^(r) = e] (per domain, as in
    Mixtral arXiv 2401.04088 Fig. 7, which counts first *or*
    second choice, uniform reference 1/E). With `choice="first"` only the first choice counts
    (k = 1). OLMoE's domain specialization (arXiv 2409.02060 Eq. 7, the fraction of the group's
    tokens whose top-k includes the expert) is `k * share`, returned as `domain_specialization`.

    Args:
      ds: a store's Dataset.
      by: a per-sequence column, e.g. "label"; its unique values become the `group` coordinate.
      choice: "all" (every top-k slot) or "first" (slot 0 only).

    Returns:
      Dataset (group, layer, expert) with `count` (assignments), `share` (Load, sums to 1 over
      experts), `domain_specialization` (k * share) and `tokens` (group,) = N_D, the real tokens.
      Groups without real tokens have NaN shares.
    """
    groups, onehot = _group_matrix(ds, by)
    choice = resolve_choice(choice)
    counts, ntok = _per_sequence_counts(ds, choice)
    k = _num_slots(ds, choice)
    gcount = np.einsum("sg,sle->gle", onehot, counts)
    gtok = onehot.T @ ntok
    share = _safe_divide(gcount, k * gtok[:, None, None])
    dims = ("group", "layer", "expert")
    coords = {"group": groups, "layer": ds["layer"].values, "expert": ds["expert"].values}
    return xr.Dataset({
        "count": (dims, gcount), "share": (dims, share), "domain_specialization": (dims, k * share),
        "tokens": (("group",), gtok)}, coords=coords, attrs={"by": by, "choice": choice, "k": k})


def _first_choice_tokens(ds: xr.Dataset, token_var: str) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (N,) and first-choice experts (N, layer) of the real tokens, computed."""
    valid = np.asarray(valid_tokens(ds).values)
    tokens = np.asarray(ds[token_var].transpose("sequence", "position").values)[valid]
    first = np.asarray(ds["expert_index"].isel(slot=0).transpose("sequence", "position", "layer").values)
    return tokens.astype(np.int64), first[valid].astype(np.int64)


def _token_expert_counts(tokens: np.ndarray, first: np.ndarray, num_experts: int, layer: int,
                         inverse: np.ndarray, n_unique: int) -> np.ndarray:
    """(unique token, expert) counts of first choices at one layer (column index `layer`)."""
    flat = inverse * num_experts + first[:, layer]
    return np.bincount(flat, minlength=n_unique * num_experts).reshape(n_unique, num_experts)


def vocabulary_specialization(ds: xr.Dataset, min_count: int = 10, token_var: str = "tokens") -> xr.Dataset:
    """For each token id, the share of its occurrences that go to its most-used first-choice expert.

    VocSpec(E_i, x) = N^(1)_{x,E_i} / N_x (OLMoE arXiv 2409.02060 §5,
    allenai/OLMoE `scripts/run_routing_analysis.py`, which uses the top-1 expert and reports per
    token id the share of the most-used expert). Uniform routing gives ~1/E, a lower bound.

    Args:
      ds: a store's Dataset.
      min_count: token ids with fewer real occurrences are left out.
      token_var: the (sequence, position) token-id variable; "tokens" are the input ids (the
        official script also does this for predicted ids: pass such a variable's name).

    Returns:
      Dataset with coordinate `token` (the kept ids, ascending): `count` (token,) = N_x,
      `top_expert` (layer, token) the most-used first-choice expert (ties: lower index) and
      `top_share` (layer, token) its share VocSpec.
    """
    tokens, first = _first_choice_tokens(ds, token_var)
    uniq, inverse, ntok = np.unique(tokens, return_inverse=True, return_counts=True)
    keep = ntok >= min_count
    E = ds.sizes["expert"]
    L = first.shape[1]
    top_expert = np.zeros((L, int(keep.sum())), np.int64)
    top_share = np.zeros((L, int(keep.sum())), np.float64)
    for layer in range(L):
        table = _token_expert_counts(tokens, first, E, layer, inverse.reshape(-1), uniq.size)[keep]
        top_expert[layer] = table.argmax(1)
        top_share[layer] = table.max(1, initial=0) / ntok[keep]
    coords = {"layer": ds["layer"].values, "token": uniq[keep]}
    return xr.Dataset({"count": (("token",), ntok[keep]), "top_expert": (("layer", "token"), top_expert),
                       "top_share": (("layer", "token"), top_share)}, coords=coords,
                      attrs={"min_count": min_count, "token_var": token_var})


def top_tokens_per_expert(ds: xr.Dataset, n: int = 10, min_count: int = 1, sort_by: Literal["count", "share"] = "count",
                          token_var: str = "tokens") -> xr.Dataset:
    """The token ids most routed (first choice) to each expert, per layer.

    Uses the counts N^(1)_{x,E_i} and the share VocSpec(E_i, x) = N^(1)_{x,E_i} / N_x
    (OLMoE arXiv 2409.02060 §5; allenai/OLMoE
    `scripts/run_routing_analysis.py`).

    Args:
      ds: a store's Dataset.
      n: tokens kept per (layer, expert).
      min_count: token ids with fewer real occurrences (N_x) are left out.
      sort_by: "count" (most assignments to the expert first) or "share" (largest VocSpec
        first, i.e. the tokens the expert owns; use with a `min_count`). Ties: larger count,
        then lower token id.
      token_var: the (sequence, position) token-id variable.

    Returns:
      Dataset (layer, expert, rank) with `token` (-1 where fewer than n tokens have a nonzero
      count), `count` (assignments of that token to the expert) and `share` (count / N_x).
    """
    if sort_by not in ("count", "share"):
        raise ValueError(f"sort_by must be 'count' or 'share', got {sort_by!r}")
    tokens, first = _first_choice_tokens(ds, token_var)
    uniq, inverse, ntok = np.unique(tokens, return_inverse=True, return_counts=True)
    keep = ntok >= min_count
    E = ds.sizes["expert"]
    L = first.shape[1]
    out_tok = np.full((L, E, n), -1, np.int64)
    out_cnt = np.zeros((L, E, n), np.int64)
    out_share = np.zeros((L, E, n), np.float64)
    ids, nx = uniq[keep], ntok[keep]
    for layer in range(L):
        table = _token_expert_counts(tokens, first, E, layer, inverse.reshape(-1), uniq.size)[keep]
        for e in range(E):
            cnt = table[:, e]
            share = cnt / nx if nx.size else cnt.astype(np.float64)
            primary = cnt if sort_by == "count" else share
            order = np.lexsort((ids, -cnt, -primary))
            order = order[cnt[order] > 0][:n]
            m = order.size
            out_tok[layer, e, :m] = ids[order]
            out_cnt[layer, e, :m] = cnt[order]
            out_share[layer, e, :m] = share[order]
    dims = ("layer", "expert", "rank")
    coords = {"layer": ds["layer"].values, "expert": ds["expert"].values, "rank": np.arange(n)}
    return xr.Dataset({"token": (dims, out_tok), "count": (dims, out_cnt), "share": (dims, out_share)},
                      coords=coords, attrs={"sort_by": sort_by, "min_count": min_count, "token_var": token_var})


def coactivation(ds: xr.Dataset) -> xr.Dataset:
    """Expert co-activation within a layer: CoAct(i, j) = N(i, j) / N(i).

    OLMoE (arXiv 2409.02060 §5, allenai/OLMoE
    `scripts/run_moe_analysis.py`): N(i, j) is the number of real tokens whose top-k set holds
    both i and j (i != j), N(i) the number whose top-k holds i. Asymmetric. The diagonal is 0
    (an expert is never paired with itself). For k = 2 this equals the official script's
    count of adjacent pairs in the rank-ordered top-k list.

    Returns:
      Dataset (layer, expert, expert_j) with `count` N(i, j) (diagonal 0), `coactivation`
      N(i, j)/N(i) (NaN where N(i) = 0), and `tokens` (layer, expert) = N(i). Lazy on dask.
    """
    chosen = _assignments(ds, "topk") > 0
    other = chosen.rename(expert="expert_j")
    pair = (chosen & other).sum(("sequence", "position")).astype(np.int64)
    single = chosen.sum(("sequence", "position")).astype(np.int64)
    diag = xr.DataArray(np.arange(ds.sizes["expert"]), dims="expert") == \
        xr.DataArray(np.arange(ds.sizes["expert"]), dims="expert_j")
    pair = pair.where(~diag, 0).transpose("layer", "expert", "expert_j")
    coact = pair / single.where(single > 0)
    out = xr.Dataset({"count": pair, "coactivation": coact, "tokens": single.transpose("layer", "expert")})
    return out.assign_coords(expert=ds["expert"].values, expert_j=ds["expert"].values)


def expert_enrichment(ds: xr.Dataset, by: str = "label", choice: Choice = "all", n_permutations: int = 1000,
                      seed: int = 0, alternative: Literal["greater", "less", "two-sided"] = "greater") -> xr.Dataset:
    """Enrichment of each expert in each group, with a label-permutation p-value.

    enrichment = share in group / share overall, with share the assignment share Load (item 1,
    per group as in item 14; equal to the ratio of OLMoE's DomSpec, arXiv 2409.02060 Eq. 7,
    item 17). `risk_difference` is SteerMoE's Delta = p^(group) - p^(rest) (arXiv 2509.09660,
    item 24) with p the fraction of tokens whose top-k includes the expert (DomSpec).

    Significance: a seeded permutation test that shuffles the group labels over *sequences*
    (tokens of one sequence are not independent, so a per-token binomial test would be
    anti-conservative). The statistic is the group's share; p = (1 + #{perm >= observed}) /
    (1 + n_permutations) for "greater" (<= for "less", |share - overall| for "two-sided").
    p-values are per cell, not corrected for the layer x expert x group comparisons.

    Args:
      ds: a store's Dataset.
      by: a per-sequence column, e.g. "label".
      choice: "all" (every top-k slot) or "first" (slot 0 only).
      n_permutations: number of label shuffles.
      seed: seed of numpy's default_rng.
      alternative: "greater" (enriched), "less" (depleted) or "two-sided".

    Returns:
      Dataset (group, layer, expert): `share`, `share_overall` (layer, expert), `enrichment`,
      `log2_enrichment` (NaN/inf where a share is 0), `risk_difference`, `p_value`; `tokens` (group,).
    """
    if alternative not in ("greater", "less", "two-sided"):
        raise ValueError(f"alternative must be 'greater', 'less' or 'two-sided', got {alternative!r}")
    groups, onehot = _group_matrix(ds, by)
    choice = resolve_choice(choice)
    counts, ntok = _per_sequence_counts(ds, choice)
    k = _num_slots(ds, choice)
    S, L, E = counts.shape
    flat = counts.reshape(S, L * E).astype(np.float64)

    def shares(member):
        return _safe_divide(member.T @ flat, k * (member.T @ ntok)[:, None])

    observed = shares(onehot)
    overall = _safe_divide(flat.sum(0), k * ntok.sum())
    rest = _safe_divide((1 - onehot).T @ flat, k * ((1 - onehot).T @ ntok)[:, None])
    tol = 1e-12
    rng = np.random.default_rng(seed)
    exceed = np.zeros_like(observed)
    for _ in range(n_permutations):
        perm = shares(onehot[rng.permutation(S)])
        with np.errstate(invalid="ignore"):
            if alternative == "greater":
                exceed += perm >= observed - tol
            elif alternative == "less":
                exceed += perm <= observed + tol
            else:
                exceed += np.abs(perm - overall) >= np.abs(observed - overall) - tol
    p_value = (1 + exceed) / (1 + n_permutations)
    p_value[np.isnan(observed)] = np.nan
    enrichment = _safe_divide(observed, overall[None])
    with np.errstate(divide="ignore"):
        log2 = np.where(np.isnan(enrichment), np.nan, np.log2(np.where(np.isnan(enrichment), 1, enrichment)))
    dims = ("group", "layer", "expert")

    def cube(x):
        return x.reshape(-1, L, E)

    coords = {"group": groups, "layer": ds["layer"].values, "expert": ds["expert"].values}
    return xr.Dataset({
        "share": (dims, cube(observed)), "share_overall": (("layer", "expert"), overall.reshape(L, E)),
        "enrichment": (dims, cube(enrichment)), "log2_enrichment": (dims, cube(log2)),
        "risk_difference": (dims, k * cube(observed - rest)), "p_value": (dims, cube(p_value)),
        "tokens": (("group",), onehot.T @ ntok)}, coords=coords,
        attrs={"by": by, "choice": choice, "k": k, "n_permutations": n_permutations, "seed": seed,
               "alternative": alternative})


def vocabulary_specialisation(*args, **kwargs) -> xr.Dataset:
    """Deprecated spelling of `vocabulary_specialization`."""
    import warnings

    warnings.warn("vocabulary_specialisation is deprecated: use vocabulary_specialization", DeprecationWarning,
                  stacklevel=2)
    return vocabulary_specialization(*args, **kwargs)
