"""What every view shares: where its data comes from (a Session or a Dataset), how its plotly
widgets are refreshed, and its static copy for readers without a kernel."""

from __future__ import annotations

from typing import Any, Callable

import ipywidgets as W
import plotly.graph_objects as go
import plotly.io as pio
import xarray as xr

__all__ = ["Source", "refresh", "static_html", "View", "guarded"]

_sent_plotlyjs = False


class Source:
    """A view's data: a `Session` (live: prompts typed in a text box are run) or a Dataset
    from `open_store` / `Session.run` (a selector picks the sequence)."""

    def __init__(self, source, record=None):
        from grokscope.session import Session

        self.session = source if isinstance(source, Session) else None
        if self.session is None and not isinstance(source, xr.Dataset):
            raise TypeError(f"expected a grokscope Session or an xarray Dataset (from open_store), "
                            f"got {type(source).__name__}")
        self.record = record
        self.dataset: xr.Dataset | None = None if self.session is not None else source

    def run(self, prompt: str) -> xr.Dataset:
        self.dataset = self.session.run(prompt, record=self.record)
        return self.dataset


def refresh(widget: go.FigureWidget, figure: go.Figure) -> None:
    """Makes `widget` show `figure` (traces updated in place when they match, so the
    browser redraws once)."""
    same = len(widget.data) == len(figure.data) and all(a.type == b.type for a, b in zip(widget.data, figure.data))
    if not same:
        widget.data = ()
        widget.add_traces(list(figure.data))
    with widget.batch_update():
        if same:
            for old, new in zip(widget.data, figure.data):
                props = new.to_plotly_json()
                props.pop("type", None)
                old.update(props, overwrite=True)
        widget.layout.update(figure.layout.to_plotly_json(), overwrite=True)


def static_html(parts: list[go.Figure | str]) -> str:
    """Figures (and HTML strings) as self-contained HTML: plotly.js is inlined once per
    kernel (the first static copy), so an exported notebook renders with no kernel and no
    network."""
    global _sent_plotlyjs
    out = []
    for part in parts:
        if isinstance(part, str):
            out.append(part)
            continue
        out.append(pio.to_html(part, full_html=False, include_plotlyjs=not _sent_plotlyjs,
                               config={"displaylogo": False}))
        _sent_plotlyjs = True
    return "\n".join(out)


class View(W.VBox):
    """An ipywidgets box whose display also carries a static HTML copy of its figures
    (`static_parts`), shown by viewers without a widget manager (e.g. nbconvert's HTML of a
    notebook saved without widget state)."""

    def static_parts(self) -> list[go.Figure | str]:  # pragma: no cover - overridden
        return []

    def _repr_mimebundle_(self, **kwargs) -> dict[str, Any]:
        bundle = super()._repr_mimebundle_(**kwargs)
        try:
            bundle["text/html"] = static_html(self.static_parts())
        except Exception as e:  # noqa: BLE001 - the live view must still show
            bundle["text/html"] = f"<pre>static copy unavailable: {type(e).__name__}: {e}</pre>"
        return bundle


def guarded(status: W.HTML, action: Callable[[], None]) -> None:
    """Runs a UI action; an error is shown in the view's status line, not lost in a log."""
    try:
        action()
    except Exception as e:  # noqa: BLE001 - shown to the user
        import html

        status.value = f'<span style="color:#b00">{html.escape(type(e).__name__)}: {html.escape(str(e))}</span>'
