"""Attribution of the FFN updates: every number checked against plain loops over the recorded
arrays and the raw parameters, the logits recomputed from the last residual against the
model's own, and the dense (Grok-2) path on a synthetic Dataset."""

import dataclasses
import math

import ml_dtypes
import numpy as np
import pytest
import xarray as xr

import grokscope as gs
from grokscope.analysis import direct_logit_attribution, ffn_shares, readout_weights
from grokscope.widgets import AttributionExplorer, figures
from grokscope.widgets.attribution import sequence_attribution

PROMPT = "The cat sat on the mat."
SPEC = gs.RecordSpec(routing=True, residual="all", expert_outputs="all")


@pytest.fixture(scope="module")
def session(bundled_session):
    return bundled_session


@pytest.fixture(scope="module")
def ds(session):
    return session.run(PROMPT, record=SPEC)


@pytest.fixture(scope="module")
def readout(session):
    return readout_weights(session.params, session.config)


@pytest.fixture(scope="module")
def raw(session):
    """The readout parameters read here by their literal paths, float64, and the output
    multiplier rounded to bfloat16 as Grok-1's release applies it."""
    p, c = session.params, session.config
    return dict(
        W=np.asarray(p["language_model/in_out_embed"]["embeddings"], np.float64),
        fs=np.asarray(p["language_model/rms_norm"]["scale"], np.float64),
        s3=[np.asarray(p[f"transformer/decoder_layer_{i}/rms_norm_3"]["scale"], np.float64)
            for i in range(c.num_layers)],
        mult=float(np.float32(c.output_multiplier_scale).astype(ml_dtypes.bfloat16)),
        eps=c.norm_eps, L=c.num_layers)


def _rms(x, eps):
    return math.sqrt(float(np.mean(np.asarray(x, np.float64) ** 2)) + eps)


def test_readout_weights_are_the_parameters(readout, raw, session):
    assert raw["mult"] == 0.578125 and float(readout["output_multiplier"]) == raw["mult"]
    np.testing.assert_array_equal(readout["unembed"], raw["W"].astype(np.float32))
    np.testing.assert_array_equal(readout["final_scale"], raw["fs"].astype(np.float32))
    np.testing.assert_array_equal(readout["post_ffn_scale"], np.stack(raw["s3"]).astype(np.float32))
    assert float(readout["eps"]) == np.float32(session.config.norm_eps)
    assert not bool(readout["dense_mlp"]) and np.isnan(readout["final_logit_softcap"])
    assert bool(readout["logits_bfloat16"])


def test_readout_weights_of_an_untied_dense_model():
    config = dataclasses.replace(gs.TINY, tied_embeddings=False, dense_ffn_size=32, multipliers_dtype="float32",
                                 final_logit_softcap=50.0, logits_dtype="float32")
    rng = np.random.default_rng(0)
    V, D = config.vocab_size, config.emb_size
    params = {"language_model/in_out_embed": {"embeddings": rng.normal(size=(V, D)).astype(np.float32)},
              "language_model/unembed": {"embeddings": rng.normal(size=(V, D)).astype(ml_dtypes.bfloat16)},
              "language_model/rms_norm": {"scale": rng.normal(size=D).astype(np.float32)}}
    for i in range(config.num_layers):
        params[f"transformer/decoder_layer_{i}/rms_norm_3"] = {"scale": np.full(D, i + 1.0, np.float32)}
    readout = readout_weights(params, config)
    np.testing.assert_array_equal(readout["unembed"], params["language_model/unembed"]["embeddings"].astype(np.float32))
    assert readout["post_ffn_scale"].shape == (config.num_layers, D) and readout["post_ffn_scale"][1, 0] == 2.0
    assert bool(readout["dense_mlp"]) and float(readout["final_logit_softcap"]) == 50.0
    assert float(readout["output_multiplier"]) == float(np.float32(config.output_multiplier_scale))
    assert not bool(readout["logits_bfloat16"])


