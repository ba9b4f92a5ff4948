"""Plotly figures of routing and attention: pure functions of the data, shared by the
interactive widgets (which wrap them in `FigureWidget`s and update them) and by the static
report (which embeds them in one HTML file).

Every statistic comes from `grokscope.analysis`; this module only draws.
"""

from __future__ import annotations

import html
from typing import Sequence

import numpy as np
import plotly.graph_objects as go
import xarray as xr

from grokscope import analysis
from grokscope.widgets.data import SequenceRouting

__all__ = ["expert_colors", "routing_heatmap", "token_html", "token_probs_figure", "next_token_figure",
           "attention_heatmap",
           "query_figure", "load_figure", "entropy_figure", "coactivation_figure", "sankey_figure",
           "top_tokens", "top_tokens_html", "top_tokens_figure", "group_figure", "subtitled", "FONT"]

# Tableau 10's first eight: distinct in hue and lightness, legible behind dark text.
_EIGHT = ["#4C78A8", "#F58518", "#E45756", "#72B7B2", "#54A24B", "#EECA3B", "#B279A2", "#FF9DA6"]
_MORE = ["#9D755D", "#BAB0AC", "#1F77B4", "#2CA02C", "#D62728", "#9467BD", "#8C564B", "#17BECF",
         "#BCBD22", "#7F7F7F", "#AEC7E8", "#FFBB78", "#98DF8A", "#FF9896", "#C5B0D5", "#C49C94"]
FONT = dict(family="DejaVu Sans, Arial, sans-serif", size=12)
_MARGIN = dict(l=60, r=20, t=70, b=50)


def expert_colors(num_experts: int) -> list[str]:
    """One color per expert: eight distinct ones for Grok's 8 experts, more for larger E."""
    palette = _EIGHT + _MORE
    return [palette[e % len(palette)] for e in range(num_experts)]


def expert_colours(num_experts: int) -> list[str]:
    """Deprecated spelling of `expert_colors`."""
    import warnings

    warnings.warn("expert_colours is deprecated: use expert_colors", DeprecationWarning, stacklevel=2)
    return expert_colors(num_experts)


