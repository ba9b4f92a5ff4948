"""Real-browser tests: the quickstart notebook's widgets in JupyterLab, and the offline report.

They drive Debian's Chromium (/usr/bin/chromium) through playwright; without it they skip
locally and fail in CI (where CI is set).
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import browser  # noqa: E402

pytestmark = pytest.mark.slow  # minutes: `pytest -m 'not slow'` leaves them out while iterating

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "notebooks" / "01_quickstart.ipynb"
EXAMPLES = REPO / "grokscope" / "assets" / "grok-tiny" / "examples.jsonl"


@pytest.fixture
def playwright():
    if not Path(browser.CHROMIUM).exists():
        message = f"{browser.CHROMIUM} is missing: the browser tests need Debian's Chromium (apt install chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("playwright is not installed (pip install -e .[dev])")
        pytest.skip("playwright is not installed (pip install -e .[dev])")
    with sync_playwright() as pw:
        yield pw


def _assert_screenshot(path: Path) -> None:
    assert path.exists()
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000, f"{path}: {len(data)} bytes, suspiciously small for a rendered figure"


def _heatmap_state(plot) -> dict:
    """The routing heatmap's title and its layer frame (the first shape), read from plotly's
    own state on the rendered div."""
    return plot.evaluate("""el => ({
        title: el.querySelector('.gtitle') ? el.querySelector('.gtitle').textContent : null,
        layoutTitle: el.layout && el.layout.title ? el.layout.title.text : null,
        frame: el.layout && el.layout.shapes && el.layout.shapes.length
               ? {y0: el.layout.shapes[0].y0, y1: el.layout.shapes[0].y1} : null,
        cells: el.querySelectorAll('.heatmaplayer .hm').length,
    })""")


def _framed_layer(title: str) -> int:
    match = re.search(r"\(framed: layer (\d+)\)", title or "")
    assert match, f"the heatmap's title does not name the framed layer: {title!r}"
    return int(match.group(1))


def test_quickstart_notebook_in_jupyterlab(tmp_path, playwright):
    assert QUICKSTART.exists(), f"{QUICKSTART} is missing"
    root = tmp_path / "lab"
    root.mkdir()
    shutil.copy(QUICKSTART, root / QUICKSTART.name)  # Lab saves into the copy, never into the repo
    process, base_url, token = browser.start_lab(root)
    try:
        context = browser.launch_browser(playwright)
        try:
            page = context.new_page()
            errors = browser.run_notebook_in_lab(page, base_url, token, QUICKSTART.name)
            panel = browser.visible_panel(page)
            # The RoutingExplorer bound to the Session: the first output holding a routing heatmap.
            explorer = panel.locator(".jp-Cell-outputArea").filter(
                has=page.locator(".gtitle", has_text="first-choice expert per token and layer")).first
            browser.scroll_into_view(page, explorer)
            plot = explorer.locator(".js-plotly-plot").filter(
                has=page.locator(".gtitle", has_text="first-choice expert")).first
            plot.locator(".main-svg").first.wait_for(state="visible")
            before = _heatmap_state(plot)
            assert before["cells"] >= 1, "the heatmap drew no cells"
            assert before["title"] == before["layoutTitle"]
            layer = _framed_layer(before["title"])
            assert before["frame"]["y1"] - before["frame"]["y0"] == pytest.approx(1.0)

            slider = explorer.locator(".widget-slider").filter(
                has=page.locator(".widget-label", has_text=re.compile(r"^layer$"))).first
            readout = slider.locator(".widget-readout")
            assert readout.inner_text().strip() == str(layer)
            handle = slider.locator(".noUi-handle").first
            handle.focus()
            handle.press("ArrowRight")
            # SelectionSlider over layers 0..L-1: one step right frames the next layer (or the last)
            page.wait_for_function(
                """([el, old]) => { const t = el.querySelector('.gtitle');
                                    return t && !t.textContent.endsWith(`layer ${old})`); }""",
                arg=[plot.element_handle(), layer], timeout=30_000)
            after = _heatmap_state(plot)
            assert _framed_layer(after["title"]) == layer + 1
            assert after["layoutTitle"] == after["title"]
            assert readout.inner_text().strip() == str(layer + 1)
            assert after["frame"]["y0"] == pytest.approx(before["frame"]["y0"] + 1)
            assert after["frame"]["y1"] == pytest.approx(before["frame"]["y1"] + 1)
            # the coloured text follows the slider too
            assert explorer.locator("b", has_text=f"layer {layer + 1}").count() >= 1

            shot = tmp_path / "routing_explorer.png"
            explorer.screenshot(path=str(shot))
            _assert_screenshot(shot)
            page.wait_for_timeout(300)  # let late console messages arrive
            unexpected = browser.unexpected(errors)
            assert not unexpected, "console errors in JupyterLab:\n" + "\n".join(unexpected)
        finally:
            browser.close_browser(context)
    finally:
        browser.stop_lab(process)


def _grokscope(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("grokscope")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "grokscope.cli"]
    result = subprocess.run(cmd + list(args), cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"grokscope {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def test_report_html_offline(tmp_path, playwright):
    store = tmp_path / "s.zarr"
    _grokscope("dump", "--prompts", str(EXAMPLES), "--out", str(store), "--quiet", cwd=tmp_path)
    report = tmp_path / "report.html"
    _grokscope("report", str(store), "-o", str(report), cwd=tmp_path)
    text = report.read_text(encoding="utf-8")
    divs = len(re.findall(r'<div id="[^"]+" class="plotly-graph-div"', text))
    assert divs >= 10, f"only {divs} plotly divs in the report"
    assert "cdn.plot.ly" not in text.split("<body>", 1)[1][:2000]  # plotly.js is inlined, not fetched

    context = browser.launch_browser(playwright)
    try:
        left: list[str] = []

        def block(route):
            if route.request.url.startswith("file://"):
                route.continue_()
            else:
                left.append(route.request.url)
                route.abort()

        context.route("**/*", block)
        requested: list[str] = []
        page = context.new_page()
        page.on("request", lambda request: requested.append(request.url))
        errors = browser.console_errors(page)
        page.goto(report.as_uri())
        page.wait_for_selector(".js-plotly-plot .main-svg", timeout=60_000)
        page.wait_for_function("n => document.querySelectorAll('.js-plotly-plot .main-svg').length > 0 && "
                               "document.querySelectorAll('.js-plotly-plot').length === n", arg=divs,
                               timeout=60_000)
        assert page.locator(".js-plotly-plot").count() == divs
        assert page.locator(".plotly-graph-div:not(.js-plotly-plot)").count() == 0, "a figure did not render"
        assert page.locator(".js-plotly-plot .sankey").count() >= 1, "no Sankey diagram rendered"
        assert page.locator(".js-plotly-plot .heatmaplayer .hm").count() >= 1, "no heatmap rendered"
        assert not left, f"the report tried to reach the network: {left}"
        assert all(url.startswith(("file://", "data:", "blob:")) for url in requested), requested
        shot = tmp_path / "report.png"
        page.screenshot(path=str(shot))
        _assert_screenshot(shot)
        unexpected = browser.unexpected(errors, harmless=())
        assert not unexpected, "console errors in the report:\n" + "\n".join(unexpected)
    finally:
        browser.close_browser(context)