def test_the_last_residual_through_the_readout_is_the_models_logits(ds, session, raw):
    T = int(ds["length"][0])
    tokens = np.asarray(ds["tokens"].values[0, :T])
    logits = np.asarray(gs.forward(session.params, session.config, tokens[None]).logits[0])  # bf16-rounded
    h = ds["residual"].sel(residual_layer=raw["L"] - 1).values[0, :T].astype(np.float64)
    recomputed = np.stack([raw["mult"] * (raw["W"] @ (h[t] / _rms(h[t], raw["eps"]) * raw["fs"])) for t in range(T)])
    np.testing.assert_allclose(recomputed, logits, rtol=2 ** -8, atol=1e-6)
    ids, p, _ = session.next_token_distributions(tokens, T - 1, n=5)
    z = recomputed[T - 1] - recomputed[T - 1].max()
    np.testing.assert_allclose(np.exp(z[ids]) / np.exp(z).sum(), p, atol=2e-3)
    # the model's own top prediction is what target="argmax" attributes
    d = direct_logit_attribution(ds, readout_weights(session.params, session.config), target="argmax")
    chosen = d["target"].values[0, :T]
    assert np.array_equal(logits[np.arange(T), chosen], logits.max(-1))
    # the recomputed target logit is the model's (pre-cap; Grok-1 has no cap)
    np.testing.assert_allclose(d["target_logit"].values[0, :T], logits[np.arange(T), chosen], rtol=2 ** -8)


def _expected_grok1(ds, raw):
    """expert_dla [T, layer, slot] by loops, for target = the next token (NaN at the last)."""
    T = int(ds["length"][0])
    v = {name: ds[name].values[0] for name in ("tokens", "expert_index", "expert_gate", "expert_output",
                                                "moe_output")}
    h = ds["residual"].sel(residual_layer=raw["L"] - 1).values[0]
    layers = list(ds["expert_layer"].values)
    K = ds.sizes["slot"]
    out = np.full((T, len(layers), K), np.nan)
    for t in range(T - 1):
        row = raw["W"][v["tokens"][t + 1]] * raw["fs"]
        R = _rms(h[t], raw["eps"])
        for li, layer in enumerate(layers):
            r = _rms(v["moe_output"][t, li], raw["eps"])
            for k in range(K):
                e = v["expert_index"][t, layer, k]
                g = float(v["expert_gate"][t, layer, k])
                update = raw["s3"][layer] * g * v["expert_output"][t, li, e].astype(np.float64) / r
                out[t, li, k] = raw["mult"] * float(row @ update) / R
    return out


def test_direct_logit_attribution_by_loops(ds, readout, raw):
    d = direct_logit_attribution(ds, readout)
    T = int(ds["length"][0])
    expected = _expected_grok1(ds, raw)
    got = d["expert_dla"].values[0, :T]
    assert np.array_equal(np.isnan(got), np.isnan(expected)) and np.isnan(got[T - 1]).all()
    scale = np.nanmax(np.abs(expected))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * scale)
    assert np.array_equal(d["dense_dla"].values[0, :T - 1], np.zeros((T - 1, ds.sizes["expert_layer"])))
    assert list(d["target"].values[0, :T]) == list(ds["tokens"].values[0, 1:T]) + [-1]
    # the baseline: the same contributions to the mean logit over the vocabulary
    t, li, k = 2, 1, 0
    layer = int(ds["expert_layer"][li])
    e = int(ds["expert_index"].values[0, t, layer, k])
    h = ds["residual"].sel(residual_layer=raw["L"] - 1).values[0, t]
    update = raw["s3"][layer] * float(ds["expert_gate"].values[0, t, layer, k]) * \
        ds["expert_output"].values[0, t, li, e] / _rms(ds["moe_output"].values[0, t, li], raw["eps"])
    base = raw["mult"] * float((raw["W"].mean(0) * raw["fs"]) @ update) / _rms(h, raw["eps"])
    assert d["expert_dla_baseline"].values[0, t, li, k] == pytest.approx(base, rel=1e-4, abs=1e-6)


def test_the_slots_sum_to_the_whole_update_from_moe_output_alone(ds, readout, raw):
    d = direct_logit_attribution(ds, readout)
    T = int(ds["length"][0])
    moe = ds["moe_output"].values[0]
    h = ds["residual"].sel(residual_layer=raw["L"] - 1).values[0]
    tokens = ds["tokens"].values[0]
    for t in range(T - 1):
        for li, layer in enumerate(ds["expert_layer"].values):
            update = raw["s3"][layer] * moe[t, li] / _rms(moe[t, li], raw["eps"])  # rms_norm_3(ffn)
            whole = raw["mult"] * float((raw["W"][tokens[t + 1]] * raw["fs"]) @ update) / _rms(h[t], raw["eps"])
            parts = float(d["expert_dla"].values[0, t, li].sum() + d["dense_dla"].values[0, t, li])
            assert parts == pytest.approx(whole, rel=1e-4, abs=1e-5)


