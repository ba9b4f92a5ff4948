"""AttributionExplorer: how much of each token's FFN update is routed and how much dense, and
each chosen expert's direct effect on the target token's logit."""

from __future__ import annotations

import dataclasses
import html

import ipywidgets as W
import numpy as np
import plotly.graph_objects as go
import xarray as xr

from grokscope.analysis.attribution import TARGETS, direct_logit_attribution, ffn_shares, readout_weights
from grokscope.record import RecordSpec
from grokscope.tokenizer import display_piece
from grokscope.widgets import figures
from grokscope.widgets.base import FigureWidget, Source, View, busy, guarded, mark_updating, refresh, short, warm_up
from grokscope.widgets.data import sequence_labels
from grokscope.widgets.routing import DEFAULT_PROMPT

__all__ = ["AttributionExplorer", "SequenceAttribution", "sequence_attribution", "RECORD"]

RECORD = RecordSpec(routing=True, residual="all", expert_outputs="all")
"""What the view records when it runs a Session: routing, every layer's residual and expert outputs."""


@dataclasses.dataclass(frozen=True)
class SequenceAttribution:
    """One sequence's attribution, layer-major, real tokens only (T = the sequence's length).

    Attributes:
      pieces: the tokens' pieces with whitespace made visible, [T].
      token_ids: [T].
      layers: the expert layers' numbers, [L].
      routed_share, routed_norm, dense_norm: from `analysis.ffn_shares`, [L, T].
      expert_dla: the chosen experts' direct logit attribution, [L, T, K].
      expert_index, expert_gate: the chosen experts and their gates, [L, T, K].
      dense_dla: the dense MLP's direct logit attribution (0 without one), [L, T].
      target: the token whose logit is attributed at each position (-1: none), [T].
      target_pieces: their pieces ("" where none), [T].
      target_logit: its pre-cap logit, [T].
      target_mode: "next", "argmax" or "ids".
      dense: whether the model has a dense MLP.
      num_experts: E.
    """

    pieces: list[str]
    token_ids: np.ndarray
    layers: np.ndarray
    routed_share: np.ndarray
    routed_norm: np.ndarray
    dense_norm: np.ndarray
    expert_dla: np.ndarray
    expert_index: np.ndarray
    expert_gate: np.ndarray
    dense_dla: np.ndarray
    target: np.ndarray
    target_pieces: list[str]
    target_logit: np.ndarray
    target_mode: str
    dense: bool
    num_experts: int

    @property
    def total(self) -> np.ndarray:
        """Each layer's whole FFN direct effect: the slots' `expert_dla` plus `dense_dla`, [L, T]."""
        return self.expert_dla.sum(-1) + self.dense_dla


def _piece(ds: xr.Dataset, token: int) -> str:
    if token < 0:
        return ""
    if "vocab_piece" in ds:
        return display_piece(str(ds["vocab_piece"].values[token]))
    return str(token)


def sequence_attribution(ds: xr.Dataset, readout: dict, sequence: int, target="next") -> SequenceAttribution:
    """The attribution of one sequence (by position in `ds`), from `analysis.ffn_shares` and
    `analysis.direct_logit_attribution` (see them for the definitions)."""
    one = ds.isel(sequence=[sequence])
    T = int(one["length"].values[0])
    if T == 0:
        raise ValueError("the sequence has no tokens")
    cut = dict(sequence=0, position=slice(0, T))
    shares = ffn_shares(one).isel(cut).compute()
    dla = direct_logit_attribution(one, readout, target).isel(cut).compute()

    def layer_major(x: xr.DataArray) -> np.ndarray:
        return np.asarray(x.transpose("expert_layer", "position", ...).values)

    ids = np.asarray(one["tokens"].values[0, :T])
    targets = np.asarray(dla["target"].values)
    return SequenceAttribution(
        pieces=[_piece(ds, int(i)) for i in ids], token_ids=ids, layers=np.asarray(ds["expert_layer"].values),
        routed_share=layer_major(shares["routed_share"]), routed_norm=layer_major(shares["routed_norm"]),
        dense_norm=layer_major(shares["dense_norm"]), expert_dla=layer_major(dla["expert_dla"]),
        expert_index=layer_major(dla["expert_index"]).astype(np.int64), expert_gate=layer_major(dla["expert_gate"]),
        dense_dla=layer_major(dla["dense_dla"]), target=targets, target_pieces=[_piece(ds, int(t)) for t in targets],
        target_logit=np.asarray(dla["target_logit"].values), target_mode=str(dla.attrs["target"]),
        dense=bool(dla.attrs["dense_mlp"]), num_experts=int(ds.sizes["expert"]))


