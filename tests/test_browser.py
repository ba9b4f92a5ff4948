"""Real-browser tests: the quickstart notebook's widgets in JupyterLab, and the offline report.

They drive Debian's Chromium (/usr/bin/chromium) through playwright; without it they skip
locally and fail in CI (where CI is set).
"""

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import browser  # noqa: E402

pytestmark = pytest.mark.slow  # minutes: `pytest -m 'not slow'` leaves them out while iterating

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "notebooks" / "01_quickstart.ipynb"
EXAMPLES = REPO / "grokscope" / "assets" / "grok-tiny" / "examples.jsonl"


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


OUTPUT_WIDTH = 968  # px: the output area of a notebook in a 1400-px wide window
UPDATING = "updating…"


def _quickstart_with_every_view(path: Path) -> None:
    """The quickstart notebook, with every other view appended: the ExpertDashboard of its
    labelled batch, and an AttentionExplorer, a GenerationView (after a short generation) and an
    AttributionExplorer on its Session."""
    import nbformat

    nb = nbformat.read(QUICKSTART, as_version=4)
    nb.cells += [nbformat.v4.new_code_cell(source) for source in (
        "from grokscope.widgets import AttentionExplorer, AttributionExplorer, ExpertDashboard, GenerationView\n\n"
        "ExpertDashboard(batch, by=\"label\")",
        "AttentionExplorer(session)",
        "writer = GenerationView(session, max_new_tokens=4)\nwriter.generate()\nwriter",
        "AttributionExplorer(session)")]
    nbformat.write(nb, path)


def _plot(output, title_start: str):
    return output.locator(".js-plotly-plot:visible").filter(
        has=output.page.locator(".gtitle", has_text=re.compile("^" + re.escape(title_start)))).first


def _timed(page, times: dict, name: str, action, condition: str, arg) -> None:
    """Runs `action` (a browser input) and waits until `condition` (JS, of `arg`) holds; keeps
    the seconds it took in `times[name]`."""
    start = time.monotonic()
    action()
    page.wait_for_function(condition, arg=arg, timeout=60_000, polling=20)
    times[name] = time.monotonic() - start


_SETTLED = """([plots, wanted]) => plots.every((el, i) => {
    const t = el.layout && el.layout.title ? String(el.layout.title.text) : '';
    return !t.startsWith('updating') && wanted[i].every(w => t.includes(w));
})"""


def _assert_never_stale(page, expected: dict[str, list[str]]) -> None:
    """Every title a panel showed after the first change is either marked as updating or names
    the new state (`expected`: {panel: the strings its title must hold})."""
    for name, titles in browser.titles_seen(page).items():
        wanted = expected.get(name)
        if not wanted:
            continue
        shown = titles[1:]  # titles[0]: what it showed before the control moved
        assert shown, f"{name}: the title never changed (still {titles[0]!r})"
        for title in shown:
            assert title.startswith(UPDATING) or all(w in title for w in wanted), \
                f"{name} showed {title!r} as current after the change; expected {wanted} (seen: {titles})"
        assert all(w in shown[-1] for w in wanted), f"{name}: ends at {shown[-1]!r}, expected {wanted}"