def test_ffn_shares_by_loops_and_lazily(ds):
    shares = ffn_shares(ds)
    T = int(ds["length"][0])
    moe = ds["moe_output"].values[0]
    residual = ds["residual"].values[0]
    for t in range(T):
        for li in range(ds.sizes["expert_layer"]):
            h = residual[t, list(ds["residual_layer"].values).index(ds["expert_layer"].values[li])]
            assert shares["routed_norm"].values[0, t, li] == pytest.approx(np.linalg.norm(moe[t, li]), rel=1e-5)
            assert shares["routed_projection"].values[0, t, li] == pytest.approx(
                float(moe[t, li] @ h) / np.linalg.norm(h), rel=1e-4, abs=1e-5)
    assert (shares["dense_norm"].values == 0).all() and (shares["dense_projection"].values == 0).all()
    assert (shares["routed_share"].values == 1).all() and not shares.attrs["dense_mlp"]
    lazy = ffn_shares(ds.chunk({"position": 4}))
    assert all(v.chunks is not None for v in lazy.data_vars.values())
    xr.testing.assert_allclose(lazy.compute(), shares)


def test_missing_records_are_named(ds, readout):
    with pytest.raises(ValueError, match=r"residual after the last layer \(3\).*RecordSpec\(routing=True, "
                                         r"residual=\(3,\), expert_outputs='all'\)"):
        direct_logit_attribution(ds.drop_vars("residual"), readout)
    with pytest.raises(ValueError, match="needs expert_output: record them with RecordSpec"):
        direct_logit_attribution(ds.drop_vars("expert_output"), readout)
    with pytest.raises(ValueError, match="ffn_shares needs moe_output"):
        ffn_shares(ds.drop_vars("moe_output"))
    with pytest.raises(ValueError, match="has a dense MLP but the Dataset has no mlp_output"):
        direct_logit_attribution(ds, {**readout, "dense_mlp": np.asarray(True)})
    with pytest.raises(ValueError, match="target 'previous'"):
        direct_logit_attribution(ds, readout, target="previous")


# A synthetic Grok-2-like Dataset: a dense MLP beside the experts, padding, a subset of layers.

S, P, L, E, K, D, V = 2, 5, 3, 4, 2, 6, 11
EXPERT_LAYERS, RESIDUAL_LAYERS, LENGTHS = (0, 2), (1, 2), (5, 3)


@pytest.fixture(scope="module")
def dense_case():
    rng = np.random.default_rng(7)
    index = np.stack([np.stack([rng.permutation(E)[:K] for _ in range(S * P)]).reshape(S, P, K) for _ in range(L)],
                     axis=2).astype(np.int8)  # [S, P, L, K]
    gate = rng.uniform(0.05, 0.6, size=(S, P, L, K)).astype(np.float32)
    expert_output = rng.normal(size=(S, P, len(EXPERT_LAYERS), E, D)).astype(np.float32)
    moe = np.zeros((S, P, len(EXPERT_LAYERS), D), np.float32)
    for s in range(S):
        for p in range(P):
            for li, layer in enumerate(EXPERT_LAYERS):
                for k in range(K):
                    moe[s, p, li] += gate[s, p, layer, k] * expert_output[s, p, li, index[s, p, layer, k]]
    mlp = rng.normal(scale=2.0, size=moe.shape).astype(np.float32)
    residual = rng.normal(scale=3.0, size=(S, P, len(RESIDUAL_LAYERS), D)).astype(np.float32)
    tokens = rng.integers(1, V, size=(S, P)).astype(np.int32)
    ds = xr.Dataset({
        "tokens": (("sequence", "position"), tokens),
        "length": ("sequence", np.array(LENGTHS, np.int32)),
        "expert_index": (("sequence", "position", "layer", "slot"), index),
        "expert_gate": (("sequence", "position", "layer", "slot"), gate),
        "expert_output": (("sequence", "position", "expert_layer", "expert", "hidden"), expert_output),
        "moe_output": (("sequence", "position", "expert_layer", "hidden"), moe),
        "mlp_output": (("sequence", "position", "expert_layer", "hidden"), mlp),
        "residual": (("sequence", "position", "residual_layer", "hidden"), residual),
    }, coords={"layer": np.arange(L), "expert": np.arange(E), "slot": np.arange(K),
               "expert_layer": np.array(EXPERT_LAYERS), "residual_layer": np.array(RESIDUAL_LAYERS)})
    readout = {"post_ffn_scale": rng.uniform(0.5, 1.5, size=(L, D)).astype(np.float32),
               "final_scale": rng.uniform(0.5, 1.5, size=D).astype(np.float32),
               "unembed": rng.normal(size=(V, D)).astype(np.float32),
               "output_multiplier": np.asarray(0.7, np.float32), "eps": np.asarray(1e-5, np.float32),
               "dense_mlp": np.asarray(True), "final_logit_softcap": np.asarray(50.0, np.float32),
               "logits_bfloat16": np.asarray(False)}
    return ds, readout


