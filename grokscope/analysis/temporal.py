"""Temporal routing: Mixtral's consecutive-token repetition rate and its null baselines.

Definitions from Mixtral of
Experts (Jiang et al., arXiv 2401.04088 §5, Table 5): the "proportion of times the same expert
is assigned to a token i and its following token i+1", over the set P of adjacent pairs of
valid (non-pad) tokens within one sequence:
  - first choice:  R1_l = (1/|P|) Σ_{(t,t+1)∈P} 1[e_t^(1) = e_{t+1}^(1)];
  - first *or* second choice (all k slots): Rk_l = (1/|P|) Σ 1[S_t ∩ S_{t+1} ≠ ∅].

Null baselines (a number next to every number):
  - random: the next token's top-k set is a uniformly random k-subset, independent of the
    current one: 1/E for the first choice and 1 - C(E-k, k)/C(E, k) for the set variant
    (8 experts, k = 2: 1/8 = 12.5% and 1 - 15/28 = 13/28 ≈ 46.4%);
  - load-aware: two independent draws from the store's own
    routing distribution, Σ_e Load_{l,e}² for the first choice (first-choice load) and
    Σ_{A∩B≠∅} q_A q_B for the set variant (q = empirical distribution of top-k sets; this is
    our generalisation and reduces to Σ Load² for k = 1);
  - shuffle: positions permuted within each sequence (a within-layer shuffle),
    both its exact expectation and a Monte-Carlo permutation test with a p-value.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import xarray as xr

from grokscope.analysis.common import Choice, resolve_choice, valid_tokens

__all__ = ["repetition_rate", "random_repetition_baseline", "load_aware_repetition_baseline",
           "shuffle_expected_repetition", "repetition_shuffle_test", "repetition_test"]



def _index(ds: xr.Dataset, choice: str) -> xr.DataArray:
    index = ds["expert_index"]
    return index.isel(slot=slice(0, 1)) if choice == "first" else index


def _pairs(ds: xr.Dataset) -> xr.DataArray:
    """|P| = Σ_s max(length_s - 1, 0), the number of adjacent valid pairs (int64 scalar)."""
    valid = valid_tokens(ds)
    return valid.isel(position=slice(1, None)).sum(dtype=np.int64)


def random_repetition_baseline(num_experts: int, k: int, choice: Choice = "first") -> float:
    """Repetition rate of independent, uniformly random top-k sets.

    First choice: P(e_{t+1}^(1) = e_t^(1)) = 1/E. Any slot: the next set avoids the current
    one's k experts with probability C(E-k, k)/C(E, k) (choose all k of its experts among the
    other E-k), so the rate is 1 - C(E-k, k)/C(E, k) (E = 8, k = 2: 13/28). Source:
    Mixtral (arXiv 2401.04088, Table 5).
    """
    choice = resolve_choice(choice)
    if choice == "first":
        return 1.0 / num_experts
    return 1.0 - math.comb(num_experts - k, k) / math.comb(num_experts, k)


def repetition_rate(ds: xr.Dataset, choice: Choice = "first") -> xr.DataArray:
    """Consecutive-token repetition rate per layer (Mixtral arXiv 2401.04088 §5, Table 5).

    R1 = share of adjacent valid pairs (t, t+1) of one sequence whose first choices are equal
    (`choice="first"`); Rk = share whose top-k sets intersect (`choice="all"`, Mixtral's
    "first or second choice" for k = 2). NaN when the store has no adjacent valid pair.
    `attrs["baseline"]` is the random baseline (`random_repetition_baseline`); see
    `load_aware_repetition_baseline` and `repetition_test` for the other nulls.
    Source: Mixtral (arXiv 2401.04088, §5, Table 5).

    Returns:
      float64 (layer,).
    """
    choice = resolve_choice(choice)
    index = _index(ds, choice).drop_vars("position", errors="ignore")
    here = index.isel(position=slice(0, -1))
    after = index.isel(position=slice(1, None)).rename(slot="slot_next")
    if "slot_next" in after.coords:
        after = after.drop_vars("slot_next")
    same = (here == after).any(["slot", "slot_next"])
    valid = valid_tokens(ds).drop_vars("position", errors="ignore").isel(position=slice(1, None))
    matches = (same & valid).sum(["sequence", "position"], dtype=np.int64)
    pairs = _pairs(ds)
    rate = (matches / pairs.where(pairs != 0)).transpose("layer")
    k, E = int(ds.sizes["slot"]), int(ds.sizes["expert"])
    rate.attrs = {
        "long_name": "repetition rate (" + ("first choice" if choice == "first" else f"any of top-{k}") + ")",
        "description": ("share of adjacent valid-token pairs with the same first-choice expert"
                        if choice == "first" else
                        f"share of adjacent valid-token pairs whose top-{k} expert sets intersect")
                       + " (Mixtral arXiv 2401.04088 Table 5)",
        "baseline": random_repetition_baseline(E, k, choice),
        "baseline_description": "uniformly random routing: " + ("1/E" if choice == "first" else
                                                                 "1 - C(E-k,k)/C(E,k)"),
    }
    return rate


def _subsets(num_experts: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Bit codes of all `size`-subsets of the experts and their (subset, subset) overlap matrix."""
    if math.comb(num_experts, size) > 4096:
        raise ValueError(f"C({num_experts}, {size}) expert sets are too many for the set-valued baselines")
    codes = np.array([sum(1 << e for e in c) for c in itertools.combinations(range(num_experts), size)],
                     dtype=np.int64)
    return codes, (codes[:, None] & codes[None, :]) != 0