def test_quickstart_notebook_in_jupyterlab(tmp_path, playwright):
    assert QUICKSTART.exists(), f"{QUICKSTART} is missing"
    root = tmp_path / "lab"
    root.mkdir()
    _quickstart_with_every_view(root / QUICKSTART.name)  # Lab saves into the copy, never into the repo
    process, base_url, token = browser.start_lab(root)
    try:
        context = browser.launch_browser(playwright, viewport={"width": 1400, "height": 1000})
        try:
            page = context.new_page()
            errors = browser.run_notebook_in_lab(page, base_url, token, QUICKSTART.name, timeout=240)
            panel = browser.visible_panel(page)

            # Every view fits its output area (figures follow the area's width; rows wrap).
            bad, measured, widest = browser.outputs_overflowing(page)
            assert widest == pytest.approx(OUTPUT_WIDTH, abs=40), f"the output area is {widest} px wide"
            assert len(measured) >= 10, f"only {len(measured)} figures and widget boxes measured"
            titles = {title or "" for _, title, _, _ in measured}
            for view, title in (("RoutingExplorer", "first-choice expert per token"), ("ExpertDashboard", "expert load"),
                                ("AttentionExplorer", "attention at layer"),
                                ("GenerationView", "routing of the prompt and the generated"),
                                ("AttributionExplorer", "routed share")):
                assert any(t.startswith(title) for t in titles), f"no {view} figure was measured: {sorted(titles)}"
            assert not bad, "boxes wider than their output area or past its edge:\n" + \
                "\n".join(f"{b['what']} {b['title']!r}: {b['box']} in {b['area']}" for b in bad)
            assert panel.locator(".js-plotly-plot:visible .sankey").count() >= 1, "the dashboard did not draw"

            # The RoutingExplorer bound to the Session: the first output holding a routing heatmap.
            explorer = panel.locator(".jp-Cell-outputArea").filter(
                has=page.locator(".gtitle", has_text="first-choice expert per token and layer")).first
            browser.scroll_into_view(page, explorer)
            plot = _plot(explorer, "first-choice expert")
            probs = _plot(explorer, "router probabilities")
            next_token = _plot(explorer, "next token after")
            plot.locator(".main-svg").first.wait_for(state="visible")
            before = _heatmap_state(plot)
            assert before["cells"] >= 1, "the heatmap drew no cells"
            assert before["title"] == before["layoutTitle"]
            layer = _framed_layer(before["title"])
            assert before["frame"]["y1"] - before["frame"]["y0"] == pytest.approx(1.0)
            panels = {"heatmap": plot, "probs": probs, "next_token": next_token}
            handles = [plot.element_handle(), probs.element_handle(), next_token.element_handle()]
            times: dict[str, float] = {}

            slider = explorer.locator(".widget-slider").filter(
                has=page.locator(".widget-label", has_text=re.compile(r"^layer$"))).first
            readout = slider.locator(".widget-readout")
            assert readout.inner_text().strip() == str(layer)
            handle = slider.locator(".noUi-handle").first
            handle.focus()
            # SelectionSlider over layers 0..L-1: one step right frames the next layer (or the last)
            browser.watch_titles(page, panels)
            _timed(page, times, "layer slider", lambda: handle.press("ArrowRight"), _SETTLED,
                   [handles[:1], [[f"(framed: layer {layer + 1})"]]])
            _assert_never_stale(page, {"heatmap": [f"(framed: layer {layer + 1})"]})
            after = _heatmap_state(plot)
            assert _framed_layer(after["title"]) == layer + 1
            assert after["layoutTitle"] == after["title"]
            assert readout.inner_text().strip() == str(layer + 1)
            assert after["frame"]["y0"] == pytest.approx(before["frame"]["y0"] + 1)
            assert after["frame"]["y1"] == pytest.approx(before["frame"]["y1"] + 1)
            # the coloured text follows the slider too
            assert explorer.locator("b", has_text=f"layer {layer + 1}").count() >= 1
            layer += 1

            token = explorer.locator(".widget-slider").filter(
                has=page.locator(".widget-label", has_text=re.compile(r"^token$"))).first
            position = int(token.locator(".widget-readout").inner_text().strip())
            step = "ArrowLeft" if position > 0 else "ArrowRight"
            position += -1 if position > 0 else 1
            token.locator(".noUi-handle").first.focus()
            browser.watch_titles(page, panels)
            wanted = {"probs": [f"of token {position} "], "next_token": [f"(position {position})"]}
            _timed(page, times, "token slider", lambda: token.locator(".noUi-handle").first.press(step), _SETTLED,
                   [handles[1:], [wanted["probs"], wanted["next_token"]]])
            _assert_never_stale(page, wanted)

            # Interventions: ban, then another expert; the panels never show the previous one as current.
            browser.watch_titles(page, panels)
            ban_0 = f"ban expert 0 (layer {layer})"
            _timed(page, times, "intervene: ban", lambda: explorer.locator("button", has_text=re.compile("^ban$"))
                   .first.click(), _SETTLED, [[handles[0], handles[2]], [[ban_0], [f"under {ban_0}", "KL"]]])
            _assert_never_stale(page, {"heatmap": [ban_0], "next_token": [f"under {ban_0}"]})
            expert = explorer.locator(".widget-dropdown").filter(
                has=page.locator(".widget-label", has_text=re.compile(r"^expert$"))).locator("select").first
            browser.watch_titles(page, panels)
            ban_3 = f"ban expert 3 (layer {layer})"
            _timed(page, times, "intervene: expert 3", lambda: expert.select_option("3"), _SETTLED,
                   [[handles[0], handles[2]], [[ban_3], [f"under {ban_3}", "KL"]]])
            _assert_never_stale(page, {"heatmap": [ban_3], "next_token": [f"under {ban_3}"]})
            assert "rerouted" in browser.titles_seen(page)["heatmap"][-1]

            # Run with a new prompt: every panel is marked until it shows the new prompt's state.
            browser.watch_titles(page, panels)
            explorer.locator("textarea").first.fill("x = 1")
            _timed(page, times, "Run, new prompt", lambda: explorer.locator("button", has_text="Run").first.click(),
                   """(el) => el.layout && !String(el.layout.title.text).startsWith('updating') &&
                              el.layout.xaxis.ticktext && el.layout.xaxis.ticktext.length <= 6""", handles[0])
            page.wait_for_function(_SETTLED, arg=[handles, [[ban_3], ["router probabilities"], [f"under {ban_3}"]]],
                                   timeout=60_000)
            seen = browser.titles_seen(page)
            assert any(t.startswith(UPDATING) for t in seen["next_token"][1:]), \
                f"the next-token panel was not marked as updating during Run: {seen['next_token']}"
            _assert_never_stale(page, {"heatmap": [ban_3], "next_token": [f"under {ban_3}"]})
            print("\ncontrol-to-update times in JupyterLab (s): "
                  + ", ".join(f"{name} {seconds:.2f}" for name, seconds in times.items()))

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