def _dense_expected(ds, readout, targets):
    """(expert_dla [S, P, layer, slot], dense_dla [S, P, layer]) by loops; NaN where no target."""
    c, eps = 1 / math.sqrt(2), 1e-5
    W, fs, s3, mult = (readout[k].astype(np.float64) for k in ("unembed", "final_scale", "post_ffn_scale",
                                                               "output_multiplier"))
    v = {name: ds[name].values for name in ds.data_vars}
    last = RESIDUAL_LAYERS.index(L - 1)
    expert = np.full((S, P, len(EXPERT_LAYERS), K), np.nan)
    dense = np.full((S, P, len(EXPERT_LAYERS)), np.nan)
    for s in range(S):
        for p in range(LENGTHS[s]):
            if targets[s][p] < 0:
                continue
            row = W[targets[s][p]] * fs
            R = _rms(v["residual"][s, p, last], eps)
            for li, layer in enumerate(EXPERT_LAYERS):
                ffn = c * (v["moe_output"][s, p, li].astype(np.float64) + v["mlp_output"][s, p, li])
                r = _rms(ffn, eps)
                for k in range(K):
                    e = v["expert_index"][s, p, layer, k]
                    update = s3[layer] * c * v["expert_gate"][s, p, layer, k] * v["expert_output"][s, p, li, e] / r
                    expert[s, p, li, k] = mult * float(row @ update) / R
                dense[s, p, li] = mult * float(row @ (s3[layer] * c * v["mlp_output"][s, p, li] / r)) / R
    return expert, dense


