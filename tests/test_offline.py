"""What a notebook shows without a kernel: a view's static copy follows its state, plotly.js
travels once, plain figures carry an HTML copy, and a figure widget's state stays small.

The browser side (an exported notebook opened with the network blocked, and the live view
hiding its copy in JupyterLab) is in test_notebooks.py and test_browser.py."""

import base64
import gzip
import json
import re

import numpy as np
import plotly.graph_objects as go
import pytest
from IPython.core import display_functions

from grokscope.widgets import offline
from grokscope.widgets.base import FigureWidget
from grokscope.widgets.routing import RoutingExplorer


@pytest.fixture(scope="module")
def store(bundled_session):
    return bundled_session.run(["def mean(xs):\n    return sum(xs) / len(xs)\n", "The river ran quietly to the sea."])


@pytest.fixture
def published(monkeypatch):
    """What `display` / `update_display` would publish to the notebook, in order."""
    out: list[dict] = []

    def display(obj, raw=False, display_id=None, update=False, **kwargs):
        assert raw
        if display_id is True:
            display_id = f"id{len(out)}"
        out.append({"data": obj, "display_id": display_id, "update": update})
        return display_functions.DisplayHandle(display_id) if display_id and not update else None

    monkeypatch.setattr(display_functions, "display", display)
    monkeypatch.setattr(offline, "_sent_in", set())
    return out


def _figure_json(html: str) -> list[dict]:
    return [json.loads(m.replace("<\\/", "</")) for m in
            re.findall(r'<script type="application/json" id="[^"]+">(.*?)</script>', html, re.S)]


def test_figure_html_holds_the_figure_and_no_plotlyjs():
    fig = go.Figure(go.Bar(x=["a", "b"], y=[1.5, 2.5], hovertext=["</script><b>x</b>", "y"]))
    html = offline.figure_html(fig)
    (payload,) = _figure_json(html)
    assert _values(payload["data"][0]["y"]) == [1.5, 2.5]
    assert payload["data"][0]["hovertext"][0] == "</script><b>x</b>"  # survives inside <script>
    assert "</script><b>" not in html.split('type="application/json"')[1].split("</script>")[0]
    assert len(html) < 10_000


def test_the_loader_unpacks_to_plotlyjs():
    from plotly.offline import get_plotlyjs

    packed = re.search(r'var packed = "([A-Za-z0-9+/=]+)"', offline.loader_html()).group(1)
    assert gzip.decompress(base64.b64decode(packed)).decode("utf-8") == get_plotlyjs()
    assert len(offline.loader_html()) < len(get_plotlyjs()) / 2


def test_a_view_publishes_the_loader_once_and_its_copy_follows_the_controls(store, published):
    explorer = RoutingExplorer(store)
    explorer._ipython_display_()
    loader, widget, static = published
    assert "var packed" in loader["data"]["text/html"]
    assert "application/vnd.jupyter.widget-view+json" in widget["data"]
    assert "text/html" not in widget["data"]  # nbconvert would pick a widget it cannot draw
    assert f'data-view="{explorer._view_id}"' in static["data"]["text/html"]
    first = _figure_json(static["data"]["text/html"])
    assert "(framed: layer 0)" in first[0]["layout"]["title"]["text"]

    explorer.select(layer=2, position=3)  # two controls: one update each, never the loader again
    updates = published[3:]
    assert updates and all(u["update"] and u["display_id"] == static["display_id"] for u in updates)
    last = _figure_json(updates[-1]["data"]["text/html"])
    assert "(framed: layer 2)" in last[0]["layout"]["title"]["text"]
    frames = [s for s in last[0]["layout"]["shapes"] if s.get("line", {}).get("dash") == "dot"]
    assert frames and {s["x0"] for s in frames} == {2.5}  # the token column that was selected

    RoutingExplorer(store, sequence=1)._ipython_display_()
    assert sum("var packed" in p["data"].get("text/html", "") for p in published) == 1


def _values(array) -> list:
    """A plotly JSON array: a list, or numpy's bytes as {"dtype", "bdata"} (plotly >= 6)."""
    if isinstance(array, dict):
        return np.frombuffer(base64.b64decode(array["bdata"]), dtype=array["dtype"]).tolist()
    return list(array)


def test_plain_figures_carry_plotly_json_and_an_html_copy(published):
    fig = go.Figure(go.Scatter(y=np.array([3.0, 1.0, 2.0])))
    bundle = offline.GrokscopeRenderer().to_mimebundle(fig.to_dict())
    assert _values(bundle["application/vnd.plotly.v1+json"]["data"][0]["y"]) == [3.0, 1.0, 2.0]
    assert _values(_figure_json(bundle["text/html"])[0]["data"][0]["y"]) == [3.0, 1.0, 2.0]
    assert len(published) == 1 and "var packed" in published[0]["data"]["text/html"]


def test_a_figure_widget_state_does_not_carry_plotlys_bundle():
    widget = FigureWidget(go.Figure(go.Bar(y=[1, 2])))
    state = json.dumps(widget.get_state(), default=str)
    assert len(state) < 50_000, len(state)
    assert len(str(go.FigureWidget()._esm)) > 1_000_000  # what plotly's own widget stores


def test_a_figure_widget_answers_its_front_end(monkeypatch):
    widget = FigureWidget()
    sent = []
    monkeypatch.setattr(widget, "send", lambda content, buffers=None: sent.append((content, buffers)))
    widget.add_bar(y=[4, 5])  # an update the front end may have missed before it started

    def request(kind):
        widget._handle_msg({"content": {"data": {"method": "custom", "content": {"type": kind}}}, "buffers": []})

    request("grokscope:bundle-request")
    (content, buffers), = sent
    assert content == {"type": "grokscope:bundle"} and bytes(buffers[0]) == str(go.FigureWidget._esm).encode()
    request("grokscope:sync")
    assert sent[-1][0] == {"type": "grokscope:synced"}
    assert [_values(t["y"]) for t in widget._widget_data] == [[4, 5]]
