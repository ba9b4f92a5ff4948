"""What a reader sees in the figures and the report: legible labels and hovers, colors that
stay apart for color-blind readers, interventions marked, long sequences readable. Expected
values are computed here, independently of the drawing code."""

import itertools
import json
import re

import numpy as np
import pytest
import xarray as xr

from grokscope.report import report_sequences, write_report
from grokscope.tokenizer import display_piece
from grokscope.widgets import figures
from grokscope.widgets.data import SequenceRouting, sequence_routing

TABLEAU = ["#4C78A8", "#F58518", "#E45756", "#72B7B2", "#54A24B", "#EECA3B", "#B279A2", "#FF9DA6"]


def _routing(T=10, L=4, E=8, K=2, seed=0, pieces=None) -> SequenceRouting:
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(E), size=(L, T)).astype(np.float32)
    index = np.argsort(-probs, -1)[..., :K]
    return SequenceRouting(pieces=pieces if pieces is not None else [f"t{t}" for t in range(T)],
                           token_ids=np.arange(T), layers=np.arange(L), expert_index=index,
                           expert_gate=np.take_along_axis(probs, index, -1), probs=probs, num_experts=E)


def _dataset(lengths=(12, 193, 9, 30), labels=("code", "code", "prose", "prose"), L=4, E=8, K=2, seed=0,
             skew=1.5) -> xr.Dataset:
    """A store-like Dataset with random routing (expert 0 favored by `skew`)."""
    rng = np.random.default_rng(seed)
    S, P = len(lengths), max(lengths)
    logits = rng.normal(size=(S, P, L, E)).astype(np.float32)
    logits[..., 0] += skew
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    index = np.argsort(-probs, -1)[..., :K].astype(np.int32)
    vocab = ["▁" * 8, "\n", "<0x09>", "<0x51>", "(", ")", "=", "<s>", "a&b"] + [f"▁w{i}" for i in range(55)]
    ds = xr.Dataset({
        "expert_index": (("sequence", "position", "layer", "slot"), index),
        "expert_gate": (("sequence", "position", "layer", "slot"), np.take_along_axis(probs, index, -1)),
        "router_logits": (("sequence", "position", "layer", "expert"), logits),
        "tokens": (("sequence", "position"), rng.integers(0, len(vocab), size=(S, P)).astype(np.int32)),
        "length": (("sequence",), np.array(lengths, np.int32)),
        "label": (("sequence",), np.array(labels)),
        "prompt": (("sequence",), np.array([f"text {i}" for i in range(S)])),
        "vocab_piece": (("vocab",), np.array(vocab)),
    }, coords={"layer": np.arange(L), "expert": np.arange(E), "slot": np.arange(K)})
    ds.attrs = {"model_config": {"num_layers": L, "emb_size": 32}, "status": "complete"}
    return ds


# Color vision: Machado, Oliveira & Fernandes (2009), severity 1.0, on linear RGB; CIE76 in CIELAB (D65).
MACHADO = {
    "protanopia": [[0.152286, 1.052583, -0.204868], [0.114503, 0.786281, 0.099216], [-0.003882, -0.048116, 1.051998]],
    "deuteranopia": [[0.367322, 0.860646, -0.227968], [0.280085, 0.672501, 0.047413], [-0.011820, 0.042940, 0.968881]],
    "tritanopia": [[1.255528, -0.076749, -0.178779], [-0.078411, 0.930809, 0.147602], [0.004733, 0.691367, 0.303900]],
    "normal": np.eye(3),
}


def _linear_rgb(color):
    c = np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)]) / 255
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def _lab(rgb):
    xyz = np.array([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
                    [0.0193339, 0.1191920, 0.9503041]]) @ rgb / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def _closest_pair(palette, vision):
    labs = [_lab(np.clip(np.asarray(MACHADO[vision]) @ _linear_rgb(c), 0, 1)) for c in palette]
    return min(float(np.linalg.norm(a - b)) for a, b in itertools.combinations(labs, 2))


def _contrast(a, b):
    def luminance(color):
        r, g, b = _linear_rgb(color)
        return 0.2126 * r + 0.7152 * g + 0.0722 * b
    hi, lo = sorted([luminance(a), luminance(b)], reverse=True)
    return (hi + 0.05) / (lo + 0.05)


@pytest.mark.parametrize("vision", list(MACHADO))
def test_the_eight_expert_colors_stay_apart_for_color_blind_readers(vision):
    # ΔE76 of 12: clearly different side by side; Tableau's red/green and pink/red pairs fall below it
    assert _closest_pair(figures.expert_colors(8), vision) >= 12
    if vision == "deuteranopia":
        assert _closest_pair(TABLEAU, vision) < 12


def test_more_experts_get_more_colors_and_text_stays_legible():
    colors = figures.expert_colors(20)
    assert len(colors) == 20 and len(set(colors)) == 20 and colors[:8] == figures.expert_colors(8)
    for c in figures.expert_colors(8):
        assert _contrast(c, figures.text_color(c)) >= 4.5, c
    with pytest.warns(DeprecationWarning):
        assert figures.expert_colours(8) == figures.expert_colors(8)


