"""Routing and attention interventions inside the forward: each does what it says, and nothing else."""

import numpy as np
import pytest

from grokscope import TINY, RecordSpec, forward, init_params
from grokscope.interventions import ablate_head, ban, force, renormalize, swap, zero

SPEC = RecordSpec(residual="all")


@pytest.fixture(scope="module")
def setup():
    params = init_params(TINY, seed=4)
    tokens = np.random.default_rng(2).integers(3, TINY.vocab_size, (2, 24))
    base = forward(params, TINY, tokens, record=SPEC)
    return params, tokens, base


def _run(setup, *interventions, dispatch="sparse"):
    params, tokens, _ = setup
    return forward(params, TINY, tokens, record=SPEC, interventions=list(interventions), moe_dispatch=dispatch)


def _ranked(router_logits):
    return np.argsort(-np.asarray(router_logits, np.float64), axis=-1, kind="stable")


@pytest.mark.parametrize("dispatch", ["sparse", "dense"])
def test_ban_of_the_chosen_expert_gives_the_third_choice(setup, dispatch):
    base = _run(setup, dispatch=dispatch)
    layer = 1
    index = np.asarray(base.record["expert_index"])[:, :, layer]  # [B, T, k]
    ranked = _ranked(base.record["router_logits"][:, :, layer])  # [B, T, E]
    expert = int(index[0, 5, 0])  # what token 5 chose first
    out = _run(setup, ban(expert, layer=layer), dispatch=dispatch)
    new = np.asarray(out.record["expert_index"])[:, :, layer]
    probs = np.exp(np.asarray(base.record["router_logits"][:, :, layer], np.float64))
    probs /= probs.sum(-1, keepdims=True)
    for b in range(index.shape[0]):
        for t in range(index.shape[1]):
            if expert in index[b, t]:
                others = [e for e in ranked[b, t] if e != expert][:2]
                assert list(new[b, t]) == others, (b, t)
                if index[b, t, 0] == expert:
                    assert new[b, t, 1] == ranked[b, t, 2]  # the third choice
            else:
                assert list(new[b, t]) == list(index[b, t])
            np.testing.assert_allclose(out.record["expert_gate"][b, t, layer], probs[b, t, new[b, t]], rtol=1e-5)
    assert expert not in new
    # layers before the intervention are untouched, bit for bit
    for name in ("router_logits", "expert_index", "expert_gate", "residual"):
        np.testing.assert_array_equal(np.asarray(out.record[name])[:, :, :layer],
                                      np.asarray(base.record[name])[:, :, :layer])
    assert not np.array_equal(out.logits, base.logits)


def test_zero_of_an_unchosen_expert_changes_nothing(setup):
    _, _, base = setup
    index = np.asarray(base.record["expert_index"])  # [B, T, L, k]
    layer, position = 0, 3
    unchosen = [e for e in range(TINY.num_experts) if e not in index[:, position, layer]]
    out = _run(setup, zero(unchosen[0], layer=layer, positions=[position]))
    np.testing.assert_array_equal(out.logits, base.logits)
    for name, value in base.record.items():
        np.testing.assert_array_equal(out.record[name], value)


def test_zero_of_a_chosen_expert_drops_its_gate_only(setup):
    _, _, base = setup
    index = np.asarray(base.record["expert_index"])
    e = int(index[0, 0, 1, 0])
    out = _run(setup, zero(e, layer=1, positions=[0]))
    gate = np.asarray(out.record["expert_gate"])
    was = np.asarray(base.record["expert_gate"])
    for b in range(index.shape[0]):
        chosen = index[b, 0, 1]
        for slot in range(2):
            expected = 0.0 if chosen[slot] == e else was[b, 0, 1, slot]
            assert gate[b, 0, 1, slot] == expected
    np.testing.assert_array_equal(out.record["expert_index"], index)  # routing itself unchanged
    assert not np.array_equal(np.asarray(out.logits)[0, 0], np.asarray(base.logits)[0, 0])


def test_force_to_the_original_choices_is_the_identity(setup):
    params, tokens, _ = setup
    row = tokens[1:2]  # one sequence: the forced experts are that sequence's own
    base = forward(params, TINY, row, record=SPEC)
    t, layer = 7, 1
    original = [int(e) for e in np.asarray(base.record["expert_index"])[0, t, layer]]
    out = forward(params, TINY, row, record=SPEC, interventions=[force(original, layer=layer, positions=[t])])
    np.testing.assert_array_equal(out.logits, base.logits)
    for name, value in base.record.items():
        np.testing.assert_array_equal(out.record[name], value)