class AttributionExplorer(View):
    """Where each token's FFN update comes from, and what it does to the target logit.

    - a layer x token heatmap of the routed share of the FFN output (1 for Grok-1, which has
      no dense MLP; Grok-2 mixes a dense MLP in),
    - a layer x token heatmap of each layer's FFN direct effect on the target token's logit
      (click a cell to select that token),
    - for the selected token, the direct effect of each chosen expert (and of the dense MLP)
      per layer, as bars in the experts' colors.

    The target is the next token of the text ("next") or the model's own top prediction
    ("argmax"); the direct effects are the linearization of
    `grokscope.analysis.direct_logit_attribution`, in pre-cap logits.

    Args:
      source: a `Session` (a text box runs what you type, recording `RECORD`) or a Dataset
        from `open_store` / `Session.run` that holds routing, expert outputs and the residual
        after the last layer (a selector picks the sequence).
      readout: `readout_weights(params, config)` of the model (a Session's by default; needed
        with a Dataset).
      prompt: the first prompt to run (Session only).
      sequence: the first sequence to show (Dataset only).
      target: "next" or "argmax".
    """

    def __init__(self, source, readout: dict | None = None, prompt: str = DEFAULT_PROMPT, sequence: int = 0,
                 target: str = "next"):
        self.source = Source(source, record=RECORD)
        session = self.source.session
        if readout is None:
            if session is None:
                raise ValueError("AttributionExplorer: with a Dataset, pass readout=readout_weights(params, config) "
                                 "of the model that wrote it")
            readout = readout_weights(session.params, session.config)
        self.readout = readout
        self.status = W.HTML()
        self.target = W.ToggleButtons(options=list(TARGETS), value=target, description="target",
                                      style={"button_width": "70px"})
        self.position = W.IntSlider(min=0, max=0, description="token", continuous_update=False,
                                    layout=W.Layout(width="420px", max_width="100%"))
        self.shares = FigureWidget()
        self.effects = FigureWidget()
        self.bars = FigureWidget()
        self.attribution: SequenceAttribution | None = None
        self._syncing = False
        if session is not None:
            self.prompt = W.Textarea(value=prompt, description="prompt", rows=3, layout=W.Layout(flex="1 1 auto"))
            self.run_button = W.Button(description="Run", button_style="primary", icon="play")
            self.run_button.on_click(lambda _: guarded(self.status, self._run))
            chooser = W.HBox([self.prompt, self.run_button], layout=W.Layout(width="100%"))
        else:
            ds = self.source.dataset
            self.sequence = W.Dropdown(options=[(label, i) for i, label in enumerate(sequence_labels(ds))],
                                       value=sequence, description="sequence", layout=W.Layout(width="95%"))
            self.sequence.observe(lambda _: guarded(self.status, self._load), names="value")
            chooser = self.sequence
        self.target.observe(lambda _: guarded(self.status, self._load), names="value")
        self.position.observe(lambda _: None if self._syncing else guarded(self.status, self._draw_position),
                              names="value")
        super().__init__([chooser, self.status, self.target, self.shares, self.effects, self.position, self.bars],
                         layout=W.Layout(width="100%"))
        guarded(self.status, self._run if session is not None else self._load)
        if session is not None:
            warm_up(session, "run", RECORD)

    # data -> view
    def _run(self):
        busy(self.status, f"running '{short(self.prompt.value)}'")
        mark_updating(self.shares, self.effects, self.bars)
        self.source.run(self.prompt.value)
        self._load()

    def _load(self):
        if self.source.dataset is None:
            return
        sequence = 0 if self.source.session is not None else self.sequence.value
        self._show(sequence_attribution(self.source.dataset, self.readout, sequence, self.target.value))

    def _show(self, a: SequenceAttribution):
        self.attribution = a
        T = len(a.pieces)
        self._syncing = True
        try:
            self.position.max = T - 1
            self.position.value = min(self.position.value, T - 1)
        finally:
            self._syncing = False
        position = self.position.value
        refresh(self.shares, figures.ffn_share_heatmap(a.routed_share, a.routed_norm, a.dense_norm, a.pieces,
                                                       a.layers, position, a.dense))
        refresh(self.effects, figures.dla_heatmap(a.total, a.pieces, a.target_pieces, a.layers, position,
                                                  a.target_mode))
        if self.effects.data:
            self.effects.data[0].on_click(self._clicked)
        refresh(self.bars, self._bars_figure(position))
        self.status.value = (f"{T} tokens, {len(a.layers)} layers, {a.num_experts} experts"
                             f"{', with a dense MLP' if a.dense else ''}. Click a cell of the second heatmap "
                             f"to select a token.")

    def _bars_figure(self, position: int) -> go.Figure:
        a = self.attribution
        piece = a.pieces[position]
        if a.target[position] < 0:
            title = figures.subtitled(f"direct effect of each expert at token {position} '{piece}'",
                                      "no target here (the last token has no next token)")
        else:
            total = float(np.nansum(a.total[:, position]))
            title = figures.subtitled(
                f"direct effect on the logit of '{a.target_pieces[position]}' at token {position} '{piece}'",
                f"{a.target_mode} token; its logit {a.target_logit[position]:.3f}, of which the FFNs directly "
                f"{total:.3f} (pre-cap)")
        return figures.dla_bars(a.expert_dla[:, position], a.expert_index[:, position], a.expert_gate[:, position],
                                a.dense_dla[:, position] if a.dense else None, a.layers, a.num_experts, title)

    def _draw_position(self):
        if self.attribution is None:
            return
        position = self.position.value
        L = len(self.attribution.layers)
        self.shares.layout.shapes = figures.token_frame(L, position)
        self.effects.layout.shapes = figures.token_frame(L, position)
        refresh(self.bars, self._bars_figure(position))

    def _clicked(self, trace, points, state):
        if not points.point_inds:
            return
        first = points.point_inds[0]
        self.position.value = int(first[1] if isinstance(first, (list, tuple)) else points.xs[0])

    def select(self, position: int | None = None, target: str | None = None) -> "AttributionExplorer":
        """Selects a token and/or the target (as the slider and the buttons would)."""
        if target is not None:
            self.target.value = target
        if position is not None:
            self.position.value = position
        return self

    def static_parts(self):
        if self.attribution is None:
            return [f"<pre>{html.escape(self.status.value)}</pre>"]
        position = self.position.value
        a = self.attribution
        return [figures.ffn_share_heatmap(a.routed_share, a.routed_norm, a.dense_norm, a.pieces, a.layers, position,
                                          a.dense),
                figures.dla_heatmap(a.total, a.pieces, a.target_pieces, a.layers, position, a.target_mode),
                self._bars_figure(position)]
