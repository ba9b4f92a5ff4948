"""The views' data: every figure checked against the stored arrays, computed here by plain loops."""

import html
import json
import re
from types import SimpleNamespace

import numpy as np
import pytest

from grokscope import AttentionSpec, RecordSpec, Session, dump, open_store
from grokscope.widgets import AttentionExplorer, ExpertDashboard, RoutingExplorer, figures
from grokscope.widgets.data import attention_matrix, sequence_routing

PROMPTS = [("def area(r):\n    return 3.14 * r * r\n", "code"), ("The cat sat on the warm mat.", "prose"),
           ("for x in items:\n    total += x", "code"), ("Rain fell all night over the hills.", "prose"),
           ("import sys", "code")]


@pytest.fixture(scope="module")
def session(bundled_session):
    return bundled_session


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    directory = tmp_path_factory.mktemp("widgets")
    prompts = directory / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in PROMPTS))
    out = directory / "s.zarr"
    dump(prompts, out, batch_size=2, progress=False)
    return open_store(str(out)).load()


def _first_choices(ds):
    """[(sequence, position) -> first-choice expert per layer] for real tokens, by a loop."""
    out = []
    for s in range(ds.sizes["sequence"]):
        for p in range(int(ds["length"][s])):
            out.append((s, p, [int(ds["expert_index"].values[s, p, layer, 0]) for layer in range(ds.sizes["layer"])]))
    return out


def test_routing_heatmap_is_the_stored_first_choice(store):
    for s in range(store.sizes["sequence"]):
        r = sequence_routing(store, s)
        fig = figures.routing_heatmap(r, layer=1, position=0)
        z = np.array(fig.data[0].z)
        T = int(store["length"][s])
        assert z.shape == (store.sizes["layer"], T)
        for layer in range(store.sizes["layer"]):
            for t in range(T):
                assert z[layer, t] == store["expert_index"].values[s, t, layer, 0]
                custom = fig.data[0].customdata[layer][t]
                assert custom[2] == store["expert_index"].values[s, t, layer, 0]
                assert custom[4] == store["expert_index"].values[s, t, layer, 1]
                assert abs(custom[3] - store["expert_gate"].values[s, t, layer, 0]) < 1e-3
        assert len(r.pieces) == T and all("▁" not in p and " " not in p for p in r.pieces)