def test_force_and_swap_route_where_told(setup):
    _, _, base = setup
    out = _run(setup, force([6, 1], layer=0, gates=[0.7, 0.3], positions=[2, 3]))
    index = np.asarray(out.record["expert_index"])
    gate = np.asarray(out.record["expert_gate"])
    assert (index[:, [2, 3], 0] == [6, 1]).all() and np.allclose(gate[:, [2, 3], 0], [0.7, 0.3])
    untouched = [t for t in range(index.shape[1]) if t not in (2, 3)]
    np.testing.assert_array_equal(index[:, untouched, 0], np.asarray(base.record["expert_index"])[:, untouched, 0])
    a, b = 0, 5
    out = _run(setup, swap(a, b, layer=1))
    before = np.asarray(base.record["expert_index"])[:, :, 1]
    after = np.asarray(out.record["expert_index"])[:, :, 1]
    np.testing.assert_array_equal(after, np.where(before == a, b, np.where(before == b, a, before)))
    np.testing.assert_array_equal(out.record["expert_gate"][:, :, 1], base.record["expert_gate"][:, :, 1])


def test_renormalize_and_head_ablation(setup):
    _, _, base = setup
    out = _run(setup, renormalize())
    gate = np.asarray(out.record["expert_gate"])
    np.testing.assert_allclose(gate.sum(-1), 1, rtol=1e-6)
    np.testing.assert_allclose(gate[:, :, 0], np.asarray(base.record["expert_gate"])[:, :, 0]
                               / np.asarray(base.record["expert_gate"])[:, :, 0].sum(-1, keepdims=True), rtol=1e-6)
    out = _run(setup, ablate_head(2, layer=1))
    np.testing.assert_array_equal(np.asarray(out.record["residual"])[:, :, 0], np.asarray(base.record["residual"])[:, :, 0])
    assert not np.array_equal(np.asarray(out.record["router_logits"])[:, :, 1],
                              np.asarray(base.record["router_logits"])[:, :, 1])
    # ablating a head at some positions leaves earlier positions alone (causal)
    out = _run(setup, ablate_head(0, positions=[20]))
    np.testing.assert_array_equal(np.asarray(out.logits)[:, :20], np.asarray(base.logits)[:, :20])
    assert not np.array_equal(np.asarray(out.logits)[:, 20], np.asarray(base.logits)[:, 20])


def test_interventions_are_data_and_checked():
    assert ban(3, layer=1) == ban(3, layer=[1]) and hash(ban(3, layer=1)) == hash(ban(3, layer=(1,)))
    assert ban(3, layer=1) != zero(3, layer=1)
    assert ban(2, layer=[1, 0]).describe() == "ban expert 2 (layers 0,1)"
    params = init_params(TINY, seed=0)
    tokens = np.ones((1, 4), int)
    with pytest.raises(ValueError, match="expert 9 out of range"):
        forward(params, TINY, tokens, interventions=[ban(9)])
    with pytest.raises(ValueError, match="layer 5 out of range"):
        forward(params, TINY, tokens, interventions=[zero(1, layer=5)])
    with pytest.raises(ValueError, match="force needs 2 experts"):
        forward(params, TINY, tokens, interventions=[force([1, 2, 3])])
    with pytest.raises(ValueError, match="two different experts"):
        swap(1, 1)


def test_effects_per_position(tmp_path, bundled_session):
    import xarray as xr

    from grokscope import effects, forward
    from grokscope.interventions import ban as ban_

    session = bundled_session
    prompts = ["def add(a, b):\n    return a + b", "The sun rose over the quiet town."]
    base = session.run(prompts)
    layer = 2
    first = np.asarray(base["expert_index"].values)[..., 0]  # [S, P, L]
    expert = int(first[0, 1, layer])
    ds = effects(session, prompts, [ban_(expert, layer=layer)], batch_size=2, metadata={"label": ["code", "prose"]},
                 out=tmp_path / "effects.zarr")
    lengths = ds["length"].values
    for s, n in enumerate(lengths):
        assert not ds["routing_changed"].values[s, :n, :layer].any()  # upstream layers untouched
        assert ds["routing_changed"].values[s, :n, layer][first[s, :n, layer] == expert].all()
        assert np.isfinite(ds["delta_loss"].values[s, :n - 1]).all() and np.isnan(ds["delta_loss"].values[s, n - 1:]).all()
        assert (ds["kl"].values[s, :n - 1] >= -1e-9).all()
    # delta_loss at one position, from two plain forwards
    ids = session.tokenizer.encode(prompts[0])
    a = np.asarray(forward(session.params, session.config, np.array([ids])).logits, np.float64)[0]
    b = np.asarray(forward(session.params, session.config, np.array([ids]),
                           interventions=[ban_(expert, layer=layer)]).logits, np.float64)[0]

    def logp(x, t):
        return x[t, ids[t + 1]] - np.log(np.exp(x[t] - x[t].max()).sum()) - x[t].max()

    assert abs(ds["delta_loss"].values[0, 3] - (logp(a, 3) - logp(b, 3))) < 1e-4
    back = xr.open_zarr(tmp_path / "effects.zarr", consolidated=False)
    np.testing.assert_array_equal(back["routing_changed"].values, ds["routing_changed"].values)
    assert list(back["label"].values) == ["code", "prose"]


