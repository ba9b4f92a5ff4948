"""Routing metrics (load, shape, temporal) against brute-force loops and hand-computable cases."""

import itertools
import math

import numpy as np
import pytest
import xarray as xr

from grokscope.analysis import load, shape, temporal
from grokscope.analysis.common import synthetic_store

E, K = 8, 2


def _random_store(seed=0, S=4, P=9, L=3, lengths=(9, 5, 1, 0), k=K, num_experts=E):
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=1.5, size=(S, P, L, num_experts)).astype(np.float32)
    # a few structured tokens: repeated experts so that repetition is not always ~ baseline
    logits[:, 1::2] = logits[:, 0:-1:2] + 0.1 * rng.normal(size=logits[:, 1::2].shape).astype(np.float32)
    index = np.argsort(-logits, axis=-1, kind="stable")[..., :k]
    return synthetic_store(index, lengths, router_logits=logits, num_experts=num_experts)


@pytest.fixture(scope="module")
def store():
    return _random_store()


# ----------------------------------------------------------------------------- brute force
def _np(ds):
    idx = ds["expert_index"].transpose("sequence", "position", "layer", "slot").values.astype(int)
    logits = ds["router_logits"].transpose("sequence", "position", "layer", "expert").values.astype(np.float64)
    gate = ds["expert_gate"].transpose("sequence", "position", "layer", "slot").values.astype(np.float64)
    return idx, logits, gate, ds["length"].values.astype(int)


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def bf_counts(ds, first):
    idx, _, _, lengths = _np(ds)
    S, _, L, k = idx.shape
    counts = np.zeros((S, L, ds.sizes["expert"]))
    for s in range(S):
        for t in range(lengths[s]):
            for layer in range(L):
                for r in range(1 if first else k):
                    counts[s, layer, idx[s, t, layer, r]] += 1
    return counts


def bf_hard_load(ds, first):
    k = 1 if first else ds.sizes["slot"]
    return bf_counts(ds, first).sum(0) / (k * ds["length"].values.sum())


def bf_soft_load(ds):
    _, logits, _, lengths = _np(ds)
    S, _, L, n = logits.shape
    total = np.zeros((L, n))
    for s in range(S):
        for t in range(lengths[s]):
            for layer in range(L):
                total[layer] += _softmax(logits[s, t, layer])
    return total / lengths.sum()


def bf_per_token(ds, fn):
    """[(layer, value)] lists of fn(probs, gates) over valid tokens -> per-layer means."""
    _, logits, gate, lengths = _np(ds)
    S, _, L, _ = logits.shape
    values = [[] for _ in range(L)]
    for s in range(S):
        for t in range(lengths[s]):
            for layer in range(L):
                values[layer].append(fn(_softmax(logits[s, t, layer]), gate[s, t, layer]))
    return np.array([np.mean(v) for v in values])


def bf_entropy(p, g):
    return -sum(x * math.log(x) for x in p if x > 0) / math.log(len(p))


def bf_sets(ds, choice):
    idx, _, _, lengths = _np(ds)
    k = 1 if choice == "first" else idx.shape[-1]
    return [[[frozenset(idx[s, t, layer, :k]) for t in range(lengths[s])] for s in range(idx.shape[0])]
            for layer in range(idx.shape[2])]


def bf_repetition(ds, choice):
    out = []
    for layer_sets in bf_sets(ds, choice):
        hits = pairs = 0
        for seq in layer_sets:
            for a, b in zip(seq[:-1], seq[1:]):
                hits += bool(a & b)
                pairs += 1
        out.append(hits / pairs)
    return np.array(out)


def bf_load_aware(ds, choice):
    out = []
    for layer_sets in bf_sets(ds, choice):
        tokens = [x for seq in layer_sets for x in seq]
        out.append(np.mean([bool(a & b) for a in tokens for b in tokens]))
    return np.array(out)


def bf_shuffle_expected(ds, choice):
    out = []
    for layer_sets in bf_sets(ds, choice):
        total = pairs = 0
        for seq in layer_sets:
            n = len(seq)
            if n < 2:
                continue
            rate = np.mean([bool(seq[i] & seq[j]) for i in range(n) for j in range(n) if i != j])
            total += rate * (n - 1)
            pairs += n - 1
        out.append(total / pairs)
    return np.array(out)


