"""What every view shares: where its data comes from (a Session or a Dataset), how its plotly
widgets are refreshed, and its static copy for readers without a kernel."""

from __future__ import annotations

import copy
import functools
import html
import uuid
import weakref
from pathlib import Path
from typing import Callable

import ipywidgets as W
import plotly.graph_objects as go
import traitlets
import xarray as xr

from grokscope.widgets import offline

__all__ = ["Source", "FigureWidget", "refresh", "View", "guarded", "busy", "mark_updating", "warm_up", "short",
           "UPDATING"]


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


class FigureWidget(go.FigureWidget):
    """plotly's FigureWidget, with its 5 MB front end sent by the kernel once per page (on the
    first widget's request) instead of stored in every widget's state; the saved notebook
    stays small. Once it has drawn, it hides its view's static copy (`View`)."""

    _esm = Path(__file__).with_name("figure_widget.js")
    _grokscope_view = traitlets.Unicode("").tag(sync=True)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.on_msg(_answer)


def _answer(widget: FigureWidget, content, buffers) -> None:
    """Replies to figure_widget.js: the front-end bundle, and the figure's current state just
    before plotly's front end starts (updates sent before it started would otherwise be lost)."""
    kind = content.get("type") if isinstance(content, dict) else None
    if kind == "grokscope:bundle-request":
        widget.send({"type": "grokscope:bundle"}, buffers=[_plotly_widget_bundle()])
    elif kind == "grokscope:sync":
        widget._widget_data = copy.deepcopy(widget._data)
        widget._widget_layout = copy.deepcopy(widget._layout)
        widget.send({"type": "grokscope:synced"})


@functools.lru_cache(maxsize=1)
def _plotly_widget_bundle() -> bytes:
    # anywidget has read plotly's bundle (plotly/package_data/widgetbundle.js) into the class
    return str(go.FigureWidget._esm).encode("utf-8")


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


class View(W.VBox):
    """An ipywidgets box shown together with a static HTML copy of what it shows
    (`static_parts`): a second output, kept equal to the view's current state after every
    control change, which viewers without a widget manager show (nbconvert's HTML, a saved
    notebook opened with no kernel) and which the live view hides once its figures draw."""

    def __init__(self, children=(), **kwargs):
        super().__init__(children, **kwargs)
        self._view_id = uuid.uuid4().hex
        self._static_display = None
        for widget in _descendants(self):
            if isinstance(widget, FigureWidget):
                widget._grokscope_view = self._view_id
            elif isinstance(widget, W.HTML) and getattr(self, "status", None) is widget:
                widget._grokscope_owner = weakref.ref(self)

    def static_parts(self) -> list[go.Figure | str]:  # pragma: no cover - overridden
        return []

    def static_copy(self) -> str:
        """The static copy's HTML (what a reader without a kernel sees)."""
        try:
            body = offline.static_html(self.static_parts())
        except Exception as e:  # noqa: BLE001 - the live view must still show
            body = f"<pre>static copy unavailable: {html.escape(type(e).__name__)}: {html.escape(str(e))}</pre>"
        return offline.wrap_static(self._view_id, body)

    def _ipython_display_(self) -> None:
        from IPython.core import display_functions

        offline.ensure_loader()
        display_functions.display(self._repr_mimebundle_(), raw=True)
        self._static_display = display_functions.display({"text/html": self.static_copy()}, raw=True,
                                                         display_id=True)

    def _update_static(self) -> None:
        if self._static_display is not None:
            self._static_display.update({"text/html": self.static_copy()}, raw=True)


def _descendants(widget):
    yield widget
    for child in getattr(widget, "children", ()):
        yield from _descendants(child)


_depth = 0


def guarded(status: W.HTML, action: Callable[[], None]) -> None:
    """Runs a UI action; an error is shown in the view's status line, not lost in a log."""
    global _depth
    _depth += 1
    try:
        action()
    except Exception as e:  # noqa: BLE001 - shown to the user
        status.value = f'<span style="color:#b00">{html.escape(type(e).__name__)}: {html.escape(str(e))}</span>'
    finally:
        _depth -= 1
    owner = getattr(status, "_grokscope_owner", None)
    view = owner() if owner is not None else None
    if _depth == 0 and view is not None:
        view._update_static()


UPDATING = "updating… "
"""What the title of a panel about to change starts with, until it shows the new state."""


def mark_updating(*widgets: go.FigureWidget) -> None:
    """Marks figure widgets whose content is about to change: their titles start with
    `UPDATING` until they are redrawn."""
    for widget in widgets:
        title = widget.layout.title.text or ""
        if widget.data and not title.startswith(UPDATING):
            widget.layout.title.text = UPDATING + title


def busy(status: W.HTML, what: str) -> None:
    """Says in a view's status line what is running."""
    status.value = f'<span style="color:#555">⏳ {html.escape(what)}…</span>'


def warm_up(session, kind: str, record=None, **kwargs) -> None:
    """Has `session` compile, in the background, the programs a view will run for prompts of
    other lengths (`Session._warm_up`); only inside a kernel, where a reader waits for them."""
    from grokscope import _in_a_kernel

    if _in_a_kernel():
        session._warm_up(kind, record, **kwargs)


def short(text: str, width: int = 40) -> str:
    """`text` on one line, cut to `width` characters (for status lines and titles)."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"