@pytest.mark.parametrize("dispatch", ["sparse", "dense"])
def test_expert_outputs_record_what_every_expert_would_say(setup, dispatch):
    params, tokens, _ = setup
    plain = forward(params, TINY, tokens, moe_dispatch=dispatch)
    spec = RecordSpec(expert_outputs=(1,))
    out = forward(params, TINY, tokens, record=spec, moe_dispatch=dispatch)
    np.testing.assert_array_equal(out.logits, plain.logits)  # recording changes nothing
    every = np.asarray(out.record["expert_output"])[:, :, 0]  # [B, T, E, D]
    moe = np.asarray(out.record["moe_output"])[:, :, 0]  # [B, T, D]
    index = np.asarray(out.record["expert_index"])[:, :, 1]
    gate = np.asarray(out.record["expert_gate"])[:, :, 1]
    assert every.shape == tokens.shape + (TINY.num_experts, TINY.emb_size)
    chosen = np.take_along_axis(every, index[..., None].astype(int), axis=2)  # [B, T, k, D]
    np.testing.assert_allclose(moe, (gate[..., None] * chosen).sum(2), rtol=1e-4, atol=1e-5)
    # zeroing an expert removes exactly its recorded contribution
    e = int(index[0, 4, 0])
    zeroed = forward(params, TINY, tokens, record=spec, moe_dispatch=dispatch, interventions=[zero(e, layer=1)])
    expected = moe - np.where((index == e)[..., None], gate[..., None] * chosen, 0).sum(2)
    np.testing.assert_allclose(np.asarray(zeroed.record["moe_output"])[:, :, 0], expected, rtol=1e-4, atol=1e-5)


def test_expert_outputs_in_a_session_dataset(bundled_session):
    session = bundled_session
    ds = session.run(["x = 1", "Hello there"], record=RecordSpec(expert_outputs=(0, 3)))
    assert ds["expert_output"].dims == ("sequence", "position", "expert_layer", "expert", "hidden")
    assert list(ds["expert_layer"].values) == [0, 3] and ds["moe_output"].shape[2] == 2
    assert RecordSpec.parse("routing,expert_outputs:layers=0,3").expert_outputs == (0, 3)


def test_the_british_spellings_still_work_with_a_warning():
    from grokscope import analysis
    from grokscope.interventions import Intervention, renormalise, renormalize

    with pytest.warns(DeprecationWarning, match="use renormalize"):
        assert renormalise(layer=1) == renormalize(layer=1)
    with pytest.warns(DeprecationWarning, match="use 'renormalize'"):
        assert Intervention("renormalise").kind == "renormalize"
    ds = analysis.synthetic_store(np.zeros((1, 4, 1, 2), np.int64), [4])
    with pytest.warns(DeprecationWarning, match="use vocabulary_specialization"):
        old = analysis.vocabulary_specialisation(ds, min_count=1)
    assert old.identical(analysis.vocabulary_specialization(ds, min_count=1))


def test_whole_layer_bans_run_as_data_in_one_program_with_the_same_numbers(bundled_session, monkeypatch):
    from grokscope import runner
    from grokscope.interventions import ban as ban_

    model = bundled_session.loaded_model
    ids = [bundled_session.tokenizer.encode(t) for t in ("def f(x):\n    return x + 1", "The sea was calm.")]
    base = runner.baseline(model, ids, 2)
    sets = [[ban_(3, layer=1)], [ban_(5, layer=2), ban_(0, layer=0)], [ban_(6)]]
    as_data = [runner.compare(model, base, s) for s in sets]
    program = runner._compare_program(model.config, base.compute_dtype, ())
    assert program._cache_size() == 1  # every set above ran in one compiled program
    monkeypatch.setattr(runner, "_as_layer_masks", lambda interventions, config: None)  # the compiled-in bans
    for s, got in zip(sets, as_data):
        want = runner.compare(model, base, s)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"{s}: {name}")
    assert as_data[0]["routing_changed"][:, :, 1].any()  # the ban did reroute tokens
