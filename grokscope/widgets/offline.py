"""What a notebook shows without a kernel: static copies of figures and views that render
offline, in nbconvert's HTML and in a saved notebook reopened with no kernel.

- `loader_html`: plotly.js, gzip-compressed and base64-encoded (about 1.4 MB instead of
  4.8 MB), unpacked in the browser into `window.Plotly`. A kernel sends it once, as an
  output of its own (`ensure_loader`), before its first static figure.
- `figure_html`: one figure as a `<div>` and its JSON; a script draws it with
  `window.Plotly` once that is loaded, and only while the element is visible (a view's hidden
  copy costs nothing in a live notebook).
- `GrokscopeRenderer` (plotly renderer "grokscope", the default inside a kernel once
  `grokscope.widgets` is imported): a plain figure's output carries plotly's own JSON (drawn
  by JupyterLab) and the static HTML copy (what nbconvert's HTML shows).
"""

from __future__ import annotations

import base64
import functools
import gzip
import html
import json
import uuid
from typing import Sequence

import plotly.graph_objects as go
import plotly.io as pio
from plotly.io._base_renderers import MimetypeRenderer

__all__ = ["loader_html", "figure_html", "static_html", "ensure_loader", "GrokscopeRenderer",
           "install_renderer", "STATIC_CLASS"]

STATIC_CLASS = "grokscope-static"
_sent_in: set[str] = set()  # "kernel" or the cell ids whose output carries the loader


@functools.lru_cache(maxsize=1)
def _plotlyjs_gzip_base64() -> str:
    from plotly.offline import get_plotlyjs

    return base64.b64encode(gzip.compress(get_plotlyjs().encode("utf-8"), compresslevel=9, mtime=0)).decode("ascii")


def loader_html() -> str:
    """A `<script>` that unpacks plotly.js into `window.Plotly` (no network; any AMD loader on
    the page, e.g. require.js in nbconvert's HTML, is bypassed so the global is always set)."""
    return (
        '<div class="grokscope-plotlyjs" style="display:none"></div>'
        "<script>(function () {\n"
        "  if (window.Plotly || window.__grokscopePlotlyLoading) { return; }\n"
        "  window.__grokscopePlotlyLoading = true;\n"
        f'  var packed = "{_plotlyjs_gzip_base64()}";\n'
        "  var bytes = Uint8Array.from(atob(packed), function (c) { return c.charCodeAt(0); });\n"
        "  var stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream('gzip'));\n"
        "  new Response(stream).text().then(function (code) {\n"
        "    var amd = window.define; window.define = undefined;\n"
        "    try { (0, eval)(code); } finally { window.define = amd; }\n"
        "    window.dispatchEvent(new Event('grokscope-plotly-ready'));\n"
        "  });\n"
        "})();</script>")


def _script_json(value: str) -> str:
    """JSON text safe inside a `<script>` element."""
    return value.replace("</", "<\\/").replace("<!--", "<\\!--")


def figure_html(fig: go.Figure) -> str:
    """One figure as offline HTML: drawn by `window.Plotly` (see `loader_html`) when visible,
    filling the width of its container."""
    fig = go.Figure(fig)
    div = f"grokscope-figure-{uuid.uuid4().hex}"
    height = fig.layout.height or 450
    payload = _script_json(fig.to_json())
    return (
        f'<div id="{div}" class="grokscope-figure" style="width:100%;min-height:{int(height)}px"></div>'
        f'<script type="application/json" id="{div}-json">{payload}</script>'
        "<script>(function () {\n"
        f'  var el = document.getElementById("{div}");\n'
        "  function draw() {\n"
        "    if (!el || el.dataset.drawn) { return; }\n"
        "    if (el.offsetParent === null) {\n"
        "      if (!el.dataset.watched) { el.dataset.watched = '1'; new ResizeObserver(draw).observe(el); }\n"
        "      return;\n"
        "    }\n"
        "    if (!window.Plotly) { window.addEventListener('grokscope-plotly-ready', draw, {once: true}); return; }\n"
        f'    var fig = JSON.parse(document.getElementById("{div}-json").textContent);\n'
        "    var layout = Object.assign({}, fig.layout || {}, {autosize: true}); delete layout.width;\n"
        "    el.dataset.drawn = '1';\n"
        "    window.Plotly.newPlot(el, fig.data || [], layout, {displaylogo: false, responsive: true});\n"
        "  }\n"
        "  draw();\n"
        "})();</script>")


def static_html(parts: Sequence[go.Figure | str]) -> str:
    """Figures (and HTML strings) as offline HTML, in order."""
    return "\n".join(part if isinstance(part, str) else figure_html(part) for part in parts)


def _cell_id() -> str | None:
    try:
        from IPython import get_ipython

        shell = get_ipython()
        parent = shell.kernel.get_parent() if shell is not None and hasattr(shell, "kernel") else None
    except Exception:  # noqa: BLE001 - outside a kernel there is no cell
        return None
    return (parent or {}).get("metadata", {}).get("cellId")


def ensure_loader() -> None:
    """Displays `loader_html` as an output of its own unless this kernel already sent it (from
    another cell: re-running the cell that carried it clears it, so it is sent again)."""
    from IPython.core import display_functions

    cell = _cell_id()
    if _sent_in and (cell is None or cell not in _sent_in):
        return
    _sent_in.clear()
    _sent_in.add(cell or "kernel")
    display_functions.display({"text/html": loader_html()}, raw=True)


class GrokscopeRenderer(MimetypeRenderer):
    """Plotly's JSON (drawn by JupyterLab's plotly extension) together with an offline HTML
    copy (what nbconvert's HTML export shows); plotly.js travels once per kernel, in
    `ensure_loader`'s output."""

    def to_mimebundle(self, fig_dict):
        ensure_loader()
        fig = go.Figure(fig_dict)
        return {"application/vnd.plotly.v1+json": json.loads(pio.to_json(fig, validate=False)),
                "text/html": figure_html(fig)}


def install_renderer() -> None:
    """Registers the "grokscope" plotly renderer and makes it the default inside an IPython
    kernel (elsewhere plotly's defaults are left alone)."""
    from grokscope import _in_a_kernel

    pio.renderers["grokscope"] = GrokscopeRenderer()
    if _in_a_kernel():
        pio.renderers.default = "grokscope"


def wrap_static(view_id: str, body: str) -> str:
    """A view's static copy, hidden by the view's figure widgets once one of them has drawn."""
    return f'<div class="{STATIC_CLASS}" data-view="{html.escape(view_id)}">{body}</div>'
