"""RoutingExplorer: which expert each token takes, layer by layer."""

from __future__ import annotations

import html

import ipywidgets as W
import plotly.graph_objects as go

from grokscope.widgets import figures
from grokscope.widgets.base import Source, View, guarded, refresh
from grokscope.widgets.data import SequenceRouting, sequence_labels, sequence_routing

__all__ = ["RoutingExplorer"]

DEFAULT_PROMPT = "def mean(values):\n    return sum(values) / len(values)\n"


class RoutingExplorer(View):
    """The main view of routing.

    - a layer x token heatmap of each token's first-choice expert (hover: token, layer, both
      chosen experts and their gates; click a cell to select that token and layer),
    - the text with each token on its expert's color at the layer of the slider,
    - the selected token's router probabilities at every layer (stacked bars per expert),
    - with a Session: an intervention control (ban or zero an expert at the layer of the slider)
      and the next-token distribution after the selected token, as is and intervened.

    Args:
      source: a `Session` (a text box runs what you type) or a Dataset from `open_store` /
        `Session.run` (a selector picks the sequence).
      prompt: the first prompt to run (Session only).
      sequence: the first sequence to show (Dataset only).
    """

    def __init__(self, source, prompt: str = DEFAULT_PROMPT, sequence: int = 0):
        self.source = Source(source)
        self.status = W.HTML()
        self.layer = W.SelectionSlider(options=[0], description="layer", continuous_update=False,
                                       layout=W.Layout(width="420px"))
        self.position = W.IntSlider(min=0, max=0, description="token", continuous_update=False,
                                    layout=W.Layout(width="420px"))
        self.heatmap = go.FigureWidget()
        self.text = W.HTML()
        self.probs = go.FigureWidget()
        self.routing: SequenceRouting | None = None
        if self.source.session is not None:
            self.prompt = W.Textarea(value=prompt, description="prompt", rows=3,
                                     layout=W.Layout(width="95%"))
            self.run_button = W.Button(description="Run", button_style="primary", icon="play")
            self.run_button.on_click(lambda _: guarded(self.status, self._run))
            chooser = W.HBox([self.prompt, self.run_button])
            self.action = W.ToggleButtons(options=["none", "ban", "zero"], value="none", description="intervene",
                                          style={"button_width": "60px"})
            self.expert = W.Dropdown(options=list(range(source.config.num_experts)), value=0, description="expert",
                                     layout=W.Layout(width="160px"))
            self.next_token = go.FigureWidget()
            for control in (self.action, self.expert):
                control.observe(lambda _: guarded(self.status, self._draw_next_token), names="value")
        else:
            ds = self.source.dataset
            self.sequence = W.Dropdown(options=[(label, i) for i, label in enumerate(sequence_labels(ds))],
                                       value=sequence, description="sequence", layout=W.Layout(width="95%"))
            self.sequence.observe(lambda _: guarded(self.status, self._load), names="value")
            chooser = self.sequence
        self.layer.observe(lambda _: guarded(self.status, self._draw_layer), names="value")
        self.position.observe(lambda _: guarded(self.status, self._draw_position), names="value")
        children = [chooser, self.status, self.heatmap, W.HBox([self.layer, self.position]), self.text, self.probs]
        if self.source.session is not None:
            children += [W.HBox([self.action, self.expert]), self.next_token]
        super().__init__(children)
        if self.source.session is not None:
            guarded(self.status, self._run)
        else:
            guarded(self.status, self._load)

    # data -> view
    def _run(self):
        self.status.value = "running…"
        self.source.run(self.prompt.value)
        self._show(sequence_routing(self.source.dataset, 0))

    def _load(self):
        self._show(sequence_routing(self.source.dataset, self.sequence.value))

    def _show(self, routing: SequenceRouting):
        self.routing = routing
        T = len(routing.pieces)
        if T == 0:
            raise ValueError("the sequence has no tokens")
        layers = [int(x) for x in routing.layers]
        with self.layer.hold_trait_notifications(), self.position.hold_trait_notifications():
            if list(self.layer.options) != layers:
                self.layer.options = layers
            self.position.max = T - 1
            self.position.value = min(self.position.value, T - 1)
        refresh(self.heatmap, figures.routing_heatmap(routing, self.layer.value, self.position.value))
        if self.heatmap.data:
            self.heatmap.data[0].on_click(self._clicked)
        self.text.value = figures.token_html(routing, self.layer.value, self.position.value)
        refresh(self.probs, figures.token_probs_figure(routing, self.position.value))
        self.status.value = (f"{T} tokens, {len(layers)} layers, {routing.num_experts} experts. "
                             f"Click a cell of the heatmap to select a token.")
        self._draw_next_token()

    def _draw_layer(self):
        if self.routing is None:
            return
        with self.heatmap.batch_update():
            self.heatmap.layout.shapes = figures.routing_frames(self.routing, self.layer.value, self.position.value)
            self.heatmap.layout.title.text = figures.routing_title(self.layer.value)
        self.text.value = figures.token_html(self.routing, self.layer.value, self.position.value)
        self._draw_next_token()

    def interventions(self) -> list:
        """The intervention the controls describe (empty for "none")."""
        from grokscope.interventions import ban, zero

        if self.source.session is None or self.action.value == "none":
            return []
        make = ban if self.action.value == "ban" else zero
        return [make(self.expert.value, layer=self.layer.value)]

    def _draw_next_token(self):
        if self.source.session is None or self.routing is None:
            return
        from grokscope.widgets.data import next_token_distributions

        interventions = self.interventions()
        position = self.position.value
        pieces, p, q = next_token_distributions(self.source.session, self.routing.token_ids, position, interventions)
        what = interventions[0].describe() if interventions else "no intervention"
        title = figures.subtitled(f"next token after '{self.routing.pieces[position]}' (position {position})", what)
        refresh(self.next_token, figures.next_token_figure(pieces, p, q, title))

    def _draw_position(self):
        if self.routing is None:
            return
        self.heatmap.layout.shapes = figures.routing_frames(self.routing, self.layer.value, self.position.value)
        self.text.value = figures.token_html(self.routing, self.layer.value, self.position.value)
        refresh(self.probs, figures.token_probs_figure(self.routing, self.position.value))
        self._draw_next_token()

    def _clicked(self, trace, points, state):
        if not points.point_inds:
            return
        row, col = points.point_inds[0] if isinstance(points.point_inds[0], (list, tuple)) else (None, points.xs[0])
        with self.hold_trait_notifications():
            if row is not None:
                self.layer.value = int(self.routing.layers[row])
            self.position.value = int(col)

    def select(self, layer: int | None = None, position: int | None = None) -> "RoutingExplorer":
        """Selects a layer and/or token (as the slider and a click would)."""
        if layer is not None:
            self.layer.value = layer
        if position is not None:
            self.position.value = position
        return self

    def static_parts(self):
        if self.routing is None:
            return [f"<pre>{html.escape(self.status.value)}</pre>"]
        return [figures.routing_heatmap(self.routing, self.layer.value, self.position.value),
                figures.token_html(self.routing, self.layer.value, self.position.value),
                figures.token_probs_figure(self.routing, self.position.value)]
