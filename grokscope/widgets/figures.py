"""Plotly figures of routing and attention: pure functions of the data, shared by the
interactive widgets (which wrap them in `FigureWidget`s and update them) and by the static
report (which embeds them in one HTML file).

Every statistic comes from `grokscope.analysis`; this module only draws.
"""

from __future__ import annotations

import html
import re
from typing import Sequence

import numpy as np
import plotly.graph_objects as go
import xarray as xr

from grokscope import analysis
from grokscope.widgets.data import SequenceRouting

__all__ = ["expert_colors", "text_color", "token_label", "routing_heatmap", "routing_windows", "token_html",
           "token_probs_figure", "next_token_figure", "attention_heatmap",
           "query_figure", "load_figure", "entropy_figure", "coactivation_figure", "sankey_figure", "sankey_nodes",
           "top_tokens", "top_tokens_html", "top_tokens_figure", "group_figure", "subtitled", "FONT"]

# Okabe and Ito's eight colors (Color Universal Design, 2008): distinct for the common color-vision
# deficiencies (protan, deutan, tritan). Black last, so that small models rarely need it.
_EIGHT = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000"]
# For more than 8 experts: Paul Tol's muted scheme, then Tableau's.
_MORE = ["#CC6677", "#332288", "#DDCC77", "#117733", "#88CCEE", "#882255", "#44AA99", "#999933", "#AA4499",
         "#4C78A8", "#F58518", "#E45756", "#72B7B2", "#54A24B", "#EECA3B", "#B279A2", "#FF9DA6", "#9D755D",
         "#BAB0AC"]
FONT = dict(family="DejaVu Sans, Arial, sans-serif", size=12)
_MARGIN = dict(l=60, r=20, t=70, b=50)
# Plot width assumed where a figure's width is left to the page (a notebook output is ~800 px).
_PLOT_PX = 760
_GLYPH_PX = 7.5  # width of one tick-label character at 12 px
_VISIBLE_RUN = re.compile(r"([·→↵␍])\1{2,}")


def expert_colors(num_experts: int) -> list[str]:
    """One color per expert: Okabe and Ito's eight for Grok's 8 experts, more for larger E."""
    palette = _EIGHT + _MORE
    return [palette[e % len(palette)] for e in range(num_experts)]


def expert_colours(num_experts: int) -> list[str]:
    """Deprecated spelling of `expert_colors`."""
    import warnings

    warnings.warn("expert_colours is deprecated: use expert_colors", DeprecationWarning, stacklevel=2)
    return expert_colors(num_experts)


