"""GenerationView: the model writes, and each new token appears with its routing."""

from __future__ import annotations

import html

import ipywidgets as W
import numpy as np
import plotly.graph_objects as go

from grokscope.widgets import figures
from grokscope.widgets.base import FigureWidget, View, busy, guarded, mark_updating, refresh, short, warm_up
from grokscope.widgets.data import sequence_routing

__all__ = ["GenerationView"]


class GenerationView(View):
    """Type a prompt, press Generate: tokens appear as they are written, each on the color of
    its first-choice expert at the chosen layer, generated ones underlined (hover: both experts
    and gates at that layer); when done, the layer x token heatmap of the whole sequence (generated tokens after the
    dotted line).

    Args:
      session: a `Session`.
      prompt, max_new_tokens, temperature: the first values of the controls.
    """

    def __init__(self, session, prompt: str = "def mean(values):\n", max_new_tokens: int = 24,
                 temperature: float = 0.0):
        from grokscope.session import Session

        if not isinstance(session, Session):
            raise TypeError(f"GenerationView needs a grokscope Session, got {type(session).__name__}")
        self.session = session
        self.status = W.HTML()
        self.prompt = W.Textarea(value=prompt, description="prompt", rows=3, layout=W.Layout(width="95%"))
        self.max_new_tokens = W.BoundedIntText(value=max_new_tokens, min=1, max=session.config.sequence_len,
                                               description="new tokens", layout=W.Layout(width="200px"))
        self.temperature = W.FloatSlider(value=temperature, min=0.0, max=2.0, step=0.1, description="temperature",
                                         continuous_update=False, style={"description_width": "initial"})
        self.layer = W.Dropdown(options=list(range(session.config.num_layers)), value=0, description="color by layer",
                                style={"description_width": "initial"}, layout=W.Layout(width="220px"))
        self.button = W.Button(description="Generate", button_style="primary", icon="play")
        self.text = W.HTML()
        self.heatmap = FigureWidget()
        self.generation = None
        self._spans: list[str] = []
        self._prompt_html = ""
        self.button.on_click(lambda _: guarded(self.status, self.generate))
        self.layer.observe(lambda _: guarded(self.status, self._redraw), names="value")
        for control in (self.prompt, self.max_new_tokens):
            control.observe(lambda _: self._warm_up(), names="value")
        super().__init__([W.HBox([self.prompt], layout=W.Layout(width="100%")),
                          W.HBox([self.max_new_tokens, self.temperature, self.layer, self.button],
                                 layout=W.Layout(flex_flow="row wrap", width="100%")),
                          self.status, self.text, self.heatmap], layout=W.Layout(width="100%"))
        self._warm_up()

    def _warm_up(self) -> None:
        """Compiles what Generate will run for the prompt and length in the boxes, in the background."""
        try:
            n = max(1, len(self.session.tokenizer.encode(self.prompt.value)))
        except Exception:  # noqa: BLE001 - Generate reports a bad prompt
            return
        total = n + int(self.max_new_tokens.value)
        if total <= self.session.config.sequence_len:
            warm_up(self.session, "generate", lengths=[n], total=total)

    def _span(self, piece: str, experts, gates, generated: bool) -> str:
        colors = figures.expert_colors(self.session.config.num_experts)
        tip = ", ".join(f"expert {int(e)} gate {float(g):.3f}" for e, g in zip(experts, gates))
        background = colors[int(experts[0])]
        mark = "text-decoration:underline;text-decoration-thickness:2px;" if generated else ""  # in the text's color
        return (f'<span title="{html.escape(tip)}" style="background:{background};color:{figures.text_color(background)};'
                f'padding:1px 2px;margin:1px;border-radius:3px;{mark}">{html.escape(piece)}</span>'
                + ("<br>" if piece.endswith("↵") else ""))

    def _show(self):
        self.text.value = ('<div style="font-family:DejaVu Sans Mono, monospace;font-size:13px;line-height:1.9">'
                           + self._prompt_html + "".join(self._spans) + "</div>")

    def generate(self):
        """Runs the generation with the controls' settings (what the button does)."""
        from grokscope.tokenizer import display_piece

        self._spans = []
        busy(self.status, f"generating after '{short(self.prompt.value)}'")
        mark_updating(self.heatmap)
        layer = self.layer.value
        tokenizer = self.session.tokenizer
        shown = [display_piece(piece) for piece in tokenizer.pieces(tokenizer.encode(self.prompt.value))]
        self._prompt_html = "".join(f'<span style="color:#777;padding:1px 2px;margin:1px">{html.escape(piece)}</span>'
                                    + ("<br>" if piece.endswith("↵") else "") for piece in shown)
        self._show()

        def on_token(position, token, record):
            piece = display_piece(tokenizer.pieces([token])[0])
            self._spans.append(self._span(piece, record["expert_index"][0, -1, layer],
                                          record["expert_gate"][0, -1, layer], True))
            self._show()
            busy(self.status, f"generating: {len(self._spans)} of {self.max_new_tokens.value} tokens")

        self.generation = self.session.generate(self.prompt.value, max_new_tokens=self.max_new_tokens.value,
                                                temperature=self.temperature.value, on_token=on_token)
        self._prompt_html = ""
        self._redraw()
        n_new = len(self.generation.token_ids) - self.generation.prompt_length
        self.status.value = f"{n_new} new tokens after a {self.generation.prompt_length}-token prompt"

    def _redraw(self):
        if self.generation is None:
            return
        ds = self.generation.dataset
        routing = sequence_routing(ds, 0)
        layer_index = int(np.flatnonzero(routing.layers == self.layer.value)[0])
        P = self.generation.prompt_length
        self._spans = [self._span(piece, routing.expert_index[layer_index, t], routing.expert_gate[layer_index, t],
                                  t >= P) for t, piece in enumerate(routing.pieces)]
        self._show()
        fig = figures.routing_heatmap(routing, self.layer.value)
        fig.add_vline(x=P - 0.5, line=dict(color="#222", dash="dot"))
        fig.update_layout(title=figures.subtitled("routing of the prompt and the generated tokens",
                                                  f"generated after the dotted line; framed: layer {self.layer.value}"))
        refresh(self.heatmap, fig)

    def static_parts(self):
        if self.generation is None:
            return [f"<pre>{html.escape(self.status.value)}</pre>"]
        return [self.text.value, go.Figure(self.heatmap)]
