"""Cross-layer routing paths: transition matrices, conditional entropy / mutual information, path statistics.

Definitions (no single canonical formula in the literature; the path as
the unit of analysis follows the bongohead Sankey and "Polysemantic Experts, Monosemantic
Paths"); cross-layer co-occurrence counters as in allenai/OLMoE `scripts/run_routing_analysis.py`
(item 19). Entropies are in bits.

Only the first-choice expert (slot 0) of the real tokens (positions < `length`) is used; it is
computed eagerly for the layers asked for (N int8 values per layer).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import xarray as xr

from grokscope.analysis.common import valid_tokens

__all__ = ["transition_matrix", "transition_information", "layer_information", "path_statistics", "top_paths"]


def _first_choices(ds: xr.Dataset, layers: Sequence[int]) -> np.ndarray:
    """(N, len(layers)) int64 first-choice experts of the real tokens at the given layer labels."""
    valid = np.asarray(valid_tokens(ds).values)
    first = ds["expert_index"].isel(slot=0).sel(layer=list(layers)).transpose("sequence", "position", "layer")
    return np.asarray(first.values)[valid].astype(np.int64)


def _joint_counts(a: np.ndarray, b: np.ndarray, num_experts: int) -> np.ndarray:
    return np.bincount(a * num_experts + b, minlength=num_experts * num_experts).reshape(num_experts, num_experts)


def _entropy_bits(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def _information(joint: np.ndarray) -> tuple[float, float, float, float]:
    """H(A), H(B), H(B|A), I(A;B) in bits of a joint count table (plug-in estimates)."""
    n = joint.sum()
    if n == 0:
        return (np.nan,) * 4
    p = joint / n
    h_a = _entropy_bits(p.sum(1))
    h_b = _entropy_bits(p.sum(0))
    h_ab = _entropy_bits(p.ravel())
    return h_a, h_b, h_ab - h_a, h_a + h_b - h_ab


def transition_matrix(ds: xr.Dataset, layer_a: int, layer_b: int) -> xr.Dataset:
    """Top-1 transition matrix between two layers: T(i, j) = P(e^(1)_b = j | e^(1)_a = i).

    With layer_b = layer_a + 1 this is the layer-to-layer transition matrix T_l, but any two layers are allowed, as in OLMoE's cross-layer counters,
    item 19). The independent baseline is T(i, j) = Load^(1)_{b, j}, the first-choice share of
    expert j at layer b.

    Args:
      ds: a store's Dataset.
      layer_a, layer_b: layer labels (values of the `layer` coordinate).

    Returns:
      Dataset (expert_a, expert_b) with `count` (tokens with first choice i at a and j at b),
      `probability` (row-normalized; NaN for rows without tokens) and `baseline`
      (Load^(1)_{b, j}, the same for every row).
    """
    fc = _first_choices(ds, [layer_a, layer_b])
    E = ds.sizes["expert"]
    joint = _joint_counts(fc[:, 0], fc[:, 1], E)
    rows = joint.sum(1, keepdims=True).astype(np.float64)
    prob = np.full(joint.shape, np.nan)
    np.divide(joint, rows, out=prob, where=np.broadcast_to(rows > 0, joint.shape))
    total = joint.sum()
    load_b = joint.sum(0) / total if total else np.full(E, np.nan)
    experts = ds["expert"].values
    return xr.Dataset({
        "count": (("expert_a", "expert_b"), joint), "probability": (("expert_a", "expert_b"), prob),
        "baseline": (("expert_a", "expert_b"), np.broadcast_to(load_b, joint.shape).copy())},
        coords={"expert_a": experts, "expert_b": experts}, attrs={"layer_a": layer_a, "layer_b": layer_b})


def transition_information(ds: xr.Dataset, layer_a: int, layer_b: int, n_shuffles: int = 20,
                           seed: int = 0) -> xr.Dataset:
    """Conditional entropy H(E_b | E_a) and mutual information I(E_a; E_b) of first choices.

    A summary of the transition matrix. Plug-in
    estimates in bits over the real tokens. The independent baseline T(i, j) =
    Load_{b, j} has I = 0 exactly, but the plug-in MI of a finite sample is biased upwards
    (about (E-1)^2 / (2 N ln 2) bits), so the null reported here is the MI after a seeded
    within-layer shuffle of the tokens' layer-b choices (marginals kept, association broken):
    `mi_baseline` (mean over shuffles) and `mi_baseline_std`. `mi_excess` = mi - mi_baseline.

    Args:
      ds: a store's Dataset.
      layer_a, layer_b: layer labels.
      n_shuffles: shuffles for the baseline (0: baseline NaN).
      seed: seed of numpy's default_rng.

    Returns:
      Dataset of scalars: `entropy_a` H(E_a), `entropy_b` H(E_b), `conditional_entropy`
      H(E_b|E_a), `mutual_information` I(E_a;E_b), `normalised_mi` I / H(E_b) (NaN if H(E_b)=0),
      `mi_baseline`, `mi_baseline_std`, `mi_excess`, `tokens` N.
    """
    fc = _first_choices(ds, [layer_a, layer_b])
    E = ds.sizes["expert"]
    a, b = fc[:, 0], fc[:, 1]
    h_a, h_b, h_cond, mi = _information(_joint_counts(a, b, E))
    rng = np.random.default_rng(seed)
    null = np.array([_information(_joint_counts(a, rng.permutation(b), E))[3] for _ in range(n_shuffles)])
    base = float(null.mean()) if null.size else np.nan
    base_std = float(null.std()) if null.size else np.nan
    norm = mi / h_b if h_b and h_b > 0 else np.nan
    return xr.Dataset({
        "entropy_a": h_a, "entropy_b": h_b, "conditional_entropy": h_cond, "mutual_information": mi,
        "normalised_mi": norm, "mi_baseline": base, "mi_baseline_std": base_std, "mi_excess": mi - base,
        "tokens": int(a.size)}, attrs={"layer_a": layer_a, "layer_b": layer_b, "units": "bits",
                                        "n_shuffles": n_shuffles, "seed": seed})


def layer_information(ds: xr.Dataset, lag: int = 1, n_shuffles: int = 20, seed: int = 0) -> xr.Dataset:
    """`transition_information` for every pair (layer l, layer l + lag), along `layer` (= l).

    T_l between layer l and l + lag (adjacent layers for lag = 1). Layers are taken by position in the Dataset's `layer` coordinate.

    Returns:
      Dataset (layer,) with the variables of `transition_information`, indexed by the first
      layer of each pair, and `layer_b` (layer,) the second.
    """
    if lag < 1:
        raise ValueError(f"lag must be >= 1, got {lag}")
    labels = [int(x) for x in ds["layer"].values]
    if len(labels) <= lag:
        raise ValueError(f"need more than {lag} layers, the Dataset has {len(labels)}")
    rows = [transition_information(ds, a, b, n_shuffles=n_shuffles, seed=seed).reset_coords(drop=True)
            for a, b in zip(labels[:-lag], labels[lag:])]
    out = xr.concat(rows, dim="layer", data_vars="all", coords="minimal", compat="override",
                    join="outer", combine_attrs="drop")
    out = out.assign_coords(layer=labels[:-lag])
    out["layer_b"] = ("layer", np.asarray(labels[lag:]))
    out.attrs = {"lag": lag, "units": "bits", "n_shuffles": n_shuffles, "seed": seed}
    return out


def _path_counts(ds: xr.Dataset, layers: Sequence[int] | None) -> tuple[np.ndarray, np.ndarray, list]:
    layers = list(ds["layer"].values) if layers is None else list(layers)
    if not layers:
        raise ValueError("layers must name at least one layer")
    fc = _first_choices(ds, layers)
    if fc.shape[0] == 0:
        return np.zeros((0, len(layers)), np.int64), np.zeros(0, np.int64), layers
    paths, counts = np.unique(fc, axis=0, return_counts=True)
    order = np.lexsort(tuple(paths[:, i] for i in range(paths.shape[1] - 1, -1, -1)) + (-counts,))
    return paths[order], counts[order], layers


def path_statistics(ds: xr.Dataset, layers: Sequence[int] | None = None,
                    top_n: Sequence[int] = (1, 10, 100)) -> xr.Dataset:
    """Number, top-N coverage and entropy of the distinct first-choice paths over a window of layers.

    A token's path is (e^(1)_l for l in the window);
    report the number of distinct paths, the share of real tokens covered by the N most frequent
    paths, and the path entropy (bits). With 8^64 possible paths, use windows of layers.

    Args:
      ds: a store's Dataset.
      layers: the window, as layer labels (default: every layer in the Dataset).
      top_n: the N of the coverage.

    Returns:
      Dataset: `n_paths`, `tokens`, `entropy` (bits), `max_entropy` log2(min(tokens, E^W)),
      `coverage` (top_n,), and `uniform_coverage` (top_n,) min(N / E^W, 1), the coverage of
      uniform independent routing in the limit of many tokens.
    """
    paths, counts, layers = _path_counts(ds, layers)
    n = int(counts.sum())
    top_n = np.asarray(list(top_n), np.int64)
    cum = np.concatenate([[0], np.cumsum(counts)])
    coverage = cum[np.minimum(top_n, counts.size)] / n if n else np.full(top_n.shape, np.nan)
    space = float(ds.sizes["expert"]) ** len(layers)
    entropy = _entropy_bits(counts / n) if n else np.nan
    return xr.Dataset({
        "n_paths": int(counts.size), "tokens": n, "entropy": entropy,
        "max_entropy": float(np.log2(min(n, space))) if n else np.nan,
        "coverage": (("top_n",), coverage), "uniform_coverage": (("top_n",), np.minimum(top_n / space, 1.0))},
        coords={"top_n": top_n}, attrs={"layers": [int(x) for x in layers], "units": "bits"})


def top_paths(ds: xr.Dataset, layers: Sequence[int] | None = None, n: int = 20) -> xr.Dataset:
    """The n most frequent first-choice paths over a window of layers.

    Returns:
      Dataset (rank, layer) `path` (the first-choice experts), with `count` and `share` (rank,);
      ties: lexicographically smaller path first. Fewer than n ranks if fewer paths exist.
    """
    paths, counts, layers = _path_counts(ds, layers)
    total = counts.sum()
    paths, counts = paths[:n], counts[:n]
    share = counts / total if total else counts.astype(np.float64)
    return xr.Dataset({"path": (("rank", "layer"), paths), "count": (("rank",), counts),
                       "share": (("rank",), share)},
                      coords={"rank": np.arange(counts.size), "layer": np.asarray(layers)})