def _luminance(color: str) -> float:
    """WCAG 2 relative luminance of a `#RRGGBB` color."""
    channels = [int(color[i:i + 2], 16) / 255 for i in (1, 3, 5)]
    r, g, b = (c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def text_color(background: str) -> str:
    """Black or white, whichever contrasts more with `background` (`#RRGGBB`, WCAG contrast ratio)."""
    light = _luminance(background)
    return "#000000" if (light + 0.05) / 0.05 >= 1.05 / (light + 0.05) else "#FFFFFF"


def _rgba(color: str, alpha: float) -> str:
    r, g, b = (int(color[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha:.3f})"


def _plotly_text(text: str) -> str:
    """`text` for a plotly label or hover: `&`, `<`, `>` as entities, so that a piece such as
    `<s>` is not read as markup."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _compact(piece: str) -> str:
    """A piece with each run of 3+ identical whitespace glyphs written as one glyph and its count (`·×8`)."""
    return _VISIBLE_RUN.sub(lambda m: f"{m.group(1)}×{len(m.group(0))}", piece)


def token_label(piece: str) -> str:
    """A displayed piece as a tick label shows it: runs of 3+ identical whitespace glyphs
    counted (`········` → `·×8`), markup characters escaped for plotly."""
    return _plotly_text(_compact(piece))


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


def _token_axis(pieces: Sequence[str], max_labels: int = 80, offset: int = 0, cell_px: float | None = None) -> dict:
    """Tick labels for a token axis: every piece (prefixed by its position when thinned), at
    positions `offset`...; horizontal when every label fits its cell (`cell_px` wide, by default
    the assumed plot width over the tokens), else rotated."""
    T = len(pieces)
    step = max(1, -(-T // max_labels))
    ticks = list(range(0, T, step))
    labels = [_compact(pieces[t]) if step == 1 else f"{t + offset}:{_compact(pieces[t])}" for t in ticks]
    cell_px = cell_px if cell_px is not None else _PLOT_PX / max(T, 1)
    widest = max((len(label) for label in labels), default=0)
    flat = widest <= 3 and widest * _GLYPH_PX + 2 <= cell_px * step
    return dict(tickmode="array", tickvals=[t + offset for t in ticks], ticktext=[_plotly_text(x) for x in labels],
                tickangle=0 if flat else -60)


def _label_px(axis: dict) -> float:
    """The height a token axis's tick labels take below the plot."""
    if axis["tickangle"] == 0:
        return 20.0
    widest = max((len(html.unescape(x)) for x in axis["ticktext"]), default=1)
    return 16.0 + min(widest, 14) * _GLYPH_PX * 0.87


def _routing_traces(r: SequenceRouting, t0: int, t1: int, rerouted: np.ndarray | None, numbers: bool,
                    marker_px: float, number_px: int, axes: tuple[str, str] = ("x", "y"),
                    first: bool = True) -> list:
    """The traces of tokens t0..t1-1 of a routing heatmap: the cells (first-choice expert;
    hover: token, position, layer, all k experts and gates), the expert numbers (when
    `numbers`), and a box on each cell where `rerouted` is set (in the legend when `first`)."""
    E = r.num_experts
    colors = expert_colors(E)
    L, _, K = r.expert_index.shape
    T = t1 - t0
    index = r.expert_index[:, t0:t1]
    gate = np.round(np.asarray(r.expert_gate[:, t0:t1], np.float64), 3)
    marks = np.zeros((L, T), bool) if rerouted is None else np.asarray(rerouted, bool)[:, t0:t1]
    custom = np.empty((L, T, 3 + 2 * K), dtype=object)
    custom[..., 0] = np.broadcast_to(np.array([_plotly_text(p) for p in r.pieces[t0:t1]], dtype=object), (L, T))
    custom[..., 1] = np.broadcast_to(np.arange(t0, t1), (L, T))
    for k in range(K):
        custom[..., 2 + 2 * k] = index[..., k]
        custom[..., 3 + 2 * k] = gate[..., k]
    custom[..., 2 + 2 * K] = np.where(marks, "<br><b>rerouted</b>", "")
    choices = "<br>".join(f"choice {k + 1}: expert %{{customdata[{2 + 2 * k}]}} "
                          f"(gate %{{customdata[{3 + 2 * k}]:.3f}})" for k in range(K))
    x = np.arange(t0, t1)
    y = [str(v) for v in r.layers]
    xaxis, yaxis = axes
    traces = [go.Heatmap(
        z=index[..., 0].astype(float), x=x, y=y, customdata=custom, coloraxis="coloraxis", xgap=1, ygap=1,
        hovertemplate="token '%{customdata[0]}' (position %{customdata[1]})<br>layer %{y}<br>" + choices
                      + f"%{{customdata[{2 + 2 * K}]}}<extra></extra>",
        name="first-choice expert", xaxis=xaxis, yaxis=yaxis)]
    if numbers:
        top1 = index[..., 0]
        traces.append(go.Scatter(
            x=np.broadcast_to(x, (L, T)).ravel(), y=np.repeat(y, T), mode="text",
            text=[str(int(e)) for e in top1.ravel()],
            textfont=dict(color=[text_color(colors[int(e)]) for e in top1.ravel()], size=number_px),
            hoverinfo="skip", showlegend=False, name="expert number", xaxis=xaxis, yaxis=yaxis))
    if marks.any():
        rows, cols = np.nonzero(marks)
        for color, width, legend in (("#FFFFFF", 4.5, False), ("#000000", 2, first)):
            traces.append(go.Scatter(
                x=x[cols], y=[y[i] for i in rows], mode="markers", hoverinfo="skip", name="rerouted",
                marker=dict(symbol="square-open", size=marker_px, color=color, line=dict(width=width, color=color)),
                showlegend=legend, legendgroup="rerouted", xaxis=xaxis, yaxis=yaxis))
    return traces


def _expert_coloraxis(E: int) -> dict:
    """The routing heatmaps' shared color axis: one flat band and one tick per expert."""
    return dict(colorscale=_discrete_colorscale(expert_colors(E)), cmin=-0.5, cmax=E - 0.5,
                colorbar=dict(title=dict(text="expert"), tickvals=list(range(E)), ticktext=[str(e) for e in range(E)],
                              thickness=14, len=max(160, 18 * E), lenmode="pixels", y=1.0,
                              yanchor="top", tickfont=dict(size=11)))


def _rerouted_note(rerouted: np.ndarray | None, note: str) -> str:
    """The subtitle of a routing heatmap: what the boxes mark and the caller's note."""
    if rerouted is None:
        return note
    marks = np.asarray(rerouted, bool)
    what = f"boxed: rerouted under {note}" if note else "boxed: rerouted"
    return f"{what} ({int(marks.sum())} of {marks.size} cells)"


def _check_rerouted(r: SequenceRouting, rerouted) -> np.ndarray | None:
    if rerouted is None:
        return None
    rerouted = np.asarray(rerouted, bool)
    if rerouted.shape != r.expert_index.shape[:2]:
        raise ValueError(f"rerouted must be [layer, token] = {r.expert_index.shape[:2]}, got {rerouted.shape}")
    return rerouted


def routing_heatmap(r: SequenceRouting, layer: int | None = None, position: int | None = None,
                    rerouted: np.ndarray | None = None, note: str = "") -> go.Figure:
    """Layer x token heatmap of each token's first-choice expert (one color per expert, its
    number in the cell for up to 60 tokens).

    Hover: token, position, layer, all k chosen experts and their gates. A frame marks `layer`
    (the layer shown in the colored text) and a column `position` (the selected token).
    `rerouted` (bool [layer, token], like `r.top1`) boxes the cells an intervention changed;
    `note` (e.g. the intervention) is the subtitle.
    """
    rerouted = _check_rerouted(r, rerouted)
    E = r.num_experts
    L, T, _ = r.expert_index.shape
    row = 28 if L <= 16 else 12
    cell = _PLOT_PX / max(T, 1)
    fig = go.Figure(_routing_traces(r, 0, T, rerouted, numbers=T <= 60,
                                    marker_px=max(6.0, min(cell, row) - 2), number_px=10 if row > 12 else 9))
    detail = _rerouted_note(rerouted, note)
    _layout(fig, subtitled(routing_title(layer), detail), height=max(120 + 18 * E, 150 + row * L),
            shapes=routing_frames(r, layer, position), coloraxis=_expert_coloraxis(E),
            xaxis=dict(title="token", **_token_axis(r.pieces)), yaxis=dict(title="layer", type="category"),
            showlegend=rerouted is not None and bool(rerouted.any()),
            legend=dict(orientation="h", yanchor="bottom", y=1.0, x=1, xanchor="right"))
    return fig


def routing_windows(r: SequenceRouting, layer: int | None = None, window: int = 56,
                    rerouted: np.ndarray | None = None, note: str = "", cell_px: int = 16) -> go.Figure:
    """`routing_heatmap` for reading a long sequence: the tokens split into rows of at most
    `window` tokens (equal rows), stacked, every token labelled and every cell `cell_px` wide
    with its expert number. The figure has a fixed width (at least 480 px). A frame marks
    `layer` in each row; `rerouted` and `note` as for `routing_heatmap`."""
    from plotly.subplots import make_subplots

    rerouted = _check_rerouted(r, rerouted)
    E = r.num_experts
    L, T, _ = r.expert_index.shape
    if T == 0:
        return routing_heatmap(r, layer, rerouted=rerouted, note=note)
    n = -(-T // window)
    size = max(1, -(-T // n))
    spans = [(i * size, min(T, (i + 1) * size)) for i in range(n)]
    spans = [(a, b) for a, b in spans if a < b]
    n = len(spans)
    row_px = 22 if L <= 8 else 16 if L <= 16 else 12
    axes = [_token_axis(r.pieces[a:b], max_labels=window, offset=a, cell_px=cell_px) for a, b in spans]
    label_px = max(_label_px(axis) for axis in axes) + 22  # tick labels + axis title
    plot_px = row_px * L
    total = n * plot_px + (n - 1) * label_px
    fig = make_subplots(rows=n, cols=1, vertical_spacing=label_px / total if n > 1 else 0.0)
    legend = True  # the first row with a box puts "rerouted" in the legend
    for i, ((a, b), axis) in enumerate(zip(spans, axes)):
        suffix = "" if i == 0 else str(i + 1)
        fig.add_traces(_routing_traces(r, a, b, rerouted, numbers=True, marker_px=min(cell_px, row_px) - 2,
                                       number_px=min(10, row_px - 4), axes=(f"x{suffix}", f"y{suffix}"),
                                       first=legend))
        legend = legend and (rerouted is None or not rerouted[:, a:b].any())
        fig.layout[f"xaxis{suffix}"].update(title=dict(text=f"token {a}–{b - 1} of {T}", standoff=4),
                                            range=[a - 0.5, a + size - 0.5], **axis)
        fig.layout[f"yaxis{suffix}"].update(title="layer", type="category")
    shapes = []
    if layer is not None:
        li = int(np.flatnonzero(r.layers == layer)[0])
        for i, (a, b) in enumerate(spans):
            suffix = "" if i == 0 else str(i + 1)
            shapes += _halo_rect(f"x{suffix}", f"y{suffix}", a - 0.5, b - 0.5, li - 0.5, li + 0.5)
    margin = dict(l=60, r=110, t=80, b=int(label_px) + 10)
    _layout(fig, subtitled(routing_title(layer), _rerouted_note(rerouted, note)),
            height=int(total + margin["t"] + margin["b"]), shapes=shapes, coloraxis=_expert_coloraxis(E),
            showlegend=rerouted is not None and bool(rerouted.any()),
            legend=dict(orientation="h", yanchor="bottom", y=1.0, x=1, xanchor="right"))
    fig.update_layout(width=max(480, margin["l"] + margin["r"] + size * cell_px), margin=margin)
    return fig


def routing_title(layer: int | None) -> str:
    return "first-choice expert per token and layer" + (f" (framed: layer {layer})" if layer is not None else "")


def _halo_rect(xref: str, yref: str, x0: float, x1: float, y0: float, y1: float, dash: str = "solid") -> list[dict]:
    """A dark frame on a white halo: visible on every expert's color, black included."""
    return [dict(type="rect", xref=xref, yref=yref, x0=x0, x1=x1, y0=y0, y1=y1, line=dict(color=color, width=width,
                                                                                       dash=dash))
            for color, width in (("#FFFFFF", 4), ("#222222", 2))]


def routing_frames(r: SequenceRouting, layer: int | None, position: int | None) -> list[dict]:
    """The routing heatmap's frames: a box around `layer`'s row, a dotted one around `position`'s column."""
    L, T = r.expert_index.shape[:2]
    shapes = []
    if layer is not None:
        li = int(np.flatnonzero(r.layers == layer)[0])
        shapes += _halo_rect("x", "y", -0.5, T - 0.5, li - 0.5, li + 0.5)
    if position is not None:
        shapes += _halo_rect("x", "y", position - 0.5, position + 0.5, -0.5, L - 0.5, dash="dot")
    return shapes


def query_frame(T: int, query: int | None) -> list[dict]:
    """The attention heatmap's frame around the row of `query` (none for None)."""
    if query is None:
        return []
    return [dict(type="rect", xref="x", yref="y", x0=-0.5, x1=T - 0.5, y0=query - 0.5, y1=query + 0.5,
                 line=dict(color="#D55E00", width=2))]


def token_html(r: SequenceRouting, layer: int, position: int | None = None) -> str:
    """The text, each token on its first-choice expert's color at `layer` with the expert's
    number in subscript and a bar under it as long as its gate (full width = 1), with a
    legend; hovering a token shows its experts and gates."""
    colors = expert_colors(r.num_experts)
    li = int(np.flatnonzero(r.layers == layer)[0])
    spans = []
    for t, piece in enumerate(r.pieces):
        e = int(r.expert_index[li, t, 0])
        gate = min(1.0, max(0.0, float(r.expert_gate[li, t, 0])))
        background, ink = colors[e], text_color(colors[e])
        tip = ", ".join(f"expert {int(x)} gate {g:.3f}" for x, g in zip(r.expert_index[li, t], r.expert_gate[li, t]))
        frame = "outline:2px solid #222;outline-offset:1px;" if t == position else ""
        spans.append(f'<span title="{html.escape(f"position {t}, layer {layer}: {tip}")}" '
                     f'style="background-color:{background};color:{ink};'
                     f'background-image:linear-gradient({ink},{ink});background-size:{100 * gate:.0f}% 3px;'
                     f'background-repeat:no-repeat;background-position:left bottom;'
                     f'padding:1px 2px 3px;margin:1px;border-radius:3px;{frame}">{html.escape(piece)}'
                     f'<sub style="font-size:9px;margin-left:1px">{e}</sub></span>'
                     + ("<br>" if piece.endswith("↵") else ""))
    legend = " ".join(f'<span style="background:{c};color:{text_color(c)};padding:1px 6px;margin-right:4px;'
                      f'border-radius:3px">{e}</span>' for e, c in enumerate(colors))
    return (f'<div style="font-family:DejaVu Sans Mono, monospace;font-size:13px;line-height:2">'
            f'<div style="font-family:DejaVu Sans, sans-serif;margin-bottom:4px"><b>layer {layer}</b>: each token '
            f'on its first-choice expert\'s color, the expert in subscript; the bar under a token is its gate '
            f'(full width = 1). Experts: {legend}</div>'
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
    _layout(fig, f"router probabilities of token {position} '{_plotly_text(r.pieces[position])}' ({chosen}"
                 f"{', …' if L > 8 else ''})", height=320, barmode="stack",
            xaxis=dict(title="layer", type="category"), yaxis=dict(title="probability", range=[0, 1]),
            legend=dict(orientation="v"))
    return fig


def next_token_figure(pieces: Sequence[str], original: np.ndarray, intervened: np.ndarray | None, title: str,
                      kl: float | None = None, delta_loss: float | None = None) -> go.Figure:
    """The next-token distribution before and after an intervention, side by side; only the
    original bars when `intervened` is None. The subtitle gives KL(original‖intervened) and
    the change in loss (both in nats) when they are passed."""
    x = list(range(len(pieces)))
    shown = [_plotly_text(p) for p in pieces]
    bars = [("original", original, "#0072B2")] + ([("intervened", intervened, "#D55E00")] if intervened is not None
                                                  else [])
    fig = go.Figure([go.Bar(x=x, y=y, name=name, marker_color=color, customdata=shown,
                            hovertemplate=f"'%{{customdata}}': %{{y:.3f}}<extra>{name}</extra>")
                     for name, y, color in bars])
    numbers = ([f"KL(original‖intervened) = {kl:.4f} nats"] if kl is not None else []) + \
              ([f"Δloss = {delta_loss:+.4f} nats"] if delta_loss is not None else [])
    if numbers:
        title = f"{title}<br><sup>{', '.join(numbers)}</sup>"
    _layout(fig, title, height=320 + (16 if numbers else 0), barmode="group", yaxis=dict(title="probability"),
            xaxis=dict(title="next token", tickmode="array", tickvals=x, ticktext=[token_label(p) for p in pieces],
                       tickangle=_token_axis(pieces, cell_px=_PLOT_PX / max(len(x), 1))["tickangle"]),
            showlegend=intervened is not None,
            legend=dict(orientation="h", yanchor="bottom", y=1.0, x=1, xanchor="right"))
    if numbers:
        fig.update_layout(margin=dict(_MARGIN, t=_MARGIN["t"] + 16))
    return fig


def attention_heatmap(matrix: np.ndarray, pieces: Sequence[str], title: str, query: int | None = None) -> go.Figure:
    """Query x key attention probabilities labelled with tokens (keys after the query blank).
    Hover: the query's and the key's position and token, and the weight."""
    T = matrix.shape[0]
    z = np.where(np.arange(T)[None, :] <= np.arange(T)[:, None], matrix, np.nan)
    shown = np.array([_plotly_text(p) for p in pieces], dtype=object)
    custom = np.empty((T, T, 4), dtype=object)
    custom[..., 0] = np.arange(T)[:, None]
    custom[..., 1] = shown[:, None]
    custom[..., 2] = np.arange(T)[None, :]
    custom[..., 3] = shown[None, :]
    top = float(np.nanmax(z)) if np.isfinite(z).any() else 0.0
    fig = go.Figure(go.Heatmap(
        z=_json_safe(z), x=np.arange(T), y=np.arange(T), customdata=custom, colorscale="Blues", zmin=0,
        zmax=top if top > 0 else 1,
        colorbar=dict(title=dict(text="weight"), thickness=14),
        hovertemplate="query %{customdata[0]} '%{customdata[1]}'<br>key %{customdata[2]} '%{customdata[3]}'"
                      "<br>weight %{z:.3f}<extra></extra>"))
    size = min(720, max(320, 120 + 14 * T))
    _layout(fig, title, height=size, shapes=query_frame(T, query),
            xaxis=dict(title="key", **_token_axis(pieces, 60)),
            yaxis=dict(title="query", autorange="reversed", **{**_token_axis(pieces, 60), "tickangle": 0}))
    return fig


def query_figure(matrix: np.ndarray, pieces: Sequence[str], query: int, title: str = "") -> go.Figure:
    """Where one token looks: its attention weights over the keys up to itself (hover: the
    key's position and token, and the weight)."""
    weights = matrix[query, :query + 1]
    custom = np.empty((query + 1, 2), dtype=object)
    custom[:, 0] = np.arange(query + 1)
    custom[:, 1] = [_plotly_text(p) for p in pieces[:query + 1]]
    fig = go.Figure(go.Bar(x=np.arange(query + 1), y=weights, marker_color="#0072B2", customdata=custom,
                           hovertemplate="key %{customdata[0]} '%{customdata[1]}'<br>weight %{y:.3f}<extra></extra>"))
    _layout(fig, title or f"where token {query} '{_plotly_text(pieces[query])}' looks", height=300,
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


def sankey_nodes(counts: np.ndarray, height_px: float, pad_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Vertical centers (0 = top, 1 = bottom) of a two-column Sankey's nodes, experts in order
    top to bottom, such that no two nodes overlap: [E] for the source column and [E] for the
    target column of the E x E flow `counts`.

    Plotly sizes a node at value x ky pixels with ky = min over columns of (height -
    (nodes - 1) x pad) / column total (d3-sankey; nodes without flow are not drawn), so the
    nodes of a column, stacked with `pad_px` between them, fill `height_px` at most.
    """
    counts = np.asarray(counts, dtype=np.float64)
    columns = [counts.sum(1), counts.sum(0)]
    total = max(float(counts.sum()), 1.0)
    ky = min((height_px - (np.count_nonzero(v) - 1) * pad_px) / total for v in columns)
    out = []
    for values in columns:
        centers, top = np.empty(len(values)), 0.0
        for e, v in enumerate(values):
            size = v * ky
            centers[e] = (top + size / 2) / height_px
            if v > 0:
                top += size + pad_px
        out.append(np.maximum(centers, 1e-3))  # plotly ignores a position of 0
    return out[0], out[1]


def sankey_figure(ds: xr.Dataset, layer_a: int, layer_b: int) -> go.Figure:
    """Top-1 expert flow from layer_a to layer_b: link (i, j) carries the tokens whose first
    choice is i at layer_a and j at layer_b (the flows sum to the token count). Nodes are
    ordered by expert and sized by their tokens, without overlap."""
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
    height, pad = 420, 8
    y_a, y_b = sankey_nodes(counts, height - _MARGIN["t"] - _MARGIN["b"], pad)
    fig = go.Figure(go.Sankey(
        arrangement="snap",
        node=dict(label=labels, color=colors + colors, pad=pad, thickness=14,
                  x=[0.01] * E + [0.99] * E, y=list(y_a) + list(y_b)),
        link=dict(source=source, target=target, value=value, color=link_colours,
                  hovertemplate="%{source.label} → %{target.label}: %{value} tokens<extra></extra>")))
    _layout(fig, f"first-choice expert flow, layer {layer_a} → layer {layer_b} ({int(counts.sum())} tokens)",
            height=height)
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
    head = "".join(f'<th style="background:{c};color:{text_color(c)};padding:3px 8px;text-align:left">'
                   f'{html.escape(h)}</th>' for h, c in zip(headers, colors))
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
                    font=dict(color=[text_color(c) for c in colors], size=12), align="left"),
        cells=dict(values=[[_plotly_text(x) for x in col] for col in columns], align="left", font=dict(size=11),
                   height=22)))
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
    custom[..., 0] = np.broadcast_to(np.array([_plotly_text(p) for p in pieces], dtype=object), (L, T))
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
    custom[..., 0] = np.broadcast_to(np.array([_plotly_text(p) for p in pieces], dtype=object), (L, T))
    custom[..., 1] = np.broadcast_to(np.arange(T), (L, T))
    custom[..., 2] = np.broadcast_to(np.array([_plotly_text(p) for p in target_pieces], dtype=object), (L, T))
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