# ----------------------------------------------------------------------------- vs brute force
@pytest.mark.parametrize("first", [True, False])
def test_load_metrics_match_brute_force(store, first):
    expected = bf_hard_load(store, first)
    got = load.hard_load(store, choice="first" if first else "all")
    assert got.dims == ("layer", "expert") and got.attrs["baseline"] == 1 / E
    np.testing.assert_allclose(got.values, expected, rtol=1e-12)
    np.testing.assert_allclose(got.sum("expert").values, 1.0)
    np.testing.assert_allclose(load.load_cv(store, "first" if first else "all").values, expected.std(1) / expected.mean(1), rtol=1e-12)
    np.testing.assert_allclose(load.max_vio(store, "first" if first else "all").values,
                               (expected.max(1) - expected.mean(1)) / expected.mean(1), rtol=1e-12)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(expected > 0, expected * np.log(expected), 0).sum(1) / np.log(E)
    np.testing.assert_allclose(load.load_entropy(store, "first" if first else "all").values, ent, rtol=1e-12)
    # per-sequence MaxVio: NaN for the empty sequence
    counts = bf_counts(store, first)
    mv = load.max_vio(store, "first" if first else "all", per_sequence=True).values
    assert mv.shape == (4, 3) and np.isnan(mv[3]).all()
    np.testing.assert_allclose(mv[:3], (counts.max(2) - counts.mean(2))[:3] / counts.mean(2)[:3], rtol=1e-12)


def test_soft_load_and_balance_loss_match_brute_force(store):
    P = bf_soft_load(store)
    got = load.soft_load(store)
    np.testing.assert_allclose(got.values, P, rtol=1e-5)
    f1 = bf_hard_load(store, first=True)
    np.testing.assert_allclose(load.balance_loss(store).values, E * (f1 * P).sum(1), rtol=1e-5)
    assert load.balance_loss(store).attrs["baseline"] == 1.0
    # HF Mixtral variant: sum over slots of per-slot shares = k * all-slot load
    fk = bf_hard_load(store, first=False) * K
    mix = load.balance_loss(store, variant="mixtral", alpha=0.01)
    np.testing.assert_allclose(mix.values, 0.01 * E * (fk * P).sum(1), rtol=1e-5)
    assert mix.attrs["baseline"] == pytest.approx(0.01 * K)


@pytest.mark.parametrize("cf", [1.0, 1.25, 2.0])
@pytest.mark.parametrize("batch", ["sequence", "store"])
@pytest.mark.parametrize("first", [True, False])
def test_drop_rate_matches_brute_force(store, cf, batch, first):
    k = 1 if first else K
    counts = bf_counts(store, first)
    lengths = store["length"].values
    if batch == "store":
        counts, lengths = counts.sum(0, keepdims=True), lengths.sum(keepdims=True)
    dropped = np.zeros(counts.shape[1])
    for c, n in zip(counts, lengths):
        cap = math.ceil(cf * k * n / E)
        dropped += np.maximum(c - cap, 0).sum(1)
    got = load.drop_rate(store, cf, batch=batch, choice="first" if first else "all")
    np.testing.assert_allclose(got.values, dropped / (k * lengths.sum()), rtol=1e-12)


def test_shape_metrics_match_brute_force(store):
    np.testing.assert_allclose(shape.mean_router_entropy(store).values, bf_per_token(store, bf_entropy),
                               rtol=1e-5)
    np.testing.assert_allclose(shape.layer_mean(shape.topk_gate_mass(store), store).values,
                               bf_per_token(store, lambda p, g: g.sum()), rtol=1e-5)
    margins = shape.router_margins(store)
    for name, (a, b) in (("margin_12", (0, 1)), ("margin_23", (1, 2))):
        expected = bf_per_token(store, lambda p, g: np.sort(p)[::-1][a] - np.sort(p)[::-1][b])
        np.testing.assert_allclose(shape.layer_mean(margins[name], store).values, expected, rtol=1e-5, atol=1e-7)
    # per-token values: NaN exactly at padding
    entropy = shape.router_entropy(store)
    valid = np.arange(store.sizes["position"])[None, :] < store["length"].values[:, None]
    assert entropy.dims == ("sequence", "position", "layer")
    assert (np.isnan(entropy.values) == ~valid[..., None]).all()
    mass = shape.topk_gate_mass(store).values[valid]
    assert (mass > K / E - 1e-6).all() and (mass < 1).all()