def test_the_dense_path_by_loops(dense_case):
    ds, readout = dense_case
    nxt = [[int(ds["tokens"].values[s, p + 1]) if p + 1 < LENGTHS[s] else -1 for p in range(P)] for s in range(S)]
    expert, dense = _dense_expected(ds, readout, nxt)
    for source in (ds, ds.chunk({"sequence": 1})):
        d = direct_logit_attribution(source, readout)
        assert (d["expert_dla"].chunks is not None) == (source is not ds)  # lazy on a dask-backed store
        d = d.compute()
        np.testing.assert_allclose(d["expert_dla"].values, expert, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(d["dense_dla"].values, dense, rtol=1e-5, atol=1e-6)
        assert d["target"].values.tolist() == nxt
    # explicit ids: token 4 everywhere, none (-1) at one position
    ids = np.full((S, P), 4)
    ids[0, 1] = -1
    expert, dense = _dense_expected(ds, readout, ids.tolist())
    d = direct_logit_attribution(ds, readout, target=ids)
    np.testing.assert_allclose(d["expert_dla"].values, expert, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(d["dense_dla"].values, dense, rtol=1e-5, atol=1e-6)
    # argmax: the top of the recomputed (capped) logits
    h = ds["residual"].sel(residual_layer=L - 1).values.astype(np.float64)
    W, fs = readout["unembed"].astype(np.float64), readout["final_scale"].astype(np.float64)
    top = [[int(np.argmax(50 * np.tanh(0.7 * (W @ (h[s, p] / _rms(h[s, p], 1e-5) * fs)) / 50)))
            if p < LENGTHS[s] else -1 for p in range(P)] for s in range(S)]
    assert direct_logit_attribution(ds, readout, target="argmax")["target"].values.tolist() == top


def test_ffn_shares_of_the_dense_path_by_loops(dense_case):
    ds, _ = dense_case
    shares = ffn_shares(ds)
    c = 1 / math.sqrt(2)
    assert shares.attrs["dense_mlp"] and shares.attrs["ffn_multiplier"] == pytest.approx(c)
    for s in range(S):
        for p in range(P):
            for li, layer in enumerate(EXPERT_LAYERS):
                got = {k: float(shares[k].values[s, p, li]) for k in shares.data_vars}
                if p >= LENGTHS[s]:
                    assert all(math.isnan(x) for x in got.values())
                    continue
                moe = c * ds["moe_output"].values[s, p, li].astype(np.float64)
                mlp = c * ds["mlp_output"].values[s, p, li].astype(np.float64)
                routed, dense = np.linalg.norm(moe), np.linalg.norm(mlp)
                assert got["routed_norm"] == pytest.approx(routed, rel=1e-5)
                assert got["dense_norm"] == pytest.approx(dense, rel=1e-5)
                assert got["routed_share"] == pytest.approx(routed / (routed + dense), rel=1e-5)
                if layer in RESIDUAL_LAYERS:
                    h = ds["residual"].values[s, p, RESIDUAL_LAYERS.index(layer)].astype(np.float64)
                    assert got["routed_projection"] == pytest.approx(moe @ h / np.linalg.norm(h), rel=1e-4, abs=1e-6)
                    assert got["dense_projection"] == pytest.approx(mlp @ h / np.linalg.norm(h), rel=1e-4, abs=1e-6)
                else:  # layer 0's residual was not recorded
                    assert math.isnan(got["routed_projection"]) and math.isnan(got["dense_projection"])


def test_a_dense_dataset_needs_a_dense_readout(dense_case):
    ds, readout = dense_case
    with pytest.raises(ValueError, match="has mlp_output but the readout's model has no dense MLP"):
        direct_logit_attribution(ds, {**readout, "dense_mlp": np.asarray(False)})


def test_figures_draw_the_analysis_arrays(ds, readout, dense_case):
    T = int(ds["length"][0])
    shares = ffn_shares(ds).isel(sequence=0, position=slice(0, T))
    d = direct_logit_attribution(ds, readout).isel(sequence=0, position=slice(0, T))
    layers = list(ds["expert_layer"].values)
    pieces = [f"p{t}" for t in range(T)]
    share = shares["routed_share"].values.T
    fig = figures.ffn_share_heatmap(share, shares["routed_norm"].values.T, shares["dense_norm"].values.T, pieces,
                                    layers, position=2, dense=False)
    np.testing.assert_array_equal(np.array(fig.data[0].z, float), share)
    total = (d["expert_dla"].sum("slot") + d["dense_dla"]).values.T  # NaN at the last token
    fig = figures.dla_heatmap(total, pieces, pieces, layers, position=2)
    z = np.array([[np.nan if x is None else x for x in row] for row in fig.data[0].z], float)
    np.testing.assert_array_equal(z, total)
    t = 3
    fig = figures.dla_bars(d["expert_dla"].values[t], d["expert_index"].values[t], d["expert_gate"].values[t], None,
                           layers, ds.sizes["expert"], "title")
    assert len(fig.data) == ds.sizes["slot"]
    for k in range(ds.sizes["slot"]):
        np.testing.assert_array_equal(np.array(fig.data[k].y, float), d["expert_dla"].values[t, :, k])
        assert list(fig.data[k].text) == [f"e{e}" for e in d["expert_index"].values[t, :, k]]
    dense_ds, dense_readout = dense_case
    dd = direct_logit_attribution(dense_ds, dense_readout).isel(sequence=0, position=0)
    fig = figures.dla_bars(dd["expert_dla"].values, dd["expert_index"].values, dd["expert_gate"].values,
                           dd["dense_dla"].values, list(EXPERT_LAYERS), E, "title")
    assert fig.data[-1].name == "dense MLP"
    np.testing.assert_array_equal(np.array(fig.data[-1].y, float), dd["dense_dla"].values)


def test_the_view_builds_with_a_session_and_with_a_dataset(session, ds, readout):
    view = AttributionExplorer(session, prompt=PROMPT)
    assert "color:#b00" not in view.status.value, view.status.value
    T = int(ds["length"][0])
    expected = sequence_attribution(ds, readout, 0)
    view.select(position=2)
    for k in range(ds.sizes["slot"]):
        np.testing.assert_allclose(np.array(view.bars.data[k].y, float), expected.expert_dla[:, 2, k], rtol=1e-6)
    np.testing.assert_array_equal(np.array(view.shares.data[0].z, float), expected.routed_share)
    view.select(target="argmax")
    assert view.attribution.target_mode == "argmax" and (view.attribution.target >= 0).all()
    assert len(view.static_parts()) == 3 and len(view.attribution.pieces) == T
    from_dataset = AttributionExplorer(ds, readout=readout)
    assert from_dataset.attribution is not None and "color:#b00" not in from_dataset.status.value
    with pytest.raises(ValueError, match="readout=readout_weights"):
        AttributionExplorer(ds)