def test_byte_pieces_and_control_characters_are_shown_readably():
    assert display_piece("<0x09>") == "→" and display_piece("<0x0A>") == "↵" and display_piece("<0x20>") == "·"
    assert display_piece("<0x51>") == "Q" and display_piece("<0x3C>") == "<"
    assert display_piece("<0xE2>") == "\\xe2" and display_piece("<0x00>") == "\\x00"
    assert display_piece("▁if") == "·if" and display_piece("a\x07") == "a\\x07"
    assert display_piece("<0x9>") == "<0x9>" and display_piece("<s>") == "<s>"


def test_gate_hovers_show_three_decimals_not_float32_noise():
    r = _routing(T=3)
    r.expert_gate[0, 0, 0] = np.float32(0.649)
    fig = figures.routing_heatmap(r)
    data = json.loads(fig.to_json())["data"][0]
    gates = [cell[3 + 2 * k] for row in data["customdata"] for cell in row for k in range(2)]
    assert data["customdata"][0][0][3] == 0.649
    assert all(len(repr(g).split(".")[-1]) <= 3 for g in gates)
    assert "%{customdata[3]:.3f}" in data["hovertemplate"]


def test_heatmap_cells_show_the_expert_number_in_a_legible_color():
    r = _routing(T=12)
    fig = figures.routing_heatmap(r, layer=1)
    numbers = fig.data[1]
    assert list(numbers.text) == [str(e) for e in r.top1.ravel()]
    colors = figures.expert_colors(8)
    for e, ink in zip(r.top1.ravel(), numbers.textfont.color):
        assert _contrast(colors[e], ink) >= 4.5
    assert len(figures.routing_heatmap(_routing(T=80)).data) == 1  # too narrow for numbers


def test_rerouted_cells_are_boxed_and_named():
    r = _routing(T=12)
    rerouted = np.zeros((4, 12), bool)
    rerouted[1, [2, 5]] = True
    rerouted[3, 11] = True
    fig = figures.routing_heatmap(r, layer=1, rerouted=rerouted, note="ban expert 3 at layer 1")
    boxes = [t for t in fig.data if t.name == "rerouted"]
    assert boxes and all(sorted(zip(t.y, t.x)) == [("1", 2), ("1", 5), ("3", 11)] for t in boxes)
    assert sum(bool(t.showlegend) for t in boxes) == 1 and fig.layout.showlegend
    assert "rerouted under ban expert 3 at layer 1 (3 of 48 cells)" in fig.layout.title.text
    assert "rerouted" in fig.data[0].customdata[1][5][-1] and fig.data[0].customdata[1][4][-1] == ""
    plain = figures.routing_heatmap(r, layer=1, note="no intervention")
    assert not [t for t in plain.data if t.name == "rerouted"] and "no intervention" in plain.layout.title.text
    with pytest.raises(ValueError, match="rerouted must be"):
        figures.routing_heatmap(r, rerouted=rerouted[:, :5])


def test_token_spans_keep_the_expert_color_and_show_the_gate_as_a_bar():
    r = _routing(T=2, L=1)
    r.expert_index[0, :, 0] = 2
    r.expert_gate[0, :, 0] = [0.2, 0.9]
    page = figures.token_html(r, layer=0)
    spans = re.findall(r'<span title="position \d[^"]*" style="([^"]*)">(.*?)</span>', page)
    assert len(spans) == 2
    backgrounds = [re.search(r"background-color:(#[0-9A-F]{6})", style).group(1) for style, _ in spans]
    assert backgrounds == [figures.expert_colors(8)[2]] * 2
    bars = [float(re.search(r"background-size:(\d+)% 3px", style).group(1)) for style, _ in spans]
    assert bars == [20, 90]
    assert all(text.endswith(">2</sub>") for _, text in spans)


def test_attention_hovers_name_positions_and_tokens():
    pieces = ["x", "·=", "·1", "↵"]
    matrix = np.tril(np.full((4, 4), 0.25))
    heat = figures.attention_heatmap(matrix, pieces, "t", query=3).data[0]
    assert list(heat.customdata[3][1]) == [3, "↵", 1, "·="]
    assert "%{x}" not in heat.hovertemplate and "%{y}" not in heat.hovertemplate
    assert "query %{customdata[0]} '%{customdata[1]}'" in heat.hovertemplate
    bars = figures.query_figure(matrix, pieces, 2).data[0]
    assert [list(c) for c in bars.customdata] == [[0, "x"], [1, "·="], [2, "·1"]]
    assert "%{x}" not in bars.hovertemplate


def test_token_ticks_count_whitespace_runs_escape_markup_and_lie_flat_when_short():
    fig = figures.routing_heatmap(_routing(T=4, pieces=["········", "(", "<s>", "a&b"]))
    assert list(fig.layout.xaxis.ticktext) == ["·×8", "(", "&lt;s&gt;", "a&amp;b"]
    assert fig.layout.xaxis.tickangle == 0
    assert figures.routing_heatmap(_routing(T=4, pieces=["·the", "(", ")", "x"])).layout.xaxis.tickangle == -60