def test_token_probabilities_are_the_router_softmax(store):
    r = sequence_routing(store, 1)
    fig = figures.token_probs_figure(r, position=2)
    bars = np.array([trace.y for trace in fig.data])  # [expert, layer]
    logits = store["router_logits"].values[1, 2].astype(np.float64)  # [layer, expert]
    expected = np.exp(logits - logits.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    np.testing.assert_allclose(bars.T, expected, atol=1e-6)
    assert np.allclose(bars.sum(0), 1, atol=1e-5)


def test_token_html_colours_each_token_by_its_expert(store):
    r = sequence_routing(store, 0)
    colours = figures.expert_colors(r.num_experts)
    page = figures.token_html(r, layer=2)
    spans = re.findall(r'<span title="position (\d+), layer 2: [^"]*" style="background-color:(#[0-9A-F]{6});', page)
    assert len(spans) == len(r.pieces)
    for position, colour in spans:
        e = int(store["expert_index"].values[0, int(position), 2, 0])
        assert colours[e] == colour


def test_sankey_flows_sum_to_the_token_count_and_match_a_count(store):
    fig = figures.sankey_figure(store, 0, 3)
    link = fig.data[0].link
    tokens = int(store["length"].sum())
    assert sum(link.value) == tokens
    E = store.sizes["expert"]
    counts = np.zeros((E, E), int)
    for _, _, first in _first_choices(store):
        counts[first[0], first[3]] += 1
    got = np.zeros((E, E), int)
    for s, t, v in zip(link.source, link.target, link.value):
        got[s, t - E] += v
    np.testing.assert_array_equal(got, counts)


def test_load_and_group_bars_match_counts(store):
    E, K = store.sizes["expert"], store.sizes["slot"]
    counts = np.zeros((store.sizes["layer"], E))
    group_counts = {"code": np.zeros(E), "prose": np.zeros(E)}
    for s in range(store.sizes["sequence"]):
        for p in range(int(store["length"][s])):
            for layer in range(store.sizes["layer"]):
                for k in range(K):
                    e = int(store["expert_index"].values[s, p, layer, k])
                    counts[layer, e] += 1
                    if layer == 1:
                        group_counts[str(store["label"].values[s])][e] += 1
    load = np.array([trace.y for trace in figures.load_figure(store).data]).T  # [layer, expert]
    np.testing.assert_allclose(load, counts / counts.sum(1, keepdims=True))
    bars = {trace.name.split(" ")[0]: np.array(trace.y) for trace in figures.group_figure(store, "label", 1).data}
    for group, c in group_counts.items():
        np.testing.assert_allclose(bars[group], c / c.sum())


def test_coactivation_and_top_tokens_match_counts(store):
    E = store.sizes["expert"]
    pair, single = np.zeros((E, E)), np.zeros(E)
    token_counts = [dict() for _ in range(E)]
    for s in range(store.sizes["sequence"]):
        for p in range(int(store["length"][s])):
            a, b = (int(x) for x in store["expert_index"].values[s, p, 2])
            pair[a, b] += 1
            pair[b, a] += 1
            single[a] += 1
            single[b] += 1
            token = int(store["tokens"].values[s, p])
            token_counts[a][token] = token_counts[a].get(token, 0) + 1
    z = np.array(figures.coactivation_figure(store, 2).data[0].z, dtype=float)
    expected = np.where(single[:, None] > 0, pair / np.maximum(single[:, None], 1), np.nan)
    np.testing.assert_allclose(z, expected)
    table = figures.top_tokens_figure(store, 2, n=3).data[0]
    for e in range(E):
        if not token_counts[e]:
            continue
        best = max(token_counts[e].values())
        first_cell = table.cells.values[e][0]
        assert first_cell.endswith(f"({best})"), (e, first_cell, best)
    page = figures.top_tokens_html(store, 2, n=3)
    assert page.count("<tr>") == 4 and all(html.escape(c) in page for col in table.cells.values for c in col)


@pytest.mark.parametrize("fmt", ["full", "head_mean", "topk"])
def test_attention_matrix_from_every_format(session, fmt):
    texts = ["def f(a, b):\n    return a + b", "Once upon a time"]
    full = session.run(texts, record=RecordSpec(routing=False, attention=AttentionSpec(format="full")))
    spec = {"full": AttentionSpec(format="full"), "head_mean": AttentionSpec(format="head_mean"),
            "topk": AttentionSpec(format="topk", k=3)}[fmt]
    ds = session.run(texts, record=RecordSpec(routing=False, attention=spec))
    T = int(ds["length"][0])
    dense = full["attn_weights"].values[0, 1].astype(np.float32)[:, :T, :T]  # [head, query, key] at layer 1
    got = attention_matrix(ds, 0, layer=1, head=None)
    assert got.shape == (T, T)
    if fmt == "topk":
        expected = np.zeros((T, T), np.float32)
        for h in range(dense.shape[0]):
            for q in range(T):
                for key in np.argsort(-dense[h, q])[:3]:
                    if key <= q:
                        expected[q, key] += dense[h, q, key]
        expected /= dense.shape[0]
        np.testing.assert_allclose(got, expected, atol=2e-3)
        head0 = attention_matrix(ds, 0, layer=1, head=0)
        assert ((head0 > 0).sum(1) == np.minimum(np.arange(T) + 1, 3)).all()
    else:
        np.testing.assert_allclose(got, dense.mean(0), atol=2e-3)
        assert np.allclose(got.sum(1), 1, atol=5e-3)
    if fmt == "full":
        np.testing.assert_array_equal(attention_matrix(ds, 0, layer=1, head=2), dense[2])
    if fmt == "head_mean":
        with pytest.raises(ValueError, match="mean over heads"):
            attention_matrix(ds, 0, layer=1, head=0)
    explorer = AttentionExplorer(ds)
    explorer.select(layer=1, head=None, query=T - 1)
    z = np.array(explorer.heatmap.data[0].z, dtype=float)
    causal = np.tril(np.ones((T, T), bool))
    np.testing.assert_allclose(z[causal], got[causal], atol=1e-6)
    assert np.isnan(z[~causal]).all()
    np.testing.assert_allclose(explorer.per_query.data[0].y, got[T - 1, :T], atol=1e-6)


def test_routing_explorer_follows_its_controls(store):
    explorer = RoutingExplorer(store, sequence=0)
    explorer.sequence.value = 3
    T = int(store["length"][3])
    assert np.array(explorer.heatmap.data[0].z).shape == (store.sizes["layer"], T)
    explorer.select(layer=1)
    frame = explorer.heatmap.layout.shapes[0]
    assert (frame.y0, frame.y1) == (0.5, 1.5) and "framed: layer 1" in explorer.heatmap.layout.title.text
    assert "<b>layer 1</b>" in explorer.text.value
    # a click on the heatmap cell (layer 3, token 2) selects both
    explorer._clicked(explorer.heatmap.data[0], SimpleNamespace(point_inds=[(3, 2)], xs=[2], ys=["3"]), None)
    assert explorer.layer.value == 3 and explorer.position.value == 2
    assert f"token 2 '{sequence_routing(store, 3).pieces[2]}'" in explorer.probs.layout.title.text


def test_live_session_explorer_runs_what_is_typed(session):
    explorer = RoutingExplorer(session, prompt="x = 1")
    first = np.array(explorer.heatmap.data[0].z).shape
    explorer.prompt.value = "print('hello, world')\nprint('again')"
    explorer.run_button.click()
    ds = explorer.source.dataset
    assert ds["prompt"].values[0] == explorer.prompt.value
    assert np.array(explorer.heatmap.data[0].z).shape == (4, int(ds["length"][0])) != first


def test_dashboard_on_a_session_and_its_errors(session, store):
    board = ExpertDashboard(session, prompts=[t for t, _ in PROMPTS], labels=[l for _, l in PROMPTS])
    assert board.by.value == "label"
    assert sum(board.sankey.data[0].link.value) == int(store["length"].sum())
    board.select(layer_a=1, layer_b=2)
    assert "layer 1 → layer 2" in board.sankey.layout.title.text
    with pytest.raises(ValueError, match="needs prompts"):
        ExpertDashboard(session)
    with pytest.raises(TypeError, match="Session or an xarray Dataset"):
        RoutingExplorer(42)
    with pytest.raises(ValueError, match="no attention record"):
        AttentionExplorer(store)


def _softmax(logits) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    p = np.exp(x - x.max())
    return p / p.sum()


def test_routing_explorer_intervention_shows_the_intervened_next_token(session):
    from grokscope import forward
    from grokscope.interventions import ban
    from grokscope.tokenizer import display_piece

    explorer = RoutingExplorer(session, prompt="for value in values:\n    total")
    ids = explorer.routing.token_ids
    position = len(ids) - 2
    explorer.select(layer=1, position=position)
    assert len(explorer.next_token.data) == 1  # no intervention: the original bars only
    title = explorer.next_token.layout.title.text
    assert f"(position {position}), no intervention" in title and "KL" not in title
    chosen = int(explorer.routing.expert_index[1, position, 0])
    explorer.expert.value = chosen
    explorer.action.value = "ban"
    assert explorer.interventions() == [ban(chosen, layer=1)]
    p = _softmax(forward(session.params, session.config, np.array([ids])).logits[0, position])
    q = _softmax(forward(session.params, session.config, np.array([ids]),
                         interventions=[ban(chosen, layer=1)]).logits[0, position])
    shown = dict(zip(explorer.next_token.layout.xaxis.ticktext, explorer.next_token.data[1].y))
    for token in np.argsort(-q)[:5]:
        assert abs(shown[figures.token_label(display_piece(session.tokenizer.pieces([int(token)])[0]))]
                   - q[token]) < 1e-6
    # the numbers: KL(original||intervened) at the position, and the change of the next token's loss
    kl = float(np.sum(p * (np.log(p) - np.log(q))))
    delta = float(np.log(p[ids[position + 1]]) - np.log(q[ids[position + 1]]))
    effect = explorer.effect
    assert effect.kl == pytest.approx(kl, abs=1e-5) and effect.delta_loss == pytest.approx(delta, abs=1e-5)
    title = explorer.next_token.layout.title.text
    assert f"under ban expert {chosen} (layer 1)" in title
    assert f"KL(original‖intervened) = {effect.kl:.4f} nats" in title
    assert f"Δloss = {effect.delta_loss:+.4f}" in title
    explorer.select(position=len(ids) - 1)  # the last token has no next token: no Δloss
    assert explorer.effect.delta_loss is None and "Δloss" not in explorer.next_token.layout.title.text
    explorer.action.value = "none"
    assert len(explorer.next_token.data) == 1 and "no intervention" in explorer.next_token.layout.title.text


def test_rerouted_tokens_are_an_independent_comparison_of_two_runs(session):
    from grokscope import forward
    from grokscope.interventions import ban, zero

    explorer = RoutingExplorer(session, prompt="import os\nfor name in os.listdir(path):\n    print(name)")
    ids = np.array([explorer.routing.token_ids])
    explorer.select(layer=1)
    first = int(np.bincount(explorer.routing.expert_index[1, :, 0]).argmax())  # the busiest first choice
    explorer.expert.value = first
    for action, make in (("ban", ban), ("zero", zero)):
        explorer.action.value = action
        original = np.asarray(forward(session.params, session.config, ids).record["expert_index"][0])
        changed = np.asarray(forward(session.params, session.config, ids,
                                     interventions=[make(first, layer=1)]).record["expert_index"][0])
        expected = np.array([[set(original[t, layer]) != set(changed[t, layer]) for t in range(ids.shape[1])]
                             for layer in range(session.config.num_layers)])  # [layer, token]
        np.testing.assert_array_equal(explorer.effect.rerouted, expected)
        assert not expected[:1].any()  # nothing changes upstream of the intervention
        if action == "ban":
            assert expected[1].sum() == (original[:, 1] == first).any(-1).sum()  # every token that chose it
        else:
            assert not expected[1].any()  # zero keeps the routing at its layer
        title = explorer.heatmap.layout.title.text
        assert f"{make(first, layer=1).describe()}" in title and f"({int(expected.sum())} of {expected.size} cells)" \
            in title
    explorer.action.value = "none"
    assert explorer.effect.rerouted is None and "rerouted" not in explorer.heatmap.layout.title.text


def test_panels_name_the_state_they_show_and_are_marked_while_it_is_computed(session, monkeypatch):
    from grokscope.widgets.base import UPDATING

    explorer = RoutingExplorer(session, prompt="while True:\n    break")
    T = len(explorer.routing.pieces)
    titles = []
    run_one = session._run_one

    def watched(*args, **kwargs):
        titles.append((explorer.heatmap.layout.title.text, explorer.next_token.layout.title.text))
        return run_one(*args, **kwargs)

    monkeypatch.setattr(session, "_run_one", watched)
    explorer.action.value = "ban"
    for expert in (3, 5, 3):
        titles.clear()
        explorer.expert.value = expert
        if expert == 5:  # computed now: both panels said so meanwhile
            assert titles and all(h.startswith(UPDATING) and n.startswith(UPDATING) for h, n in titles)
        else:  # seen before: shown at once
            assert not titles or not explorer.status.value.startswith("<span style=\"color:#b00")
        assert f"under ban expert {expert} (layer 0)" in explorer.next_token.layout.title.text
        assert f"ban expert {expert} (layer 0)" in explorer.heatmap.layout.title.text
    explorer.select(layer=2)
    assert "framed: layer 2" in explorer.heatmap.layout.title.text
    assert "ban expert 3 (layer 2)" in explorer.heatmap.layout.title.text
    assert "under ban expert 3 (layer 2)" in explorer.next_token.layout.title.text
    explorer.select(position=1)
    assert f"token 1 '{figures.token_label(explorer.routing.pieces[1])}'" in explorer.probs.layout.title.text
    assert "(position 1) under" in explorer.next_token.layout.title.text
    titles.clear()
    explorer.prompt.value = "x = [1, 2, 3]"
    explorer.run_button.click()
    assert titles and all(h.startswith(UPDATING) and n.startswith(UPDATING) for h, n in titles)
    assert len(explorer.routing.pieces) != T or explorer.routing.pieces[0] == "x"
    assert not any(w.layout.title.text.startswith(UPDATING) for w in (explorer.heatmap, explorer.probs,
                                                                      explorer.next_token))


def test_views_follow_the_notebook_width(session, store):
    from grokscope.widgets.base import FigureWidget

    board = ExpertDashboard(store)
    for figs in ((board.load, board.entropy), (board.coactivation, board.groups)):
        row = next(c for c in board.children
                   if [id(cell.children[0]) for cell in getattr(c, "children", ()) if getattr(cell, "children", ())]
                   == [id(f) for f in figs])
        assert row.layout.flex_flow == "row wrap"
        assert all(cell.layout.flex.endswith("px") and cell.layout.min_width == "0" for cell in row.children)
    controls = next(c for c in board.children if getattr(c, "children", None) and board.layer in c.children)
    assert board.by in controls.children  # "group by" beside the layer it shares with the group chart
    assert board.by not in next(c for c in board.children if getattr(c, "children", None)
                                and board.layer_a in c.children).children
    explorer = RoutingExplorer(session, prompt="x = 1")
    for view in (board, explorer, AttentionExplorer(session, prompt="x = 1")):
        for w in _figure_widgets(view):
            assert isinstance(w, FigureWidget) and w.layout.width is None and w.layout.autosize is not False


def _figure_widgets(widget):
    import plotly.graph_objects as go

    if isinstance(widget, go.FigureWidget):
        yield widget
    for child in getattr(widget, "children", ()):
        yield from _figure_widgets(child)


def test_generation_view_shows_every_token_with_its_routing(session):
    from grokscope.widgets import GenerationView

    view = GenerationView(session, prompt="x = ", max_new_tokens=5)
    seen = []
    original = view._show
    view._show = lambda: (seen.append(len(view._spans)), original())
    view.generate()
    gen = view.generation
    assert seen[:6] == [0, 1, 2, 3, 4, 5]  # the prompt, then one more token on screen after each step
    total = len(gen.token_ids)
    assert len(view._spans) == total and np.array(view.heatmap.data[0].z).shape == (4, total)
    stored = gen.dataset["expert_index"].values[0, :, 0, 0]
    colours = figures.expert_colors(8)
    for span, e in zip(view._spans, stored):
        assert f"background:{colours[int(e)]}" in span
    view.layer.value = 2
    assert "framed: layer 2" in view.heatmap.layout.title.text


def test_warm_up_compiles_ahead_what_a_new_prompt_runs(session):
    import importlib

    from grokscope import runner
    from grokscope import session as session_module

    forward_module = importlib.import_module("grokscope.forward")
    prompt = "total = 0\n"
    while len(session.tokenizer.encode(prompt)) <= 64:  # into the 80-token bucket
        prompt += "total += 1\n"
    n = len(session.tokenizer.encode(prompt))
    session._warm_up("one", lengths=[n])
    session._warm_up("generate", lengths=[n], total=n + 3)
    session_module._warm_pool().wait()
    one = runner._program(session.config, session.record, session.compute_dtype, "sparse", (), ("last_logprobs",))
    step = forward_module.jitted_decoder(session.config, session.record, session.compute_dtype, "sparse")
    compiled = (one._cache_size(), step._cache_size())
    ds, logprobs = session._run_one(session.tokenizer.encode(prompt), (), n - 2)
    gen = session.generate(prompt, max_new_tokens=3, stop_at_eos=False)
    assert (one._cache_size(), step._cache_size()) == compiled  # nothing new was compiled
    assert int(ds["length"][0]) == n and logprobs.shape == (session.config.vocab_size,)
    assert len(gen.token_ids) == n + 3