def _set_counts(ds: xr.Dataset, choice: str) -> tuple[xr.DataArray, xr.DataArray]:
    """Per sequence and layer, how many valid tokens route to each expert set.

    Returns:
      int64 counts (sequence, layer, subset) and the bool overlap matrix (subset, subset_b);
      for `choice="first"` the sets are the single first-choice experts (overlap = identity).
    """
    E = int(ds.sizes["expert"])
    index = _index(ds, choice).astype(np.int64)
    size = int(index.sizes["slot"])
    codes, overlap = _subsets(E, size)
    code = (2 ** index.where(index >= 0, 0)).sum("slot")  # distinct experts per token: a bit set
    onehot = (code == xr.DataArray(codes, dims="subset")) & valid_tokens(ds)
    counts = onehot.sum("position", dtype=np.int64).transpose("sequence", "layer", "subset")
    return counts, xr.DataArray(overlap, dims=("subset", "subset_b"))


def load_aware_repetition_baseline(ds: xr.Dataset, choice: Choice = "first") -> xr.DataArray:
    """Repetition rate of two independent draws from the store's own routing distribution.

    First choice: Σ_e Load_{l,e}² with the first-choice load (the
    marginal-aware null; it equals 1/E only for a uniform load). Any slot: Σ_{A∩B≠∅} q_A q_B,
    q the empirical distribution of top-k sets over valid tokens (our generalisation; it equals
    the random baseline 1 - C(E-k,k)/C(E,k) when q is uniform over k-sets). A null that
    accounts for an uneven load.

    Returns:
      float64 (layer,).
    """
    choice = resolve_choice(choice)
    counts, overlap = _set_counts(ds, choice)
    total = counts.sum("sequence")
    n = total.sum("subset")
    q = (total / n.where(n != 0))
    baseline = xr.dot(q, overlap, q.rename(subset="subset_b"), dim=["subset", "subset_b"]).transpose("layer")
    baseline.attrs = {
        "long_name": "load-aware repetition baseline",
        "description": ("sum_e Load_e^2, first-choice load" if choice == "first" else
                        "sum over intersecting pairs of top-k sets of q_A*q_B, q = set frequencies"),
    }
    return baseline