def test_next_token_figure_without_intervention_and_with_its_numbers():
    pieces, p, q = ["a", "b"], np.array([0.7, 0.3]), np.array([0.4, 0.6])
    alone = figures.next_token_figure(pieces, p, None, "next token")
    assert len(alone.data) == 1 and not alone.layout.showlegend
    both = figures.next_token_figure(pieces, p, q, "next token", kl=float(np.sum(p * np.log(p / q))), delta_loss=0.05)
    assert [t.name for t in both.data] == ["original", "intervened"]
    assert "KL(original‖intervened) = 0.1838 nats" in both.layout.title.text
    assert "Δloss = +0.0500 nats" in both.layout.title.text
    assert "KL" not in figures.next_token_figure(pieces, p, q, "t").layout.title.text


def _node_boxes(fig):
    """Each drawn node's [top, bottom] in pixels, per column, as plotly sizes them (d3-sankey:
    height = value * min over columns of (H - (n - 1) * pad) / column total)."""
    sankey = fig.data[0]
    H = fig.layout.height - fig.layout.margin.t - fig.layout.margin.b
    E = len(sankey.node.label) // 2
    value = np.zeros(2 * E)
    for s, t, v in zip(sankey.link.source, sankey.link.target, sankey.link.value):
        value[s] += v
        value[t] += v
    columns = [range(E), range(E, 2 * E)]
    ky = min((H - (np.count_nonzero(value[list(c)]) - 1) * sankey.node.pad) / value[list(c)].sum() for c in columns)
    return [[(sankey.node.y[i] * H - value[i] * ky / 2, sankey.node.y[i] * H + value[i] * ky / 2)
             for i in c if value[i] > 0] for c in columns], H


def test_sankey_nodes_never_overlap():
    ds = _dataset(lengths=(40, 40, 40), labels=("a", "b", "a"), skew=3.0)  # expert 0 takes most tokens
    fig = figures.sankey_figure(ds, 0, 3)
    columns, H = _node_boxes(fig)
    for boxes in columns:
        assert boxes[0][0] >= -1e-6 and boxes[-1][1] <= H + 1e-6
        for (_, bottom), (top, _) in zip(boxes, boxes[1:]):
            assert top - bottom >= fig.data[0].node.pad - 1e-6
    # the data is a case where evenly spaced nodes would overlap
    E = 8
    fixed = fig.data[0].node.y
    fig.data[0].node.y = [(e + 0.5) / E for e in range(E)] * 2
    columns, _ = _node_boxes(fig)
    assert any(top < bottom for boxes in columns for (_, bottom), (top, _) in zip(boxes, boxes[1:]))
    fig.data[0].node.y = fixed


def test_long_sequences_are_split_into_rows_with_every_token_labelled():
    ds = _dataset()
    r = sequence_routing(ds, 1)
    assert len(r.pieces) == 193
    fig = figures.routing_windows(r, layer=2)
    lay = fig.layout
    plot_px = lay.width - lay.margin.l - lay.margin.r
    labelled = []
    for name in [k for k in lay.to_plotly_json() if k.startswith("xaxis")]:
        axis = lay[name]
        lo, hi = axis.range
        assert hi - lo <= 64
        assert plot_px * (axis.domain[1] - axis.domain[0]) / (hi - lo) >= 12  # px between tick labels
        assert len(axis.tickvals) == len(axis.ticktext)
        labelled += list(axis.tickvals)
    assert sorted(labelled) == list(range(193))
    heat = [t for t in fig.data if t.type == "heatmap"]
    assert sum(len(t.x) for t in heat) == 193
    assert all(list(t.customdata[0][:, 1]) == list(t.x) for t in heat)  # hover positions are the true positions


def test_report_sequences_take_each_group_in_turn():
    ds = _dataset(lengths=(5, 5, 5, 5, 5), labels=("code", "code", "code", "prose", "math"))
    assert report_sequences(ds, "label", 3) == [0, 3, 4]
    assert report_sequences(ds, "label", 5) == [0, 3, 4, 1, 2]
    assert report_sequences(ds, None, 2) == [0, 1]


def test_report_shows_each_label_a_layer_and_a_legend_of_the_summary(tmp_path):
    ds = _dataset()
    page = write_report(ds, tmp_path / "r.html", sequences=2).read_text()
    shown = re.findall(r"<h3>\d+: \[(\w+)\]", page)
    assert shown == ["code", "prose"]
    assert "Text colored by layer 2 (the middle layer)" in page
    header = page[page.index("<pre>"):].splitlines()[1]
    legend = {part for dt in re.findall(r"<dt>(.*?)</dt>", page) for part in dt.split(", ")}
    for column in ["layer", "load CV", "(null)", "min", "max", "entropy", "gates", "repeat", "random", "load-aw",
                   "shuffle", "p"]:
        assert column in header and column in legend, column
    other = write_report(ds, tmp_path / "r1.html", sequences=1, summary=False, layer=0).read_text()
    assert "Text colored by layer 0," in other and "<b>layer 0</b>" in other
    with pytest.raises(ValueError, match="--layer 9"):
        write_report(ds, tmp_path / "x.html", layer=9, summary=False)
