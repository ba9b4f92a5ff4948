"""RoutingExplorer: which expert each token takes, layer by layer."""

from __future__ import annotations

import html

import ipywidgets as W
import plotly.graph_objects as go

from grokscope.widgets import figures
from grokscope.widgets.base import FigureWidget, Source, View, busy, guarded, mark_updating, refresh, short, warm_up
from grokscope.widgets.data import (InterventionEffect, SequenceRouting, intervention_effect, sequence_labels,
                                    sequence_routing)

__all__ = ["RoutingExplorer"]

DEFAULT_PROMPT = "def mean(values):\n    return sum(values) / len(values)\n"

class RoutingExplorer(View):
    """The main view of routing.

    - a layer x token heatmap of each token's first-choice expert (hover: token, layer, both
      chosen experts and their gates; click a cell to select that token and layer),
    - the text with each token on its expert's color at the layer of the slider,
    - the selected token's router probabilities at every layer (stacked bars per expert),
    - with a Session: an intervention control (ban or zero an expert at the layer of the slider);
      the heatmap then boxes the tokens the intervention reroutes (at any layer), and the
      next-token distribution after the selected token is shown as is and intervened, with
      KL(original‖intervened) and the change of the loss of the actual next token.

    While the model runs, the status line says what runs and the panels about to change have
    titles starting with "updating…"; every other title names the state its panel shows.

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
                                       layout=W.Layout(width="420px", max_width="100%"))
        self.position = W.IntSlider(min=0, max=0, description="token", continuous_update=False,
                                    layout=W.Layout(width="420px", max_width="100%"))
        self.heatmap = FigureWidget()
        self.text = W.HTML()
        self.probs = FigureWidget()
        self.routing: SequenceRouting | None = None
        self.effect: InterventionEffect | None = None
        self._syncing = False
        session = self.source.session
        if session is not None:
            self.prompt = W.Textarea(value=prompt, description="prompt", rows=3, layout=W.Layout(flex="1 1 auto"))
            self.run_button = W.Button(description="Run", button_style="primary", icon="play")
            self.run_button.on_click(lambda _: guarded(self.status, self._run))
            chooser = W.HBox([self.prompt, self.run_button], layout=W.Layout(width="100%"))
            self.action = W.ToggleButtons(options=["none", "ban", "zero"], value="none", description="intervene",
                                          style={"button_width": "60px"})
            self.expert = W.Dropdown(options=list(range(session.config.num_experts)), value=0, description="expert",
                                     layout=W.Layout(width="160px"))
            self.next_token = FigureWidget()
            for control in (self.action, self.expert):
                control.observe(lambda _: self._on(self._draw_intervention), names="value")
        else:
            ds = self.source.dataset
            self.sequence = W.Dropdown(options=[(label, i) for i, label in enumerate(sequence_labels(ds))],
                                       value=sequence, description="sequence", layout=W.Layout(width="95%"))
            self.sequence.observe(lambda _: self._on(self._load), names="value")
            chooser = self.sequence
        self.layer.observe(lambda _: self._on(self._draw_layer), names="value")
        self.position.observe(lambda _: self._on(self._draw_position), names="value")
        wrap = W.Layout(flex_flow="row wrap", width="100%")
        children = [chooser, self.status, self.heatmap, W.HBox([self.layer, self.position], layout=wrap), self.text,
                    self.probs]
        if session is not None:
            children += [W.HBox([self.action, self.expert], layout=wrap), self.next_token]
        super().__init__(children, layout=W.Layout(width="100%"))
        guarded(self.status, self._run if session is not None else self._load)
        if session is not None:
            warm_up(session, "one", self.source.record)

    def _on(self, action) -> None:
        if not self._syncing:
            guarded(self.status, action)

    # data -> view
    def _run(self):
        from grokscope.runner import encode

        session = self.source.session
        text = self.prompt.value
        busy(self.status, f"running '{short(text)}'")
        mark_updating(self.heatmap, self.probs, self.next_token)
        ids = encode(session.tokenizer, [text], session.config.sequence_len, truncate=None, lines=[1],
                     source="prompt")[0]
        position = min(self.position.value, len(ids) - 1)
        ds, _ = session._run_one(ids, (), position, record=self.source.record, text=text)
        self.source.dataset = ds
        routing = sequence_routing(ds, 0)
        self._select_range(routing)
        self.effect = intervention_effect(session, routing.token_ids, self.position.value, self.interventions(),
                                          original=routing)
        self._show(routing)

    def _load(self):
        routing = sequence_routing(self.source.dataset, self.sequence.value)
        self._select_range(routing)
        self._show(routing)

    def _select_range(self, routing: SequenceRouting) -> None:
        """Fits the sliders to a new sequence (without drawing: the caller draws once)."""
        T = len(routing.pieces)
        if T == 0:
            raise ValueError("the sequence has no tokens")
        layers = [int(x) for x in routing.layers]
        self._syncing = True
        try:
            if list(self.layer.options) != layers:
                self.layer.options = layers
            self.position.max = T - 1
            self.position.value = min(self.position.value, T - 1)
        finally:
            self._syncing = False

    def _show(self, routing: SequenceRouting):
        self.routing = routing
        self._draw_heatmap()
        self.text.value = figures.token_html(routing, self.layer.value, self.position.value)
        refresh(self.probs, figures.token_probs_figure(routing, self.position.value))
        self._draw_next_token()
        self.status.value = (f"{len(routing.pieces)} tokens, {len(routing.layers)} layers, {routing.num_experts} "
                             f"experts. Click a cell of the heatmap to select a token.")

    def _draw_heatmap(self):
        effect = self.effect if self.source.session is not None else None
        rerouted = effect.rerouted if effect is not None else None
        note = self.interventions()[0].describe() if rerouted is not None else ""
        refresh(self.heatmap, figures.routing_heatmap(self.routing, self.layer.value, self.position.value,
                                                      rerouted=rerouted, note=note))
        if self.heatmap.data:
            self.heatmap.data[0].on_click(self._clicked)

    def _update_effect(self, what: str, panels) -> None:
        """Recomputes the intervention's effect for the controls' state; marks `panels` as
        updating first when that runs the model."""
        session = self.source.session
        if session is None or self.routing is None:
            return
        interventions = self.interventions()
        position = self.position.value
        ids = self.routing.token_ids
        if not (session._has_run(ids, (), position, self.source.record)
                and session._has_run(ids, tuple(interventions), position, self.source.record)):
            busy(self.status, what)
            mark_updating(*panels)
        self.effect = intervention_effect(session, ids, position, interventions, original=self.routing)

    def _draw_layer(self):
        if self.routing is None:
            return
        if self.source.session is not None and self.action.value != "none":
            # the intervention sits at the layer of the slider: it changed with it
            self._update_effect(f"running {self.interventions()[0].describe()}", (self.heatmap, self.next_token))
            self._draw_heatmap()
            self._draw_next_token()
        else:
            with self.heatmap.batch_update():
                self.heatmap.layout.shapes = figures.routing_frames(self.routing, self.layer.value,
                                                                    self.position.value)
                self.heatmap.layout.title.text = figures.routing_title(self.layer.value)
        self.text.value = figures.token_html(self.routing, self.layer.value, self.position.value)
        self._ready()

    def _draw_intervention(self):
        if self.routing is None:
            return
        what = self.interventions()[0].describe() if self.interventions() else "the model without intervention"
        self._update_effect(f"running {what}", (self.heatmap, self.next_token))
        self._draw_heatmap()
        self._draw_next_token()
        self._ready()

    def _draw_position(self):
        if self.routing is None:
            return
        if self.source.session is not None:
            self._update_effect(f"next token after position {self.position.value}", (self.next_token,))
        self.heatmap.layout.shapes = figures.routing_frames(self.routing, self.layer.value, self.position.value)
        self.text.value = figures.token_html(self.routing, self.layer.value, self.position.value)
        refresh(self.probs, figures.token_probs_figure(self.routing, self.position.value))
        self._draw_next_token()
        self._ready()

    def _ready(self):
        if self.routing is not None and self.status.value.startswith('<span style="color:#555">⏳'):
            self.status.value = (f"{len(self.routing.pieces)} tokens, {len(self.routing.layers)} layers, "
                                 f"{self.routing.num_experts} experts. Click a cell of the heatmap to select a token.")

    def interventions(self) -> list:
        """The intervention the controls describe (empty for "none")."""
        from grokscope.interventions import ban, zero

        if self.source.session is None or self.action.value == "none":
            return []
        make = ban if self.action.value == "ban" else zero
        return [make(self.expert.value, layer=self.layer.value)]

    def next_token_title(self) -> str:
        """The next-token panel's title for the controls' state (the token and the intervention)."""
        position = self.position.value
        interventions = self.interventions()
        where = f"next token after '{figures.token_label(self.routing.pieces[position])}' (position {position})"
        return f"{where} under {interventions[0].describe()}" if interventions else f"{where}, no intervention"

    def _draw_next_token(self):
        if self.source.session is None or self.routing is None or self.effect is None:
            return
        e = self.effect
        refresh(self.next_token, figures.next_token_figure(e.pieces, e.original, e.intervened, self.next_token_title(),
                                                           kl=e.kl, delta_loss=e.delta_loss))

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
        parts = [go.Figure(self.heatmap), figures.token_html(self.routing, self.layer.value, self.position.value),
                 figures.token_probs_figure(self.routing, self.position.value)]
        if self.source.session is not None and self.next_token.data:
            parts.append(go.Figure(self.next_token))
        return parts
