"""ExpertDashboard: how a store (or a set of prompts) loads the experts, layer by layer."""

from __future__ import annotations

import html
from typing import Sequence

import ipywidgets as W
import numpy as np
import plotly.graph_objects as go
import xarray as xr

from grokscope.widgets import figures
from grokscope.widgets.base import FigureWidget, View, busy, guarded, mark_updating, refresh
from grokscope.widgets.data import group_columns

__all__ = ["ExpertDashboard", "side_by_side"]


def side_by_side(*widgets, basis: str = "400px") -> W.Box:
    """Widgets in one row that wraps: each takes an equal share of the row and at least
    `basis`, so that two fit side by side in a wide output and stack in a narrow one."""
    cells = [W.VBox([w], layout=W.Layout(flex=f"1 1 {basis}", min_width="0", overflow="hidden")) for w in widgets]
    return W.HBox(cells, layout=W.Layout(flex_flow="row wrap", width="100%"))


class ExpertDashboard(View):
    """Expert load per layer (stacked), router entropy per layer, the co-activation matrix at a
    layer, the top-1 flow between two layers (Sankey), the tokens each expert takes at a layer,
    and the load of two or more groups of sequences side by side (e.g. by `label`).

    Args:
      source: a Dataset from `open_store` (any size: statistics are computed by
        `grokscope.analysis`, lazily where the store is dask-backed), or a `Session` together
        with `prompts` (and optional `labels`), which are run first.
      prompts, labels: for a Session source.
      by: the grouping column (default: `label` if present).
    """

    def __init__(self, source, prompts: Sequence[str] | None = None, labels: Sequence[str] | None = None,
                 by: str | None = None):
        from grokscope.session import Session

        if isinstance(source, Session):
            if not prompts:
                raise ValueError("ExpertDashboard(session, prompts=[...]): a Session needs prompts to run")
            source = source.run(list(prompts), metadata={"label": list(labels)} if labels is not None else None)
        if not isinstance(source, xr.Dataset):
            raise TypeError(f"expected a Dataset (from open_store) or a Session with prompts, got "
                            f"{type(source).__name__}")
        if "expert_index" not in source:
            raise ValueError("this Dataset has no routing (expert_index): record it with RecordSpec(routing=True)")
        self.dataset = source
        layers = [int(x) for x in source["layer"].values]
        self.status = W.HTML()
        self.load = FigureWidget()
        self.entropy = FigureWidget()
        self.layer = W.Dropdown(options=layers, value=layers[0], description="layer", layout=W.Layout(width="200px"))
        self.coactivation = FigureWidget()
        self.top_tokens = W.HTML()
        self.layer_a = W.Dropdown(options=layers, value=layers[0], description="from layer",
                                  layout=W.Layout(width="200px"))
        self.layer_b = W.Dropdown(options=layers, value=layers[min(1, len(layers) - 1)], description="to layer",
                                  layout=W.Layout(width="200px"))
        self.sankey = FigureWidget()
        columns = group_columns(source)
        default = by if by in columns else ("label" if "label" in columns else (columns[0] if columns else None))
        self.by = W.Dropdown(options=columns or ["(no per-sequence labels)"], description="group by",
                             value=default or "(no per-sequence labels)",
                             layout=W.Layout(width="300px"), disabled=not columns)
        self.groups = FigureWidget()
        self.layer.observe(lambda _: guarded(self.status, self._draw_layer), names="value")
        for control in (self.layer_a, self.layer_b):
            control.observe(lambda _: guarded(self.status, self._draw_flow), names="value")
        self.by.observe(lambda _: guarded(self.status, self._draw_layer), names="value")
        tokens = int(source["length"].sum())
        self._summary = (f"{source.sizes['sequence']} sequences, {tokens} tokens, {len(layers)} layers, "
                         f"{source.sizes['expert']} experts")
        self.status.value = self._summary
        wrap = W.Layout(flex_flow="row wrap", width="100%")
        super().__init__([
            self.status, side_by_side(self.load, self.entropy),
            W.HBox([self.layer, self.by], layout=wrap), side_by_side(self.coactivation, self.groups), self.top_tokens,
            W.HBox([self.layer_a, self.layer_b], layout=wrap), self.sankey], layout=W.Layout(width="100%"))
        guarded(self.status, self._draw_all)

    def _draw_all(self):
        refresh(self.load, figures.load_figure(self.dataset))
        refresh(self.entropy, figures.entropy_figure(self.dataset))
        self._draw_layer()
        self._draw_flow()

    def _group_figure(self) -> go.Figure:
        if self.by.disabled:
            fig = go.Figure()
            fig.update_layout(title="no per-sequence labels to compare (dump a .jsonl with a 'label' field)",
                              height=340, template="plotly_white")
            return fig
        return figures.group_figure(self.dataset, self.by.value, self.layer.value)

    def _draw_layer(self):
        busy(self.status, f"computing layer {self.layer.value}")
        mark_updating(self.coactivation, self.groups)
        refresh(self.coactivation, figures.coactivation_figure(self.dataset, self.layer.value))
        self.top_tokens.value = figures.top_tokens_html(self.dataset, self.layer.value)
        refresh(self.groups, self._group_figure())
        self.status.value = self._summary

    def _draw_flow(self):
        busy(self.status, f"computing the flow from layer {self.layer_a.value} to layer {self.layer_b.value}")
        mark_updating(self.sankey)
        refresh(self.sankey, figures.sankey_figure(self.dataset, self.layer_a.value, self.layer_b.value))
        self.status.value = self._summary

    def select(self, layer: int | None = None, layer_a: int | None = None, layer_b: int | None = None,
               by: str | None = None) -> "ExpertDashboard":
        """Selects the layer of the per-layer views, the flow's layers and the grouping column."""
        for control, value in ((self.layer, layer), (self.layer_a, layer_a), (self.layer_b, layer_b),
                               (self.by, by)):
            if value is not None:
                control.value = value
        return self

    def static_parts(self):
        return [f"<div style='font-family:sans-serif'>{html.escape(self.status.value)}</div>",
                figures.load_figure(self.dataset), figures.entropy_figure(self.dataset),
                figures.coactivation_figure(self.dataset, self.layer.value),
                figures.top_tokens_html(self.dataset, self.layer.value), self._group_figure(),
                figures.sankey_figure(self.dataset, self.layer_a.value, self.layer_b.value)]