@pytest.mark.parametrize("choice", ["first", "all"])
def test_repetition_matches_brute_force(store, choice):
    got = temporal.repetition_rate(store, choice)
    np.testing.assert_allclose(got.values, bf_repetition(store, choice), rtol=1e-12)
    np.testing.assert_allclose(temporal.load_aware_repetition_baseline(store, choice).values,
                               bf_load_aware(store, choice), rtol=1e-12)
    np.testing.assert_allclose(temporal.shuffle_expected_repetition(store, choice).values,
                               bf_shuffle_expected(store, choice), rtol=1e-12)
    if choice == "first":  # the sum of squared first-choice loads
        np.testing.assert_allclose(temporal.load_aware_repetition_baseline(store, choice).values,
                                   (bf_hard_load(store, True) ** 2).sum(1), rtol=1e-12)


@pytest.mark.parametrize("choice", ["first", "all"])
def test_shuffle_test(store, choice):
    test = temporal.repetition_shuffle_test(store, choice, n_permutations=400, seed=3)
    np.testing.assert_allclose(test["observed"].values, bf_repetition(store, choice), rtol=1e-12)
    expected = bf_shuffle_expected(store, choice)
    # Monte-Carlo mean within 5 standard errors of the exact shuffle expectation
    assert (np.abs(test["shuffle_mean"].values - expected) <= 5 * test["shuffle_std"].values / 20 + 1e-12).all()
    p = test["p_value"].values
    assert ((p > 0) & (p <= 1)).all()
    again = temporal.repetition_shuffle_test(store, choice, n_permutations=400, seed=3, sequences_per_block=1)
    xr.testing.assert_identical(test, again)
    full = temporal.repetition_test(store, choice, n_permutations=50, seed=1)
    assert set(full.data_vars) == {"repetition", "random_baseline", "load_aware_baseline", "shuffle_expected",
                                   "shuffle_mean", "shuffle_std", "p_value"}


