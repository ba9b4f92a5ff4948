"""Specialization, path and comparison metrics against brute-force loops, plus hand-computable cases."""

import itertools
import math
from collections import Counter, defaultdict

import numpy as np
import pytest
import xarray as xr

from grokscope.analysis.common import synthetic_store
from grokscope.analysis.compare import flip_margin, routing_agreement
from grokscope.analysis.paths import (layer_information, path_statistics, top_paths, transition_information,
                                      transition_matrix)
from grokscope.analysis.specialization import (coactivation, expert_enrichment, group_load, top_tokens_per_expert,
                                               vocabulary_specialization)

E, K = 8, 2


def random_store(seed=0, S=7, P=12, L=4, lengths=None, labels=None, vocab=6):
    """Top-k of random logits, random lengths (including an empty and a full sequence)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(S, P, L, E)).astype(np.float32) * 2
    index = np.argsort(-logits, axis=-1, kind="stable")[..., :K]
    if lengths is None:
        lengths = rng.integers(1, P + 1, S)
        lengths[0], lengths[-1] = 0, P
    if labels is None:
        labels = np.array(list("abc"))[rng.integers(0, 3, S)]
    tokens = rng.integers(0, vocab, (S, P))
    return synthetic_store(index, lengths, router_logits=logits, metadata={"label": labels}, tokens=tokens)


def real(ds):
    """(s, p) of every real token, brute force."""
    length = ds["length"].values
    return [(s, p) for s in range(ds.sizes["sequence"]) for p in range(int(length[s]))]


def idx(ds):
    return ds["expert_index"].values.astype(int)


# ---------------------------------------------------------------------------------------------- specialization


@pytest.mark.parametrize("choice", ["all", "first"])
def test_group_load_matches_loops(choice):
    ds = random_store(1)
    out = group_load(ds, "label", choice)
    index, labels = idx(ds), ds["label"].values
    slots = range(K) if choice == "all" else range(1)
    count = defaultdict(int)
    ntok = Counter()
    for s, p in real(ds):
        ntok[labels[s]] += 1
        for layer in range(ds.sizes["layer"]):
            for r in slots:
                count[labels[s], layer, index[s, p, layer, r]] += 1
    for g in out["group"].values:
        assert out["tokens"].sel(group=g) == ntok[g]
        for layer, e in itertools.product(range(ds.sizes["layer"]), range(E)):
            c = count[g, layer, e]
            assert out["count"].sel(group=g, layer=layer, expert=e) == c
            np.testing.assert_allclose(out["share"].sel(group=g, layer=layer, expert=e), c / (len(slots) * ntok[g]))
    np.testing.assert_allclose(out["share"].sum("expert"), 1.0)
    np.testing.assert_allclose(out["domain_specialization"], len(slots) * out["share"])


def _token_table(ds):
    index = idx(ds)
    tokens = ds["tokens"].values
    table = defaultdict(Counter)  # (layer, token) -> Counter(expert)
    n = Counter()
    for s, p in real(ds):
        n[tokens[s, p]] += 1
        for layer in range(ds.sizes["layer"]):
            table[layer, tokens[s, p]][index[s, p, layer, 0]] += 1
    return table, n


def test_vocabulary_specialization_matches_loops():
    ds = random_store(2, S=9, P=16)
    out = vocabulary_specialization(ds, min_count=5)
    table, n = _token_table(ds)
    kept = sorted(t for t, c in n.items() if c >= 5)
    assert list(out["token"].values) == kept
    for t in kept:
        assert out["count"].sel(token=t) == n[t]
        for layer in range(ds.sizes["layer"]):
            counts = table[layer, t]
            best = max(counts.values())
            top = min(e for e, c in counts.items() if c == best)
            assert out["top_expert"].sel(layer=layer, token=t) == top
            np.testing.assert_allclose(out["top_share"].sel(layer=layer, token=t), best / n[t])


@pytest.mark.parametrize("sort_by", ["count", "share"])
def test_top_tokens_per_expert_matches_loops(sort_by):
    ds = random_store(3, S=9, P=16, vocab=9)
    n_top = 4
    out = top_tokens_per_expert(ds, n=n_top, min_count=3, sort_by=sort_by)
    table, n = _token_table(ds)
    for layer, e in itertools.product(range(ds.sizes["layer"]), range(E)):
        rows = [(table[layer, t][e], table[layer, t][e] / n[t], t) for t in n if n[t] >= 3 and table[layer, t][e] > 0]
        key = (lambda r: (-r[0], r[2])) if sort_by == "count" else (lambda r: (-r[1], -r[0], r[2]))
        rows = sorted(rows, key=key)[:n_top]
        got = out.sel(layer=layer, expert=e)
        expect_tokens = [r[2] for r in rows] + [-1] * (n_top - len(rows))
        assert list(got["token"].values) == expect_tokens
        assert list(got["count"].values[:len(rows)]) == [r[0] for r in rows]
        np.testing.assert_allclose(got["share"].values[:len(rows)], [r[1] for r in rows])


def test_coactivation_matches_loops():
    ds = random_store(4)
    out = coactivation(ds)
    index = idx(ds)
    pair, single = Counter(), Counter()
    for s, p in real(ds):
        for layer in range(ds.sizes["layer"]):
            chosen = set(index[s, p, layer])
            for i in chosen:
                single[layer, i] += 1
                for j in chosen - {i}:
                    pair[layer, i, j] += 1
    for layer, i, j in itertools.product(range(ds.sizes["layer"]), range(E), range(E)):
        assert out["count"].sel(layer=layer, expert=i, expert_j=j) == pair[layer, i, j]
        value = out["coactivation"].sel(layer=layer, expert=i, expert_j=j)
        if single[layer, i]:
            np.testing.assert_allclose(value, pair[layer, i, j] / single[layer, i])
        else:
            assert np.isnan(value)
    # k = 2: every token routed to i is routed to exactly one other expert
    rows = out["coactivation"].sum("expert_j").values
    np.testing.assert_allclose(rows[~np.isnan(out["coactivation"].values).any(-1)], 1.0)


def test_enrichment_matches_loops():
    ds = random_store(5, S=10)
    n_perm = 30
    out = expert_enrichment(ds, "label", n_permutations=n_perm, seed=7)
    index, labels = idx(ds), ds["label"].values
    S, L = ds.sizes["sequence"], ds.sizes["layer"]

    def shares(labels):
        count, ntok = Counter(), Counter()
        for s, p in real(ds):
            ntok[labels[s]] += 1
            for layer, r in itertools.product(range(L), range(K)):
                count[labels[s], layer, index[s, p, layer, r]] += 1
        return count, ntok

    count, ntok = shares(labels)
    total = sum(ntok.values())
    rng = np.random.default_rng(7)
    perms = [shares(labels[rng.permutation(S)]) for _ in range(n_perm)]
    for g, layer, e in itertools.product(out["group"].values, range(L), range(E)):
        cell = out.sel(group=g, layer=layer, expert=e)
        share = count[g, layer, e] / (K * ntok[g])
        overall = sum(count[h, layer, e] for h in ntok) / (K * total)
        rest = (sum(count[h, layer, e] for h in ntok) - count[g, layer, e]) / (total - ntok[g])
        np.testing.assert_allclose(cell["share"], share)
        np.testing.assert_allclose(cell["share_overall"], overall)
        if overall:
            np.testing.assert_allclose(cell["enrichment"], share / overall)
        np.testing.assert_allclose(cell["risk_difference"], count[g, layer, e] / ntok[g] - rest)
        exceed = sum(1 for c, n in perms if n[g] and c[g, layer, e] / (K * n[g]) >= share - 1e-12)
        np.testing.assert_allclose(cell["p_value"], (1 + exceed) / (1 + n_perm))


def planted_store(labels, planted):
    """Random routing, except expert 3 is the first choice at layer 1 in the `planted` sequences."""
    rng = np.random.default_rng(11)
    S, P, L = len(labels), 20, 3
    index = np.stack([rng.permutation(E)[:K] for _ in range(S * P * L)]).reshape(S, P, L, K)
    for s in planted:
        index[s, :, 1, 0] = 3
        index[s, :, 1, 1] = np.where(index[s, :, 1, 1] == 3, 4, index[s, :, 1, 1])
    lengths = rng.integers(10, P + 1, S)
    return synthetic_store(index, lengths, metadata={"label": labels})


def test_planted_specialization_is_significant_and_shuffled_is_not():
    labels = np.array(["a"] * 10 + ["b"] * 10)
    planted = planted_store(labels, planted=range(10))
    out = expert_enrichment(planted, n_permutations=200, seed=0)
    cell = out.sel(group="a", layer=1, expert=3)
    assert cell["p_value"] <= 2 / 201
    assert cell["enrichment"] > 1.5
    assert out.sel(group="b", layer=1, expert=3)["p_value"] > 0.5  # depleted, not enriched
    # the same routing, labels shuffled so that each label holds half of the planted sequences
    shuffled = labels[np.r_[0:5, 10:15, 5:10, 15:20]]
    null = expert_enrichment(planted.assign(label=("sequence", shuffled)), n_permutations=200, seed=0)
    assert null.sel(group="a", layer=1, expert=3)["p_value"] > 0.05
    # and on pure noise few cells are "significant"
    assert float((null["p_value"].sel(layer=[0, 2]) < 0.05).mean()) < 0.2


# ---------------------------------------------------------------------------------------------- paths


def brute_first(ds, layers):
    index = idx(ds)
    return [tuple(index[s, p, layer, 0] for layer in layers) for s, p in real(ds)]


def entropy(counter):
    n = sum(counter.values())
    return -sum(c / n * math.log2(c / n) for c in counter.values() if c)


def test_transition_matrix_and_information_match_loops():
    ds = random_store(6, S=9, P=16)
    pairs = brute_first(ds, [0, 2])
    joint = Counter(pairs)
    out = transition_matrix(ds, 0, 2)
    for i, j in itertools.product(range(E), range(E)):
        assert out["count"].sel(expert_a=i, expert_b=j) == joint[i, j]
        row = sum(joint[i, x] for x in range(E))
        if row:
            np.testing.assert_allclose(out["probability"].sel(expert_a=i, expert_b=j), joint[i, j] / row)
        else:
            assert np.isnan(out["probability"].sel(expert_a=i, expert_b=j))
        np.testing.assert_allclose(out["baseline"].sel(expert_a=i, expert_b=j),
                                   sum(joint[x, j] for x in range(E)) / len(pairs))
    info = transition_information(ds, 0, 2, n_shuffles=5)
    h_a = entropy(Counter(a for a, _ in pairs))
    h_b = entropy(Counter(b for _, b in pairs))
    h_ab = entropy(joint)
    np.testing.assert_allclose(info["entropy_a"], h_a)
    np.testing.assert_allclose(info["entropy_b"], h_b)
    np.testing.assert_allclose(info["conditional_entropy"], h_ab - h_a)
    np.testing.assert_allclose(info["mutual_information"], h_a + h_b - h_ab)
    assert info["tokens"] == len(pairs)
    per_layer = layer_information(ds, lag=2, n_shuffles=5)
    assert list(per_layer["layer"].values) == [0, 1] and list(per_layer["layer_b"].values) == [2, 3]
    xr.testing.assert_allclose(per_layer.sel(layer=0).drop_vars(["layer", "layer_b"]), info)


def test_mutual_information_independent_and_identical_layers():
    rng = np.random.default_rng(8)
    S, P = 40, 256
    index = np.stack([rng.permutation(E)[:K] for _ in range(S * P * 3)]).reshape(S, P, 3, K)
    index[:, :, 2] = index[:, :, 0]
    ds = synthetic_store(index, [P] * S)
    indep = transition_information(ds, 0, 1, n_shuffles=20, seed=1)
    assert float(indep["mutual_information"]) < 0.02  # bits; plug-in bias ~ 49 / (2 N ln 2) = 0.0035
    assert abs(float(indep["mi_excess"])) < 5 * float(indep["mi_baseline_std"]) + 1e-3
    np.testing.assert_allclose(indep["conditional_entropy"], indep["entropy_b"], atol=0.02)
    same = transition_information(ds, 0, 2, n_shuffles=5)
    np.testing.assert_allclose(same["mutual_information"], same["entropy_a"])
    np.testing.assert_allclose(same["conditional_entropy"], 0.0, atol=1e-12)
    np.testing.assert_allclose(same["normalised_mi"], 1.0)
    assert float(same["entropy_a"]) == pytest.approx(3.0, abs=0.01)  # uniform over 8 experts
    assert float(same["mi_baseline"]) < 0.02


def test_path_statistics_match_loops():
    ds = random_store(9, S=9, P=16, L=3)
    layers = [0, 1, 2]
    paths = Counter(brute_first(ds, layers))
    n = sum(paths.values())
    out = path_statistics(ds, layers, top_n=(1, 3, 1000))
    assert out["n_paths"] == len(paths)
    assert out["tokens"] == n
    np.testing.assert_allclose(out["entropy"], entropy(paths))
    ranked = sorted(paths.items(), key=lambda kv: (-kv[1], kv[0]))
    for top in (1, 3, 1000):
        np.testing.assert_allclose(out["coverage"].sel(top_n=top), sum(c for _, c in ranked[:top]) / n)
    np.testing.assert_allclose(out["uniform_coverage"].sel(top_n=3), 3 / 512)
    best = top_paths(ds, layers, n=5)
    assert [tuple(row) for row in best["path"].values] == [p for p, _ in ranked[:5]]
    assert list(best["count"].values) == [c for _, c in ranked[:5]]
    # one layer: the path entropy is that layer's first-choice entropy
    one = path_statistics(ds, [1])
    np.testing.assert_allclose(one["entropy"], entropy(Counter(brute_first(ds, [1]))))


# ---------------------------------------------------------------------------------------------- compare


def test_store_compared_with_itself():
    ds = random_store(10)
    out = routing_agreement(ds, ds)
    np.testing.assert_array_equal(out["top1_agreement"], 1.0)
    np.testing.assert_array_equal(out["set_match"], 1.0)
    np.testing.assert_array_equal(out["flip_rate"], 0.0)
    flips = out["flip_rate_by_margin"].values
    assert np.all((flips == 0) | np.isnan(flips))
    assert int(out["tokens_by_margin"].sum()) == len(real(ds)) * ds.sizes["layer"]


def test_routing_agreement_matches_loops():
    ds_a = random_store(12, S=9, P=16)
    rng = np.random.default_rng(13)
    logits = ds_a["router_logits"].values + rng.normal(size=ds_a["router_logits"].shape).astype(np.float32) * 0.3
    index = np.argsort(-logits, axis=-1, kind="stable")[..., :K]
    ds_b = synthetic_store(index, ds_a["length"].values, router_logits=logits, tokens=ds_a["tokens"].values)
    bins = (0.0, 0.01, 0.05, 0.2, 1.0)
    out = routing_agreement(ds_a, ds_b, margin_bins=bins)
    ia, ib = idx(ds_a), idx(ds_b)
    logits_a = ds_a["router_logits"].values.astype(np.float64)
    tokens = real(ds_a)
    for layer in range(ds_a.sizes["layer"]):
        top1 = [ia[s, p, layer, 0] == ib[s, p, layer, 0] for s, p in tokens]
        same = [set(ia[s, p, layer]) == set(ib[s, p, layer]) for s, p in tokens]
        np.testing.assert_allclose(out["top1_agreement"].sel(layer=layer), np.mean(top1))
        np.testing.assert_allclose(out["set_match"].sel(layer=layer), np.mean(same))
        np.testing.assert_allclose(out["flip_rate"].sel(layer=layer), 1 - np.mean(same))
        per_bin = defaultdict(list)
        for (s, p), t1, sm in zip(tokens, top1, same):
            x = logits_a[s, p, layer]
            prob = np.sort(np.exp(x - x.max()) / np.exp(x - x.max()).sum())[::-1]
            margin = prob[1] - prob[2]
            b = min(int(np.searchsorted(bins, margin, side="right")) - 1, len(bins) - 2)
            per_bin[b].append((t1, sm))
        for b in range(len(bins) - 1):
            got = out.isel(margin_bin=b).sel(layer=layer)
            assert got["tokens_by_margin"] == len(per_bin[b])
            if per_bin[b]:
                np.testing.assert_allclose(got["flip_rate_by_margin"], 1 - np.mean([m for _, m in per_bin[b]]),
                                           atol=1e-12)
                np.testing.assert_allclose(got["top1_agreement_by_margin"], np.mean([t for t, _ in per_bin[b]]),
                                           atol=1e-12)
            else:
                assert np.isnan(got["flip_rate_by_margin"])
    assert float(out["flip_rate"].max()) > 0  # the perturbation did flip something
    margin = flip_margin(ds_a)
    assert bool(margin.isel(sequence=0).isnull().all())  # the empty sequence is all padding
    from grokscope.analysis.shape import router_margins

    # k = 2: the flip margin is router_margins' margin_23 (one definition, two views)
    xr.testing.assert_allclose(margin.reset_coords(drop=True),
                               router_margins(ds_a)["margin_23"].reset_coords(drop=True).astype(margin.dtype))


def test_compare_rejects_different_prompts():
    ds = random_store(14)
    other_tokens = ds.assign(tokens=ds["tokens"] + 1)
    with pytest.raises(ValueError, match="tokens"):
        routing_agreement(ds, other_tokens)
    with pytest.raises(ValueError, match="layer"):
        routing_agreement(ds, ds.isel(layer=[0, 1]))
    lengths = ds["length"].values.copy()
    lengths[1] = 0 if lengths[1] else 1
    other_length = ds.assign(length=("sequence", lengths))
    with pytest.raises(ValueError, match="length"):
        routing_agreement(ds, other_length)
    with pytest.raises(ValueError, match="tokens"):
        routing_agreement(ds, ds.isel(position=slice(0, 5)))
    # padding may differ (tokens and width): still the same prompts
    out = routing_agreement(ds, garbage_pads(ds, seed=0).isel(position=slice(0, int(ds["length"].max()))))
    np.testing.assert_array_equal(out["set_match"], 1.0)


# ---------------------------------------------------------------------------------------------- padding, laziness


def garbage_pads(ds, seed):
    """Route the padding like a real dump does (random experts, logits and tokens beyond `length`)."""
    rng = np.random.default_rng(seed)
    P, L = ds.sizes["position"], ds.sizes["layer"]
    pad = np.arange(P)[None, :] >= ds["length"].values[:, None]
    index = ds["expert_index"].values.copy()
    index[pad] = rng.integers(0, E, (int(pad.sum()), L, K))
    logits = ds["router_logits"].values.copy()
    logits[pad] = rng.normal(size=(int(pad.sum()), L, E)) * 5
    tokens = ds["tokens"].values.copy()
    tokens[pad] = rng.integers(0, 6, int(pad.sum()))
    return ds.assign(expert_index=(ds["expert_index"].dims, index),
                     router_logits=(ds["router_logits"].dims, logits), tokens=(ds["tokens"].dims, tokens))


def all_metrics(ds, other=None):
    return {
        "group_load": group_load(ds), "vocab": vocabulary_specialization(ds, min_count=2),
        "top_tokens": top_tokens_per_expert(ds, n=3), "coact": coactivation(ds),
        "enrichment": expert_enrichment(ds, n_permutations=20), "transition": transition_matrix(ds, 0, 3),
        "information": transition_information(ds, 0, 3, n_shuffles=3),
        "layer_information": layer_information(ds, n_shuffles=2), "paths": path_statistics(ds, [0, 1, 2]),
        "top_paths": top_paths(ds, [1, 2]), "agreement": routing_agreement(ds, ds if other is None else other),
    }


def test_padding_invariance():
    ds = random_store(15, P=12)
    extra = 30

    def widen(name):
        values = ds[name].values
        return np.concatenate([values, np.repeat(values[:, :1], extra, axis=1)], axis=1)

    padded = synthetic_store(widen("expert_index"), ds["length"].values, router_logits=widen("router_logits"),
                             metadata={"label": ds["label"].values}, tokens=widen("tokens"))
    assert padded.sizes["position"] == ds.sizes["position"] + extra
    padded = garbage_pads(padded, seed=1)
    ds = garbage_pads(ds, seed=2)
    other = garbage_pads(ds, seed=3)
    other_padded = garbage_pads(padded, seed=4)
    before, after = all_metrics(ds, other), all_metrics(padded, other_padded)
    for name in before:
        xr.testing.assert_allclose(before[name].compute(), after[name].compute())


def test_lazy_on_dask_and_same_results():
    ds = random_store(16)
    lazy = ds.chunk({"sequence": 3, "position": 5})
    coact = coactivation(lazy)
    agree = routing_agreement(lazy, lazy)
    assert coact["count"].chunks is not None
    assert agree["set_match"].chunks is not None
    for name, value in all_metrics(lazy).items():
        xr.testing.assert_allclose(value.compute(), all_metrics(ds)[name].compute())
