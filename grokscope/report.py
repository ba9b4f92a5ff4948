"""`grokscope report`: one standalone HTML file of a store's routing, readable offline.

plotly.js is embedded once; the file needs no kernel, no server and no network. It holds the
dashboard's figures (load, entropy, per-layer co-activation, top tokens and group comparison,
flows between consecutive layers), the `grokscope analyze` summary with a legend of its
columns, and the routing of a few sequences, one of each group first.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import plotly.io as pio
import xarray as xr
from markupsafe import Markup

from grokscope.widgets import figures
from grokscope.widgets.data import group_columns, sequence_labels, sequence_routing

__all__ = ["write_report", "report_layers", "report_sequences"]


def _environment():
    """The package's jinja2 templates (`grokscope/templates/`), HTML-escaped unless marked safe."""
    import jinja2

    return jinja2.Environment(loader=jinja2.PackageLoader("grokscope", "templates"),
                              autoescape=jinja2.select_autoescape(["html", "j2"]), keep_trailing_newline=True)

_MAX_LAYER_SECTIONS = 8


def report_layers(layers, limit: int = _MAX_LAYER_SECTIONS) -> list[int]:
    """All layers when there are at most `limit`, else `limit` evenly spaced ones (first and last included)."""
    layers = [int(x) for x in layers]
    if len(layers) <= limit:
        return layers
    picks = np.unique(np.round(np.linspace(0, len(layers) - 1, limit)).astype(int))
    return [layers[i] for i in picks]


def report_sequences(ds: xr.Dataset, by: str | None, limit: int) -> list[int]:
    """The sequences whose routing the report shows, at most `limit`: the first of each group
    of `by` (groups in order of first appearance), then the second of each, and so on; without
    `by`, the first `limit` sequences."""
    n = ds.sizes["sequence"]
    if by is None:
        return list(range(min(limit, n)))
    groups: dict[str, list[int]] = {}
    for i, value in enumerate(np.asarray(ds[by].values)):
        groups.setdefault(str(value), []).append(i)
    picks = []
    for rank in range(max(len(g) for g in groups.values())):
        picks += [g[rank] for g in groups.values() if rank < len(g)]
    return picks[:limit]


def write_report(source: xr.Dataset | str, out: str | Path, by: str | None = None, sequences: int = 3,
                 title: str | None = None, summary: bool = True, layer: int | None = None) -> Path:
    """Writes the report of a store (path/URL or Dataset) to `out` (.html). Returns the path.

    Args:
      by: a per-sequence column to compare groups by (default: `label` when present).
      sequences: how many sequences' routing to show in all: the first of each `by` group,
        then the second of each, ... (`report_sequences`).
      summary: include the `grokscope analyze` table (permutation tests; slower on big stores).
      layer: the layer whose first choice colors each shown sequence's text and is framed in
        its heatmap (default: the middle layer, `layers[L // 2]`).
    """
    from grokscope.analysis.summary import SUMMARY_LEGEND, format_summary, summarize
    from grokscope.store import open_store

    name = str(source) if not isinstance(source, xr.Dataset) else "(in-memory Dataset)"
    ds = open_store(str(source)) if not isinstance(source, xr.Dataset) else source
    if "expert_index" not in ds:
        raise ValueError(f"{name}: no routing recorded (expert_index missing); dump with --record routing "
                         f"(RecordSpec(routing=True)) to report on it")
    if ds.sizes.get("sequence", 0) == 0:
        raise ValueError(f"{name}: 0 finished sequences (store status {ds.attrs.get('status', '?')}); "
                         f"nothing to report")
    columns = group_columns(ds)
    if by is None and "label" in columns:
        by = "label"
    if by is not None and by not in ds:
        raise ValueError(f"--by {by!r}: no such per-sequence variable in {name}; have {columns}")
    layers = [int(x) for x in ds["layer"].values]
    shown = report_layers(layers)
    if layer is None:
        layer = layers[len(layers) // 2]
    elif layer not in layers:
        raise ValueError(f"--layer {layer}: no such layer in {name}; have {layers[0]}..{layers[-1]}")

    first = [True]

    def figure(fig) -> Markup:
        # plotly.js goes into the first figure only
        markup = Markup(pio.to_html(fig, full_html=False, include_plotlyjs=first[0], config={"displaylogo": False}))
        first[0] = False
        return markup

    config = ds.attrs.get("model_config", {})
    overview = {"sequences": ds.sizes["sequence"], "tokens": int(ds["length"].sum()),
                "layers": config.get("num_layers", "?"), "width": config.get("emb_size", "?"),
                "experts": ds.sizes["expert"], "top_k": ds.sizes["slot"], "status": ds.attrs.get("status", "?"),
                "figures": [figure(figures.load_figure(ds)), figure(figures.entropy_figure(ds))]}
    summary_text = format_summary(summarize(ds, by=by)) if summary else None
    per_layer = [{"number": number,
                  "figures": [figure(figures.coactivation_figure(ds, number)),
                              figure(figures.top_tokens_figure(ds, number))]
                  + ([figure(figures.group_figure(ds, by, number))] if by is not None else [])}
                 for number in shown]
    flows = [figure(figures.sankey_figure(ds, a, b)) for a, b in zip(shown[:-1], shown[1:])]
    labels = sequence_labels(ds)
    single = []
    for i in report_sequences(ds, by, sequences):
        routing = sequence_routing(ds, i)
        single.append({"label": labels[i], "figure": figure(figures.routing_windows(routing, layer)),
                       "tokens": Markup(figures.token_html(routing, layer))})
    middle = " (the middle layer)" if layer == layers[len(layers) // 2] else ""
    sequences_note = (f"Text colored by layer {layer}{middle}, framed in each heatmap. "
                      + (f"The first sequence of each {by}, then the second of each, …, {len(single)} in all."
                         if by is not None else f"The first {len(single)} sequences."))
    page = _environment().get_template("report.html.j2").render(
        title=title or f"grokscope report: {name}",
        created=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        overview=overview, summary=summary_text, summary_legend=SUMMARY_LEGEND, sequences_note=sequences_note,
        layers_note=f"{len(shown)} of {len(layers)} layers, evenly spaced: {shown}." if shown != layers else "",
        per_layer=per_layer, flows=flows, sequences=single)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out