def _rgba(color: str, alpha: float) -> str:
    r, g, b = (int(color[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha:.3f})"


def _json_safe(z: np.ndarray) -> np.ndarray:
    """z with None where it is NaN: a FigureWidget's JSON carries no NaN (plotly shows a gap)."""
    z = np.asarray(z, dtype=float)
    if not np.isnan(z).any():
        return z
    out = z.astype(object)
    out[np.isnan(z)] = None
    return out


def _discrete_colorscale(colors: Sequence[str]) -> list:
    """A colourscale with one flat band per integer value 0..n-1 (zmin -0.5, zmax n-0.5)."""
    n = len(colors)
    scale = []
    for i, c in enumerate(colors):
        scale += [[i / n, c], [(i + 1) / n, c]]
    return scale


def subtitled(main: str, detail: str = "") -> str:
    """A title, with a smaller second line for the details (short lines: figures sit side by side)."""
    return f"{main}<br><sup>{detail}</sup>" if detail else main


def _layout(fig: go.Figure, title: str, height: int, **kwargs) -> go.Figure:
    fig.update_layout(title=dict(text=title, x=0.01, xanchor="left"), height=height, font=FONT,
                      margin=_MARGIN, template="plotly_white", **kwargs)
    return fig


def _token_axis(pieces: Sequence[str], max_labels: int = 80) -> dict:
    """Tick labels for a token axis: every piece (prefixed by its position when thinned)."""
    T = len(pieces)
    step = max(1, -(-T // max_labels))
    ticks = list(range(0, T, step))
    return dict(tickmode="array", tickvals=ticks, ticktext=[pieces[t] if step == 1 else f"{t}:{pieces[t]}"
                                                            for t in ticks], tickangle=-60)


def routing_heatmap(r: SequenceRouting, layer: int | None = None, position: int | None = None) -> go.Figure:
    """Layer x token heatmap of each token's first-choice expert (one color per expert).

    Hover: token, position, layer, both (all k) chosen experts and their gates. A frame marks
    `layer` (the layer shown in the colored text) and a column `position` (the selected token).
    """
    E = r.num_experts
    colors = expert_colors(E)
    L, T, K = r.expert_index.shape
    custom = np.empty((L, T, 2 + 2 * K), dtype=object)
    custom[..., 0] = np.broadcast_to(np.array(r.pieces, dtype=object), (L, T))
    custom[..., 1] = np.broadcast_to(np.arange(T), (L, T))
    for k in range(K):
        custom[..., 2 + 2 * k] = r.expert_index[..., k]
        custom[..., 3 + 2 * k] = np.round(r.expert_gate[..., k], 3)
    choices = "<br>".join(f"choice {k + 1}: expert %{{customdata[{2 + 2 * k}]}} "
                          f"(gate %{{customdata[{3 + 2 * k}]}})" for k in range(K))
    fig = go.Figure(go.Heatmap(
        z=r.top1.astype(float), x=np.arange(T), y=[str(x) for x in r.layers], customdata=custom,
        colorscale=_discrete_colorscale(colors), zmin=-0.5, zmax=E - 0.5, xgap=1, ygap=1,
        colorbar=dict(title=dict(text="expert"), tickvals=list(range(E)), ticktext=[str(e) for e in range(E)],
                      thickness=14, len=max(160, 18 * E), lenmode="pixels", y=1.0, yanchor="top",
                      tickfont=dict(size=11)),
        hovertemplate="token %{customdata[0]} (position %{customdata[1]})<br>layer %{y}<br>" + choices
                      + "<extra></extra>", name="first-choice expert"))
    row = 28 if L <= 16 else 12
    _layout(fig, routing_title(layer), height=max(120 + 18 * E, 150 + row * L),
            shapes=routing_frames(r, layer, position),
            xaxis=dict(title="token", **_token_axis(r.pieces)), yaxis=dict(title="layer", type="category"))
    return fig


def routing_title(layer: int | None) -> str:
    return "first-choice expert per token and layer" + (f" (framed: layer {layer})" if layer is not None else "")


def routing_frames(r: SequenceRouting, layer: int | None, position: int | None) -> list[dict]:
    """The routing heatmap's frames: a box around `layer`'s row, a dotted one around `position`'s column."""
    L, T = r.expert_index.shape[:2]
    shapes = []
    if layer is not None:
        li = int(np.flatnonzero(r.layers == layer)[0])
        shapes.append(dict(type="rect", xref="x", yref="y", x0=-0.5, x1=T - 0.5, y0=li - 0.5, y1=li + 0.5,
                           line=dict(color="#222", width=2)))
    if position is not None:
        shapes.append(dict(type="rect", xref="x", yref="y", x0=position - 0.5, x1=position + 0.5, y0=-0.5,
                           y1=L - 0.5, line=dict(color="#222", width=2, dash="dot")))
    return shapes


def query_frame(T: int, query: int | None) -> list[dict]:
    """The attention heatmap's frame around the row of `query` (none for None)."""
    if query is None:
        return []
    return [dict(type="rect", xref="x", yref="y", x0=-0.5, x1=T - 0.5, y0=query - 0.5, y1=query + 0.5,
                 line=dict(color="#E45756", width=2))]


def token_html(r: SequenceRouting, layer: int, position: int | None = None) -> str:
    """The text, each token on its first-choice expert's color at `layer` (stronger for a
    larger gate), with a legend; hovering a token shows its experts and gates."""
    colors = expert_colors(r.num_experts)
    li = int(np.flatnonzero(r.layers == layer)[0])
    spans = []
    for t, piece in enumerate(r.pieces):
        e = int(r.expert_index[li, t, 0])
        gate = float(r.expert_gate[li, t, 0])
        alpha = 0.35 + 0.65 * min(1.0, gate)
        tip = ", ".join(f"expert {int(x)} gate {g:.3f}" for x, g in zip(r.expert_index[li, t], r.expert_gate[li, t]))
        frame = "outline:2px solid #222;" if t == position else ""
        text = html.escape(piece) + ("<br>" if piece.endswith("↵") else "")
        spans.append(f'<span title="{html.escape(f"position {t}, layer {layer}: {tip}")}" '
                     f'style="background:{_rgba(colors[e], alpha)};padding:1px 2px;margin:1px;border-radius:3px;'
                     f'{frame}">{text}</span>')
    legend = " ".join(f'<span style="background:{c};padding:1px 6px;margin-right:4px;border-radius:3px">'
                      f'{e}</span>' for e, c in enumerate(colors))
    return (f'<div style="font-family:DejaVu Sans Mono, monospace;font-size:13px;line-height:1.9">'
            f'<div style="font-family:DejaVu Sans, sans-serif;margin-bottom:4px"><b>layer {layer}</b>: each token '
            f'on its first-choice expert\'s color (stronger = larger gate). Experts: {legend}</div>'
            f'<div style="white-space:normal">{"".join(spans)}</div></div>')


def token_probs_figure(r: SequenceRouting, position: int) -> go.Figure:
    """One token's router probabilities at every layer: stacked bars per expert (each bar
    sums to 1); from the chosen experts' gates when router logits were not recorded."""
    E = r.num_experts
    colors = expert_colors(E)
    L = len(r.layers)
    if r.probs is not None:
        probs = r.probs[:, position, :]
    else:
        probs = np.zeros((L, E), np.float32)
        np.put_along_axis(probs, r.expert_index[:, position, :], r.expert_gate[:, position, :], axis=1)
    layers = [str(x) for x in r.layers]
    fig = go.Figure([go.Bar(x=layers, y=probs[:, e], name=f"expert {e}", marker_color=colors[e],
                            hovertemplate=f"expert {e}<br>layer %{{x}}<br>p = %{{y:.3f}}<extra></extra>")
                     for e in range(E)])
    chosen = ", ".join(f"L{layer}: {'+'.join(str(int(x)) for x in r.expert_index[i, position])}"
                       for i, layer in enumerate(r.layers[:8]))
    _layout(fig, f"router probabilities of token {position} '{r.pieces[position]}' ({chosen}"
                 f"{', …' if L > 8 else ''})", height=320, barmode="stack",
            xaxis=dict(title="layer", type="category"), yaxis=dict(title="probability", range=[0, 1]),
            legend=dict(orientation="v"))
    return fig


def next_token_figure(pieces: Sequence[str], original: np.ndarray, intervened: np.ndarray, title: str) -> go.Figure:
    """The next-token distribution before and after an intervention, side by side."""
    x = list(range(len(pieces)))
    fig = go.Figure([go.Bar(x=x, y=original, name="original", marker_color="#4C78A8",
                            customdata=list(pieces), hovertemplate="%{customdata}: %{y:.3f}<extra>original</extra>"),
                     go.Bar(x=x, y=intervened, name="intervened", marker_color="#F58518",
                            customdata=list(pieces), hovertemplate="%{customdata}: %{y:.3f}<extra>intervened</extra>")])
    _layout(fig, title, height=320, barmode="group", yaxis=dict(title="probability"),
            xaxis=dict(title="next token", tickmode="array", tickvals=x, ticktext=list(pieces), tickangle=-45),
            legend=dict(orientation="h", yanchor="bottom", y=1.0, x=1, xanchor="right"))
    return fig


def attention_heatmap(matrix: np.ndarray, pieces: Sequence[str], title: str, query: int | None = None) -> go.Figure:
    """Query x key attention probabilities labelled with tokens (keys after the query blank)."""
    T = matrix.shape[0]
    z = np.where(np.arange(T)[None, :] <= np.arange(T)[:, None], matrix, np.nan)
    custom = np.empty((T, T, 2), dtype=object)
    custom[..., 0] = np.array(pieces, dtype=object)[:, None]
    custom[..., 1] = np.array(pieces, dtype=object)[None, :]
    top = float(np.nanmax(z)) if np.isfinite(z).any() else 0.0
    fig = go.Figure(go.Heatmap(
        z=_json_safe(z), x=np.arange(T), y=np.arange(T), customdata=custom, colorscale="Blues", zmin=0,
        zmax=top if top > 0 else 1,
        colorbar=dict(title=dict(text="weight"), thickness=14),
        hovertemplate="query %{y} %{customdata[0]}<br>key %{x} %{customdata[1]}<br>weight %{z:.3f}<extra></extra>"))
    size = min(720, max(320, 120 + 14 * T))
    _layout(fig, title, height=size, shapes=query_frame(T, query),
            xaxis=dict(title="key", **_token_axis(pieces, 60)),
            yaxis=dict(title="query", autorange="reversed", **{**_token_axis(pieces, 60), "tickangle": 0}))
    return fig


def query_figure(matrix: np.ndarray, pieces: Sequence[str], query: int, title: str = "") -> go.Figure:
    """Where one token looks: its attention weights over the keys up to itself."""
    weights = matrix[query, :query + 1]
    fig = go.Figure(go.Bar(x=np.arange(query + 1), y=weights, marker_color="#4C78A8",
                           customdata=np.array(pieces[:query + 1], dtype=object),
                           hovertemplate="key %{x} %{customdata}<br>weight %{y:.3f}<extra></extra>"))
    _layout(fig, title or f"where token {query} '{pieces[query]}' looks", height=300,
            xaxis=dict(title="key", **_token_axis(pieces[:query + 1], 60)), yaxis=dict(title="weight"))
    return fig


def load_figure(ds: xr.Dataset) -> go.Figure:
    """Expert load per layer: the share of top-k assignments each expert receives (stacked to
    1), with the uniform 1/E boundaries as the reference."""
    load = analysis.hard_load(ds).compute()
    E = ds.sizes["expert"]
    colors = expert_colors(E)
    layers = [str(x) for x in load["layer"].values]
    fig = go.Figure([go.Bar(x=layers, y=load.sel(expert=e).values, name=f"expert {e}", marker_color=colors[i],
                            hovertemplate=f"expert {e}<br>layer %{{x}}<br>load %{{y:.3f}}<extra></extra>")
                     for i, e in enumerate(load["expert"].values)])
    _layout(fig, subtitled("expert load per layer", f"share of top-{ds.sizes['slot']} assignments; uniform "
                                                  f"1/{E} = {1 / E:.3f}"),
            height=360, barmode="stack", xaxis=dict(title="layer", type="category"),
            yaxis=dict(title="share", range=[0, 1]))
    return fig


def entropy_figure(ds: xr.Dataset) -> go.Figure:
    """Mean normalized router entropy per layer (1 = uniform routing, 0 = one expert)."""
    entropy = analysis.mean_router_entropy(ds).compute()
    layers = [str(x) for x in entropy["layer"].values]
    fig = go.Figure(go.Scatter(x=layers, y=entropy.values, mode="lines+markers", name="mean entropy",
                               line=dict(color="#4C78A8"),
                               hovertemplate="layer %{x}<br>entropy %{y:.3f}<extra></extra>"))
    fig.add_hline(y=1.0, line=dict(color="#888", dash="dash"), annotation_text="uniform routing",
                  annotation_position="bottom right")
    _layout(fig, subtitled("router entropy per layer", "mean over tokens of H / ln E; 1 = uniform"), height=360,
            xaxis=dict(title="layer", type="category"), yaxis=dict(title="entropy", range=[0, 1.05]))
    return fig


def coactivation_figure(ds: xr.Dataset, layer: int) -> go.Figure:
    """Expert pairs chosen together at one layer: CoAct(i, j) = N(i, j) / N(i)."""
    co = analysis.coactivation(ds).sel(layer=layer).compute()
    experts = [str(e) for e in co["expert"].values]
    fig = go.Figure(go.Heatmap(
        z=_json_safe(co["coactivation"].values), x=experts, y=experts, customdata=co["count"].values, colorscale="Viridis",
        zmin=0, colorbar=dict(title=dict(text="N(i,j)/N(i)"), thickness=14),
        hovertemplate="expert %{y} with expert %{x}<br>%{z:.3f} of expert %{y}'s tokens "
                      "(%{customdata} tokens)<extra></extra>"))
    _layout(fig, subtitled(f"co-activation at layer {layer}", "share of expert i's tokens that also take j"), height=380,
            xaxis=dict(title="expert j", type="category"), yaxis=dict(title="expert i", type="category",
                                                                      autorange="reversed"))
    return fig


def sankey_figure(ds: xr.Dataset, layer_a: int, layer_b: int) -> go.Figure:
    """Top-1 expert flow from layer_a to layer_b: link (i, j) carries the tokens whose first
    choice is i at layer_a and j at layer_b (the flows sum to the token count)."""
    tm = analysis.transition_matrix(ds, layer_a, layer_b)
    counts = np.asarray(tm["count"].values)
    E = counts.shape[0]
    colors = expert_colors(E)
    source, target, value, link_colours = [], [], [], []
    for i in range(E):
        for j in range(E):
            if counts[i, j] > 0:
                source.append(i)
                target.append(E + j)
                value.append(int(counts[i, j]))
                link_colours.append(_rgba(colors[i], 0.45))
    labels = [f"L{layer_a} e{e}" for e in range(E)] + [f"L{layer_b} e{e}" for e in range(E)]
    fig = go.Figure(go.Sankey(
        arrangement="fixed",
        node=dict(label=labels, color=colors + colors, pad=8, thickness=14,
                  x=[0.01] * E + [0.99] * E, y=[(e + 0.5) / E for e in range(E)] * 2),
        link=dict(source=source, target=target, value=value, color=link_colours,
                  hovertemplate="%{source.label} → %{target.label}: %{value} tokens<extra></extra>")))
    _layout(fig, f"first-choice expert flow, layer {layer_a} → layer {layer_b} ({int(counts.sum())} tokens)",
            height=420)
    return fig


def top_tokens(ds: xr.Dataset, layer: int, n: int = 8, pieces: Sequence[str] | None = None
               ) -> tuple[list[str], list[list[str]]]:
    """(header per expert, column of "piece (count)" per expert): the tokens each expert most
    often takes as first choice at one layer, from `analysis.top_tokens_per_expert`."""
    top = analysis.top_tokens_per_expert(ds, n=n).sel(layer=layer)
    if pieces is None and "vocab_piece" in ds:
        pieces = [str(p) for p in ds["vocab_piece"].values]
    from grokscope.tokenizer import display_piece

    def label(token: int, count: int) -> str:
        if token < 0:
            return ""
        text = display_piece(pieces[token]) if pieces is not None else str(token)
        return f"{text} ({count})"

    columns = [[label(int(t), int(c)) for t, c in zip(top["token"].values[e], top["count"].values[e])]
               for e in range(ds.sizes["expert"])]
    return [f"expert {e}" for e in top["expert"].values], columns


def top_tokens_html(ds: xr.Dataset, layer: int, n: int = 8) -> str:
    """`top_tokens` as an HTML table (what the live dashboard shows)."""
    headers, columns = top_tokens(ds, layer, n)
    colors = expert_colors(len(headers))
    head = "".join(f'<th style="background:{c};padding:3px 8px;text-align:left">{html.escape(h)}</th>'
                   for h, c in zip(headers, colors))
    rows = "".join("<tr>" + "".join(f'<td style="padding:2px 8px;border-bottom:1px solid #eee">'
                                    f'{html.escape(col[r])}</td>' for col in columns) + "</tr>"
                   for r in range(n))
    return (f'<div style="font-family:DejaVu Sans, sans-serif;font-size:12px">'
            f'<div style="font-size:15px;margin:6px 0">tokens most often sent to each expert at layer {layer} '
            f'<span style="font-size:11px;color:#555">(first choice; count)</span></div>'
            f'<table style="border-collapse:collapse"><tr>{head}</tr>{rows}</table></div>')


def top_tokens_figure(ds: xr.Dataset, layer: int, n: int = 8) -> go.Figure:
    """`top_tokens` as a plotly table (what the report embeds)."""
    headers, columns = top_tokens(ds, layer, n)
    colors = expert_colors(len(headers))
    fig = go.Figure(go.Table(
        header=dict(values=headers, fill_color=colors,
                    font=dict(color="#111", size=12), align="left"),
        cells=dict(values=columns, align="left", font=dict(size=11), height=22)))
    _layout(fig, subtitled(f"tokens most often sent to each expert at layer {layer}", "first choice; count"),
            height=130 + 24 * n)
    return fig


def group_figure(ds: xr.Dataset, by: str, layer: int) -> go.Figure:
    """Expert load at one layer for each group of sequences (e.g. by `label`: code vs prose),
    with the uniform 1/E line."""
    load = analysis.group_load(ds, by=by).sel(layer=layer)
    E = ds.sizes["expert"]
    palette = ["#4C78A8", "#F58518", "#54A24B", "#B279A2", "#E45756", "#72B7B2"]
    fig = go.Figure([go.Bar(x=[str(e) for e in load["expert"].values], y=load["share"].sel(group=g).values,
                            name=f"{g} ({int(load['tokens'].sel(group=g))} tokens)",
                            marker_color=palette[i % len(palette)],
                            hovertemplate=f"{g}<br>expert %{{x}}<br>share %{{y:.3f}}<extra></extra>")
                     for i, g in enumerate(load["group"].values)])
    fig.add_hline(y=1 / E, line=dict(color="#888", dash="dash"))
    _layout(fig, subtitled(f"expert load at layer {layer} by {by}", f"share of each group's assignments; dashed: "
                                                                  f"uniform 1/{E}"),
            height=380, barmode="group", xaxis=dict(title="expert", type="category"),
            yaxis=dict(title="share"), legend=dict(orientation="h", yanchor="top", y=-0.2, x=0))
    return fig


# Attribution (`grokscope.analysis.attribution`): arrays of one sequence, layer-major [L, T].

__all__ += ["ffn_share_heatmap", "dla_heatmap", "dla_bars", "token_frame"]


def token_frame(L: int, position: int | None) -> list[dict]:
    """A dotted frame around the column of `position` in a layer x token heatmap (none for None)."""
    if position is None:
        return []
    return [dict(type="rect", xref="x", yref="y", x0=position - 0.5, x1=position + 0.5, y0=-0.5, y1=L - 0.5,
                 line=dict(color="#222", width=2, dash="dot"))]


def ffn_share_heatmap(routed_share: np.ndarray, routed_norm: np.ndarray, dense_norm: np.ndarray,
                      pieces: Sequence[str], layers: Sequence[int], position: int | None = None,
                      dense: bool = True) -> go.Figure:
    """Layer x token heatmap of the routed share of each token's FFN output (from
    `analysis.ffn_shares`): 1 = all routed experts, 0 = all dense MLP. Hover: token, layer,
    share, and both norms. All arrays are [layer, token]."""
    L, T = routed_share.shape
    custom = np.empty((L, T, 4), dtype=object)
    custom[..., 0] = np.broadcast_to(np.array(pieces, dtype=object), (L, T))
    custom[..., 1] = np.broadcast_to(np.arange(T), (L, T))
    custom[..., 2] = np.round(np.asarray(routed_norm, float), 4)
    custom[..., 3] = np.round(np.asarray(dense_norm, float), 4)
    fig = go.Figure(go.Heatmap(
        z=_json_safe(routed_share), x=np.arange(T), y=[str(x) for x in layers], customdata=custom,
        colorscale="PuOr", zmin=0, zmax=1, zmid=0.5, xgap=1, ygap=1,
        colorbar=dict(title=dict(text="routed share"), thickness=14),
        hovertemplate="token %{customdata[0]} (position %{customdata[1]})<br>layer %{y}<br>routed share %{z:.3f}"
                      "<br>||routed|| %{customdata[2]}, ||dense|| %{customdata[3]}<extra></extra>",
        name="routed share"))
    detail = ("routed / (routed + dense) norm of the FFN output" if dense
              else "no dense MLP in this model: every FFN update is routed")
    _layout(fig, subtitled("routed share of the FFN output per token and layer", detail),
            height=max(220, 150 + (28 if L <= 16 else 12) * L), shapes=token_frame(L, position),
            xaxis=dict(title="token", **_token_axis(pieces)), yaxis=dict(title="layer", type="category"))
    return fig


def dla_heatmap(total: np.ndarray, pieces: Sequence[str], target_pieces: Sequence[str], layers: Sequence[int],
                position: int | None = None, target: str = "next") -> go.Figure:
    """Layer x token heatmap of each layer's FFN direct contribution to the target token's
    pre-cap logit (the chosen experts' `expert_dla` summed over slots, plus `dense_dla`),
    on a scale centered at 0. `total` is [layer, token]; NaN where a token has no target."""
    L, T = total.shape
    custom = np.empty((L, T, 3), dtype=object)
    custom[..., 0] = np.broadcast_to(np.array(pieces, dtype=object), (L, T))
    custom[..., 1] = np.broadcast_to(np.arange(T), (L, T))
    custom[..., 2] = np.broadcast_to(np.array(target_pieces, dtype=object), (L, T))
    finite = np.abs(total[np.isfinite(total)])
    top = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    fig = go.Figure(go.Heatmap(
        z=_json_safe(total), x=np.arange(T), y=[str(x) for x in layers], customdata=custom, colorscale="RdBu",
        zmin=-top, zmax=top, zmid=0, xgap=1, ygap=1, colorbar=dict(title=dict(text="logit"), thickness=14),
        hovertemplate="token %{customdata[0]} (position %{customdata[1]})<br>layer %{y}<br>"
                      "target %{customdata[2]}: %{z:.3f}<extra></extra>", name="FFN direct effect"))
    _layout(fig, subtitled(f"direct effect of each FFN on the {target} token's logit",
                           "experts + dense MLP, pre-cap logits; click a token to see its experts"),
            height=max(220, 150 + (28 if L <= 16 else 12) * L), shapes=token_frame(L, position),
            xaxis=dict(title="token", **_token_axis(pieces)), yaxis=dict(title="layer", type="category"))
    return fig


def dla_bars(expert_dla: np.ndarray, expert_index: np.ndarray, expert_gate: np.ndarray,
             dense_dla: np.ndarray | None, layers: Sequence[int], num_experts: int, title: str) -> go.Figure:
    """One token's direct logit attribution per layer: a bar per chosen expert (one trace per
    slot, each bar in its expert's color and labelled with it) and, when the model has one,
    a grey bar for the dense MLP. `expert_dla`, `expert_index`, `expert_gate` are [layer,
    slot]; `dense_dla` [layer] or None."""
    palette = expert_colors(num_experts)
    x = [str(v) for v in layers]
    L, K = expert_dla.shape
    traces = []
    for k in range(K):
        experts = [int(e) for e in expert_index[:, k]]
        traces.append(go.Bar(
            x=x, y=_json_safe(expert_dla[:, k]), name=f"slot {k}" + (" (first choice)" if k == 0 else ""),
            marker=dict(color=[palette[e] if 0 <= e < num_experts else "#ccc" for e in experts],
                        line=dict(color="#333", width=0.5)),
            text=[f"e{e}" for e in experts], textposition="outside",
            customdata=np.stack([np.array(experts, dtype=object),
                                 np.round(np.asarray(expert_gate[:, k], float), 3).astype(object)], axis=-1),
            hovertemplate=f"layer %{{x}}, slot {k}: expert %{{customdata[0]}} (gate %{{customdata[1]}})"
                          "<br>%{y:.4f} logits<extra></extra>"))
    if dense_dla is not None:
        traces.append(go.Bar(x=x, y=_json_safe(dense_dla), name="dense MLP", marker_color="#888",
                             hovertemplate="layer %{x}, dense MLP<br>%{y:.4f} logits<extra></extra>"))
    fig = go.Figure(traces)
    _layout(fig, title, height=340, barmode="group", xaxis=dict(title="layer", type="category"),
            yaxis=dict(title="direct effect (logits)", zeroline=True, zerolinecolor="#444"),
            legend=dict(orientation="h", yanchor="bottom", y=1.0, x=1, xanchor="right"))
    return fig