def shuffle_expected_repetition(ds: xr.Dataset, choice: Choice = "first") -> xr.DataArray:
    """Exact expected repetition rate when positions are permuted uniformly within each sequence.

    For a sequence of n valid tokens with c_A tokens routed to set A, a random permutation makes
    each adjacent pair a uniformly random pair of distinct tokens, so the expected number of
    repeats is (n-1)·(Σ_{A,B} c_A c_B 1[A∩B≠∅] - n) / (n(n-1)); summed over sequences and
    divided by |P|. First choice: (Σ_e c_e(c_e-1)/n) per sequence. This is the mean of the null
    distribution of `repetition_shuffle_test` (a within-sequence shuffle null).

    Returns:
      float64 (layer,).
    """
    choice = resolve_choice(choice)
    counts, overlap = _set_counts(ds, choice)
    counts = counts.astype(np.float64)
    n = counts.sum("subset")
    hits = xr.dot(counts, overlap, counts.rename(subset="subset_b"), dim=["subset", "subset_b"]) - n
    repeats = (hits / n.where(n != 0)).fillna(0.0).sum("sequence")
    pairs = _pairs(ds)
    out = (repeats / pairs.where(pairs != 0)).transpose("layer")
    out.attrs = {"long_name": "expected repetition under within-sequence shuffle",
                 "description": "exact mean of the permutation null (positions permuted within each sequence)"}
    return out


