"""`grokscope report`: one standalone HTML file of a store's routing, readable offline.

plotly.js is embedded once; the file needs no kernel, no server and no network. It holds the
dashboard's figures (load, entropy, per-layer co-activation, top tokens and group comparison,
flows between consecutive layers), the `grokscope analyze` summary, and the routing of the
first few sequences.
"""

from __future__ import annotations

import html
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import plotly.io as pio
import xarray as xr

from grokscope.widgets import figures
from grokscope.widgets.data import group_columns, sequence_labels, sequence_routing

__all__ = ["write_report", "report_layers"]

_MAX_LAYER_SECTIONS = 8


def report_layers(layers, limit: int = _MAX_LAYER_SECTIONS) -> list[int]:
    """All layers when there are at most `limit`, else `limit` evenly spaced ones (first and last included)."""
    layers = [int(x) for x in layers]
    if len(layers) <= limit:
        return layers
    picks = np.unique(np.round(np.linspace(0, len(layers) - 1, limit)).astype(int))
    return [layers[i] for i in picks]


def write_report(source: xr.Dataset | str, out: str | Path, by: str | None = None, sequences: int = 3,
                 title: str | None = None, summary: bool = True) -> Path:
    """Writes the report of a store (path/URL or Dataset) to `out` (.html). Returns the path.

    Args:
      by: a per-sequence column to compare groups by (default: `label` when present).
      sequences: how many sequences' routing to show.
      summary: include the `grokscope analyze` table (permutation tests; slower on big stores).
    """
    from grokscope.analysis.summary import format_summary, summarize
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

    parts: list[str] = []
    first = [True]

    def figure(fig):
        parts.append(pio.to_html(fig, full_html=False, include_plotlyjs=first[0], config={"displaylogo": False}))
        first[0] = False

    def heading(text, level=2):
        parts.append(f"<h{level}>{html.escape(text)}</h{level}>")

    config = ds.attrs.get("model_config", {})
    tokens = int(ds["length"].sum())
    heading("Overview")
    parts.append(f"<p>{ds.sizes['sequence']} sequences, {tokens} tokens; model: {config.get('num_layers', '?')} "
                 f"layers, {config.get('emb_size', '?')} wide, {ds.sizes['expert']} experts, top-"
                 f"{ds.sizes['slot']}. Store status: {html.escape(str(ds.attrs.get('status', '?')))}.</p>")
    figure(figures.load_figure(ds))
    figure(figures.entropy_figure(ds))
    if summary:
        heading("Summary (grokscope analyze)")
        parts.append(f"<pre>{html.escape(format_summary(summarize(ds, by=by)))}</pre>")
    heading("Per layer")
    if shown != layers:
        parts.append(f"<p>{len(shown)} of {len(layers)} layers, evenly spaced: {shown}.</p>")
    for layer in shown:
        heading(f"Layer {layer}", 3)
        figure(figures.coactivation_figure(ds, layer))
        figure(figures.top_tokens_figure(ds, layer))
        if by is not None:
            figure(figures.group_figure(ds, by, layer))
    heading("Flow between layers")
    for a, b in zip(shown[:-1], shown[1:]):
        figure(figures.sankey_figure(ds, a, b))
    heading("Routing of single sequences")
    labels = sequence_labels(ds)
    for i in range(min(sequences, ds.sizes["sequence"])):
        heading(labels[i], 3)
        routing = sequence_routing(ds, i)
        figure(figures.routing_heatmap(routing))
        parts.append(figures.token_html(routing, layers[0]))

    created = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    title = title or f"grokscope report: {name}"
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: "DejaVu Sans", Arial, sans-serif; max-width: 1100px; margin: 24px auto; padding: 0 16px;
       color: #222; }}
h1 {{ font-size: 22px; }} h2 {{ font-size: 18px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }}
h3 {{ font-size: 15px; }} pre {{ background: #f6f6f6; padding: 8px; overflow-x: auto; font-size: 12px; }}
</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p>Written {created} by grokscope. Every figure is embedded: this file opens offline, with no kernel.</p>
{chr(10).join(parts)}
</body></html>
"""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out