def test_shuffle_p_value_detects_structure():
    # long sequences with runs of one expert: repetition far above the shuffle null
    S, P, L = 2, 40, 1
    index = np.zeros((S, P, L, 1), int)
    index[:, :, 0, 0] = (np.arange(P) // 5) % E
    ds = synthetic_store(index, [P, P])
    test = temporal.repetition_shuffle_test(ds, "first", n_permutations=99, seed=0, alternative="greater")
    assert test["observed"].item() == pytest.approx(1 - 7 / 39)
    assert test["p_value"].item() == pytest.approx(0.01)


# ----------------------------------------------------------------------------- hand cases
def test_random_baseline_formula():
    assert temporal.random_repetition_baseline(8, 2, "first") == 1 / 8
    assert temporal.random_repetition_baseline(8, 2, "all") == pytest.approx(13 / 28)
    for n, k in ((8, 2), (6, 3), (5, 1), (7, 3)):
        sets = [frozenset(c) for c in itertools.combinations(range(n), k)]
        brute = np.mean([bool(a & b) for a in sets for b in sets])
        assert temporal.random_repetition_baseline(n, k, "all") == pytest.approx(brute)


def test_load_aware_baseline_equals_random_for_uniform_sets():
    sets = list(itertools.combinations(range(E), K))  # every 2-set once: uniform over sets
    index = np.array(sets)[None, :, None, :]
    ds = synthetic_store(index, [len(sets)])
    assert temporal.load_aware_repetition_baseline(ds, "all").item() == pytest.approx(13 / 28)
    assert temporal.load_aware_repetition_baseline(ds, "first").item() == pytest.approx(
        (bf_hard_load(ds, True) ** 2).sum())


def test_alternating_routing_has_no_repetition():
    P = 10
    index = np.zeros((2, P, 1, K), int)
    index[:, 0::2, 0] = [0, 1]
    index[:, 1::2, 0] = [2, 3]
    ds = synthetic_store(index, [P, 7])
    assert temporal.repetition_rate(ds, "first").item() == 0
    assert temporal.repetition_rate(ds, "all").item() == 0


def test_single_expert_takes_everything():
    S, P, L = 2, 8, 2
    index = np.full((S, P, L, 1), 3)
    logits = np.zeros((S, P, L, E), np.float32)
    logits[..., 3] = 60.0
    ds = synthetic_store(index, [8, 5], router_logits=logits)
    np.testing.assert_allclose(load.load_cv(ds).values, math.sqrt(E - 1))
    assert load.load_cv(ds).attrs["max"] == pytest.approx(math.sqrt(E - 1))
    np.testing.assert_allclose(load.balance_loss(ds).values, E, rtol=1e-6)
    np.testing.assert_allclose(load.max_vio(ds).values, E - 1)
    np.testing.assert_allclose(load.load_entropy(ds).values, 0, atol=0)
    np.testing.assert_allclose(temporal.repetition_rate(ds).values, 1)
    # per sequence at CF 1: capacity ceil(n/E) = 1, so n - 1 of n tokens drop
    np.testing.assert_allclose(load.drop_rate(ds, 1.0).values, (7 + 4) / 13)
    np.testing.assert_allclose(shape.mean_router_entropy(ds).values, 0, atol=1e-6)


def test_round_robin_is_balanced():
    S, P, L = 3, 16, 2
    index = np.zeros((S, P, L, K), int)
    for s in range(S):
        for layer in range(L):
            index[s, :, layer, 0] = (np.arange(P) + s + layer) % E
            index[s, :, layer, 1] = (np.arange(P) + s + layer + 3) % E
    ds = synthetic_store(index, [16, 8, 8])
    for first in (True, False):
        np.testing.assert_allclose(load.load_cv(ds, "first" if first else "all").values, 0, atol=1e-12)
        np.testing.assert_allclose(load.max_vio(ds, "first" if first else "all").values, 0, atol=1e-12)
        np.testing.assert_allclose(load.hard_load(ds, "first" if first else "all").values, 1 / E)
        np.testing.assert_allclose(load.drop_rate(ds, 1.0, choice="first" if first else "all").values, 0)
    np.testing.assert_allclose(load.balance_loss(ds).values, 1.0, rtol=1e-6)
    np.testing.assert_allclose(load.load_entropy(ds).values, 1.0)
    np.testing.assert_allclose(temporal.repetition_rate(ds).values, 0)
    np.testing.assert_allclose(temporal.load_aware_repetition_baseline(ds).values, 1 / E)


def test_cv_sampling_baseline():
    ds = _random_store(seed=5)
    n = ds["length"].values.sum()
    assert load.load_cv_sampling_baseline(ds).item() == pytest.approx(math.sqrt((E - K) / (K * n)))
    assert load.load_cv_sampling_baseline(ds, "first").item() == pytest.approx(math.sqrt((E - 1) / n))


# ----------------------------------------------------------------------------- padding / laziness
def _all_results(ds):
    out = {}
    for first in (True, False):
        out[f"hard{first}"] = load.hard_load(ds, "first" if first else "all")
        out[f"cv{first}"] = load.load_cv(ds, "first" if first else "all")
        out[f"maxvio{first}"] = load.max_vio(ds, "first" if first else "all")
        out[f"maxvio_seq{first}"] = load.max_vio(ds, "first" if first else "all", per_sequence=True)
        out[f"entropy{first}"] = load.load_entropy(ds, "first" if first else "all")
        for batch in ("sequence", "store"):
            out[f"drop{first}{batch}"] = load.drop_rate(ds, 1.25, batch, "first" if first else "all")
    out["soft"] = load.soft_load(ds)
    out["balance"] = load.balance_loss(ds)
    out["balance_mix"] = load.balance_loss(ds, "mixtral")
    out["cv_null"] = load.load_cv_sampling_baseline(ds)
    out["router_entropy"] = shape.mean_router_entropy(ds)
    out["mass"] = shape.layer_mean(shape.topk_gate_mass(ds), ds)
    margins = shape.router_margins(ds)
    out["m12"] = shape.layer_mean(margins["margin_12"], ds)
    out["m23"] = shape.layer_mean(margins["margin_23"], ds)
    for choice in ("first", "all"):
        out[f"rep{choice}"] = temporal.repetition_rate(ds, choice)
        out[f"rep_load{choice}"] = temporal.load_aware_repetition_baseline(ds, choice)
        out[f"rep_shuffle{choice}"] = temporal.shuffle_expected_repetition(ds, choice)
    return out


def test_padding_invariance():
    small = _random_store(seed=7, P=9)
    idx, logits, _, lengths = _np(small)
    S, P, L, _ = logits.shape
    big_P = 23
    rng = np.random.default_rng(1)
    big_logits = rng.normal(size=(S, big_P, L, E)).astype(np.float32)
    big_logits[:, :P] = logits
    big_idx = np.argsort(-big_logits, axis=-1, kind="stable")[..., :K]
    big = synthetic_store(big_idx, lengths, router_logits=big_logits)
    # garbage (real-looking routing) beyond `length`, which every metric must ignore
    valid = np.arange(big_P)[None, :] < lengths[:, None]
    big["expert_index"].values[~valid] = big_idx[~valid]
    big["router_logits"].values[~valid] = big_logits[~valid]
    big["expert_gate"].values[~valid] = 0.9
    a, b = _all_results(small), _all_results(big)
    for name in a:
        np.testing.assert_allclose(b[name].values, a[name].values, rtol=1e-6, atol=1e-9, err_msg=name)
    eager = temporal.repetition_shuffle_test(small, "all", n_permutations=30, seed=2)
    padded = temporal.repetition_shuffle_test(big, "all", n_permutations=30, seed=2)
    xr.testing.assert_allclose(eager, padded)
    for name in ("router_entropy", "margin"):
        per_token = shape.router_entropy(big) if name == "router_entropy" else shape.router_margins(big)["margin_23"]
        assert np.isnan(per_token.values[~valid]).all()


def test_lazy_on_dask():
    eager_ds = _random_store(seed=11)
    lazy_ds = eager_ds.chunk({"sequence": 2})
    eager, lazy = _all_results(eager_ds), _all_results(lazy_ds)
    for name in eager:
        assert lazy[name].chunks is not None, name
        computed = lazy[name].compute()
        assert computed.dims == eager[name].dims, name
        assert computed.attrs == eager[name].attrs, name
        np.testing.assert_allclose(computed.values, eager[name].values, rtol=1e-6, atol=1e-12, err_msg=name)
    for per_token in (shape.router_entropy, shape.topk_gate_mass):
        assert per_token(lazy_ds).chunks is not None
    assert shape.router_margins(lazy_ds)["margin_12"].chunks is not None
    xr.testing.assert_allclose(temporal.repetition_shuffle_test(lazy_ds, "first", 20, seed=4),
                               temporal.repetition_shuffle_test(eager_ds, "first", 20, seed=4))


def test_empty_store_gives_nan_without_warnings():
    ds = _random_store(seed=3, lengths=(0, 0, 0, 0))
    for name, value in _all_results(ds).items():
        assert np.isnan(value.values).all(), name  # no token: every rate is undefined, drops included
    test = temporal.repetition_shuffle_test(ds, "all", n_permutations=5)
    assert np.isnan(test["p_value"].values).all() and np.isnan(test["observed"].values).all()


def test_cv_maximum_with_k_slots():
    index = np.broadcast_to(np.array([5, 2]), (2, 6, 1, K))
    ds = synthetic_store(index, [6, 3])
    cv = load.load_cv(ds)
    np.testing.assert_allclose(cv.values, math.sqrt(E / K - 1))
    assert cv.attrs["max"] == pytest.approx(math.sqrt(E / K - 1))
    np.testing.assert_allclose(load.load_cv(ds, "first").values, math.sqrt(E - 1))


def test_zarr_store_opened_lazily(tmp_path):
    from grokscope.store import open_store

    ds = _random_store(seed=2)
    ds.to_zarr(tmp_path / "s.zarr", zarr_format=3, consolidated=False)
    opened = open_store(str(tmp_path / "s.zarr"))
    eager, lazy = _all_results(ds), _all_results(opened)
    for name in eager:
        assert lazy[name].chunks is not None, name
        np.testing.assert_allclose(lazy[name].values, eager[name].values, rtol=1e-6, atol=1e-12, err_msg=name)


def test_earlier_spellings_of_the_choice_still_work_with_a_warning(store):
    from grokscope.analysis import specialization

    with pytest.warns(DeprecationWarning, match="first_choice_only= is deprecated"):
        old = load.hard_load(store, first_choice_only=True)
    xr.testing.assert_identical(old, load.hard_load(store, choice="first"))
    with pytest.warns(DeprecationWarning, match="choice='any' is deprecated"):
        old = temporal.repetition_rate(store, "any")
    xr.testing.assert_identical(old, temporal.repetition_rate(store, "all"))
    with pytest.warns(DeprecationWarning, match="choice='topk' is deprecated"):
        specialization.group_load(store, by="label", choice="topk") if "label" in store else load.hard_load(store, "topk")
    with pytest.raises(ValueError, match="choice: expected 'first'"):
        load.hard_load(store, choice="second")