def _block_matches(index: np.ndarray, lengths: np.ndarray, generators, n_permutations: int,
                   max_elements: int = 1 << 24) -> np.ndarray:
    """Repeat counts (n_permutations, layer) of permuted sequences; index: (seq, pos, layer, slot)."""
    L = index.shape[2]
    matches = np.zeros((n_permutations, L), np.int64)
    for x, n, gen in zip(index, lengths, generators):
        n = int(n)
        if n < 2:
            continue
        x = x[:n]  # (n, layer, slot)
        step = max(1, max_elements // (n * x[0].size))
        for start in range(0, n_permutations, step):
            m = min(step, n_permutations - start)
            perms = gen.permuted(np.broadcast_to(np.arange(n), (m, n)), axis=1)
            y = x[perms]  # (m, n, layer, slot)
            same = (y[:, :-1, :, :, None] == y[:, 1:, :, None, :]).any(axis=(-1, -2))
            matches[start:start + m] += same.sum(axis=1)
    return matches


def repetition_shuffle_test(ds: xr.Dataset, choice: Choice = "first", n_permutations: int = 200,
                            seed: int | np.random.Generator = 0, alternative: str = "two-sided",
                            sequences_per_block: int = 64) -> xr.Dataset:
    """Permutation test of the repetition rate against a within-sequence shuffle, per layer.

    Each permutation shuffles the valid positions of every sequence (one permutation per
    sequence, shared by all layers; padding untouched) and recomputes `repetition_rate`. The
    p-value is the add-one Monte-Carlo estimate (1 + #{null as extreme as observed}) /
    (1 + n_permutations): "greater" counts null >= observed, "less" null <= observed,
    "two-sided" |null - mean| >= |observed - mean|. Random numbers: one child of
    `np.random.default_rng(seed)` per sequence (`Generator.spawn`), so results do not depend on
    `sequences_per_block`. The data is read `sequences_per_block` sequences at a time (this test
    cannot stay lazy; memory stays bounded). A shuffle null for Mixtral's
    repetition rate.

    Returns:
      Dataset (layer,) with `observed`, `shuffle_mean`, `shuffle_std`, `p_value`.
    """
    choice = resolve_choice(choice)
    if alternative not in ("two-sided", "greater", "less"):
        raise ValueError(f"alternative must be 'two-sided', 'greater' or 'less', got {alternative!r}")
    if n_permutations < 1:
        raise ValueError("n_permutations must be >= 1")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    S, L = int(ds.sizes["sequence"]), int(ds.sizes["layer"])
    generators = rng.spawn(S)
    index_da = _index(ds, choice)
    lengths = np.asarray(ds["length"].values, dtype=np.int64)  # (sequence,): small
    matches = np.zeros((n_permutations, L), np.int64)
    observed = np.zeros(L, np.int64)
    for start in range(0, S, sequences_per_block):
        stop = min(S, start + sequences_per_block)
        block = np.asarray(index_da.isel(sequence=slice(start, stop))
                           .transpose("sequence", "position", "layer", "slot").values)
        matches += _block_matches(block, lengths[start:stop], generators[start:stop], n_permutations)
        for x, n in zip(block, lengths[start:stop]):
            x = x[:int(n)]
            if len(x) > 1:
                observed += (x[:-1, :, :, None] == x[1:, :, None, :]).any(axis=(-1, -2)).sum(axis=0)
    pairs = int(np.clip(lengths - 1, 0, None).sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        null = matches / pairs if pairs else np.full(matches.shape, np.nan)
        obs = observed / pairs if pairs else np.full(L, np.nan)
    mean, std = null.mean(axis=0), null.std(axis=0)
    tol = 1e-12
    if alternative == "greater":
        extreme = null >= obs - tol
    elif alternative == "less":
        extreme = null <= obs + tol
    else:
        extreme = np.abs(null - mean) >= np.abs(obs - mean) - tol
    p_value = (1 + extreme.sum(axis=0)) / (1 + n_permutations)
    if not pairs:
        p_value = np.full(L, np.nan)
    coords = {"layer": ds["layer"].values} if "layer" in ds.coords else {}
    k = int(ds.sizes["slot"])
    what = "first choice" if choice == "first" else f"any of top-{k}"
    out = xr.Dataset(
        {"observed": ("layer", obs, {"long_name": f"repetition rate ({what})"}),
         "shuffle_mean": ("layer", mean, {"long_name": "mean repetition rate under within-sequence shuffle"}),
         "shuffle_std": ("layer", std, {"long_name": "std of the repetition rate under the shuffle"}),
         "p_value": ("layer", p_value, {"long_name": f"permutation p-value ({alternative})",
                                        "n_permutations": n_permutations})},
        coords=coords)
    out.attrs = {"description": "permutation test: positions shuffled within each sequence", "choice": choice}
    return out


def repetition_test(ds: xr.Dataset, choice: Choice = "first", n_permutations: int = 200,
                    seed: int | np.random.Generator = 0, alternative: str = "two-sided") -> xr.Dataset:
    """The repetition rate per layer next to all its nulls (one Dataset, computed).

    Variables (layer,): `repetition` (`repetition_rate`), `random_baseline` (1/E or
    1 - C(E-k,k)/C(E,k)), `load_aware_baseline`, `shuffle_expected` (exact shuffle mean),
    `shuffle_mean`, `shuffle_std` and `p_value` (`repetition_shuffle_test`). Source:
    Mixtral (arXiv 2401.04088, Table 5).
    """
    rate = repetition_rate(ds, choice).compute()
    test = repetition_shuffle_test(ds, choice, n_permutations, seed, alternative)
    random = xr.full_like(rate, rate.attrs["baseline"])
    random.attrs = {"long_name": "random baseline", "description": rate.attrs["baseline_description"]}
    out = xr.Dataset({
        "repetition": rate,
        "random_baseline": random,
        "load_aware_baseline": load_aware_repetition_baseline(ds, choice).compute(),
        "shuffle_expected": shuffle_expected_repetition(ds, choice).compute(),
        "shuffle_mean": test["shuffle_mean"].assign_coords(rate.coords),
        "shuffle_std": test["shuffle_std"].assign_coords(rate.coords),
        "p_value": test["p_value"].assign_coords(rate.coords),
    })
    out.attrs = {"choice": choice, "n_permutations": n_permutations}
    return out
