"""AttentionExplorer: where each head looks, from full, head_mean or topk records."""

from __future__ import annotations

import html

import ipywidgets as W
import numpy as np
import plotly.graph_objects as go

from grokscope.record import AttentionSpec, RecordSpec
from grokscope.widgets import figures
from grokscope.widgets.base import FigureWidget, Source, View, busy, guarded, mark_updating, refresh, short, warm_up
from grokscope.widgets.data import attention_matrix, attention_options, sequence_labels
from grokscope.widgets.routing import DEFAULT_PROMPT

__all__ = ["AttentionExplorer"]

MEAN = "mean of heads"
_KEEP = object()


class AttentionExplorer(View):
    """A query x key heatmap of one layer's attention (one head, or the mean of the recorded
    heads), labelled with tokens, and the selected query's weights over the keys.

    With grouped-query attention, query heads h share the key/value head h // (heads per
    group); the head selector names that group.

    Args:
      source: a `Session` (records full attention on all layers for what you type) or a
        Dataset holding an attention record in any format (`full`, `head_mean`, `topk`; topk
        shows the recorded k keys per query, zeros elsewhere).
      prompt, sequence: the first prompt (Session) or sequence (Dataset).
    """

    def __init__(self, source, prompt: str = DEFAULT_PROMPT, sequence: int = 0):
        self.source = Source(source, record=RecordSpec(routing=False, attention=AttentionSpec(format="full")))
        self.status = W.HTML()
        self.layer = W.Dropdown(options=[0], description="layer", layout=W.Layout(width="200px"))
        self.head = W.Dropdown(options=[(MEAN, -1)], value=-1, description="head", layout=W.Layout(width="300px"))
        self.query = W.IntSlider(min=0, max=0, description="query", continuous_update=False,
                                 layout=W.Layout(width="420px", max_width="100%"))
        self.heatmap = FigureWidget()
        self.per_query = FigureWidget()
        self.matrix: np.ndarray | None = None
        self.pieces: list[str] = []
        self._syncing = False
        if self.source.session is not None:
            self.prompt = W.Textarea(value=prompt, description="prompt", rows=3, layout=W.Layout(flex="1 1 auto"))
            self.run_button = W.Button(description="Run", button_style="primary", icon="play")
            self.run_button.on_click(lambda _: guarded(self.status, self._run))
            chooser = W.HBox([self.prompt, self.run_button], layout=W.Layout(width="100%"))
        else:
            ds = self.source.dataset
            attention_options(ds)  # fails early, naming what is missing
            self.sequence = W.Dropdown(options=[(label, i) for i, label in enumerate(sequence_labels(ds))],
                                       value=sequence, description="sequence", layout=W.Layout(width="95%"))
            self.sequence.observe(lambda _: self._on(self._load), names="value")
            chooser = self.sequence
        for control in (self.layer, self.head):
            control.observe(lambda _: self._on(self._draw), names="value")
        self.query.observe(lambda _: self._on(self._draw_query), names="value")
        super().__init__([chooser, self.status, W.HBox([self.layer, self.head], layout=W.Layout(flex_flow="row wrap")),
                          self.heatmap, self.query, self.per_query], layout=W.Layout(width="100%"))
        guarded(self.status, self._run if self.source.session is not None else self._load)
        if self.source.session is not None:
            warm_up(self.source.session, "run", self.source.record)

    def _on(self, action) -> None:
        if not self._syncing:
            guarded(self.status, action)

    @property
    def dataset(self):
        return self.source.dataset

    def _sequence_index(self) -> int:
        return 0 if self.source.session is not None else self.sequence.value

    def _run(self):
        busy(self.status, f"running '{short(self.prompt.value)}'")
        mark_updating(self.heatmap, self.per_query)
        self.source.run(self.prompt.value)
        self._load()

    def _load(self):
        ds = self.dataset
        opts = attention_options(ds)
        kv_group = None
        config = ds.attrs.get("model_config", {})
        if config.get("num_q_heads") and config.get("num_kv_heads"):
            kv_group = config["num_q_heads"] // config["num_kv_heads"]
        heads = [(MEAN, -1)] + [(f"{h}" + (f" (kv head {h // kv_group})" if kv_group else ""), h)
                                for h in opts["heads"]]
        length = int(ds["length"].values[self._sequence_index()])
        from grokscope.store import token_pieces

        self.pieces = token_pieces(ds, self._sequence_index()) if "vocab_piece" in ds else \
            [str(int(t)) for t in ds["tokens"].values[self._sequence_index(), :length]]
        self._syncing = True
        try:
            if list(self.layer.options) != opts["layers"]:
                self.layer.options = opts["layers"]
            if [v for _, v in self.head.options] != [v for _, v in heads]:
                self.head.options = heads
                self.head.value = -1
            self.query.max = max(0, length - 1)
            self.query.value = length - 1
        finally:
            self._syncing = False
        self.status.value = (f"format {opts['format']}, {len(opts['layers'])} layers, "
                             f"{len(opts['heads']) or 'mean of'} heads recorded; {length} tokens")
        self._draw()

    def _head_name(self) -> str:
        return "mean of heads" if self.head.value == -1 else f"head {self.head.value}"

    def _title(self) -> str:
        fmt = attention_options(self.dataset)["format"]
        note = " (top-k keys per query; the rest shown as 0)" if fmt == "topk" else ""
        return f"attention at layer {self.layer.value}, {self._head_name()}{note}"

    def _query_figure(self) -> go.Figure:
        q = self.query.value
        title = (f"where token {q} '{figures.token_label(self.pieces[q])}' looks "
                 f"(layer {self.layer.value}, {self._head_name()})")
        return figures.query_figure(self.matrix, self.pieces, q, title)

    def _draw(self):
        head = None if self.head.value == -1 else self.head.value
        self.matrix = attention_matrix(self.dataset, self._sequence_index(), self.layer.value, head)
        refresh(self.heatmap, figures.attention_heatmap(self.matrix, self.pieces, self._title(), self.query.value))
        self._draw_query()

    def _draw_query(self):
        if self.matrix is None:
            return
        q = self.query.value
        self.heatmap.layout.shapes = figures.query_frame(len(self.pieces), q)
        refresh(self.per_query, self._query_figure())

    def select(self, layer: int | None = None, head: int | None | object = _KEEP, query: int | None = None):
        """Selects a layer, a head (None = the mean of heads) and/or a query token."""
        if layer is not None:
            self.layer.value = layer
        if head is not _KEEP:
            self.head.value = -1 if head is None else head
        if query is not None:
            self.query.value = query
        return self

    def static_parts(self):
        if self.matrix is None:
            return [f"<pre>{html.escape(self.status.value)}</pre>"]
        return [figures.attention_heatmap(self.matrix, self.pieces, self._title(), self.query.value),
                self._query_figure()]
