"""Regenerates the screenshots under docs/images/ (python docs/screenshots.py).

- routing_explorer.png, attention_explorer.png, expert_dashboard.png: each widget as JupyterLab
  renders it (a temporary notebook builds them on the bundled grok-tiny model and on a small
  store dumped from its examples, and is run in a headless JupyterLab); each picture is the
  widget's output area, not the whole page.
- report.png: the top of `grokscope report` of that store, opened from disk.

Needs Debian's Chromium at /usr/bin/chromium and playwright (pip install -e .[dev]).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import browser  # noqa: E402

EXAMPLES = REPO / "grokscope" / "assets" / "grok-tiny" / "examples.jsonl"
STORE = "examples.zarr"

CELLS = [
    ("setup", """\
from grokscope import Session, open_store
from grokscope.widgets import RoutingExplorer, AttentionExplorer, ExpertDashboard

session = Session()"""),
    ("routing_explorer", """\
routing = RoutingExplorer(session)
routing.select(layer=2, position=4)
routing.expert.value = int(routing.routing.expert_index[2, 4, 0])  # ban the token's first choice
routing.action.value = "ban"
routing"""),
    ("attention_explorer", """\
attention = AttentionExplorer(session)
attention.select(layer=1, query=11)
attention"""),
    ("expert_dashboard", f"""\
dashboard = ExpertDashboard(open_store({STORE!r}))
dashboard"""),
]
# how many plotly figures each widget shows once drawn
FIGURES = {"routing_explorer": 3, "attention_explorer": 2, "expert_dashboard": 5}


def _grokscope(*args: str, cwd: Path) -> None:
    script = Path(sys.executable).with_name("grokscope")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "grokscope.cli"]
    subprocess.run(cmd + list(args), cwd=cwd, check=True, stdout=subprocess.DEVNULL)


def _notebook(path: Path) -> None:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source, metadata={"tags": [name]}) for name, source in CELLS]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nbformat.write(nb, path)


def widgets(root: Path, out: Path, playwright) -> list[Path]:
    """Runs the widgets' notebook in JupyterLab and screenshots each widget's output."""
    _notebook(root / "screenshots.ipynb")
    written = []
    process, base_url, token = browser.start_lab(root)
    try:
        # tall enough that the dashboard fits the notebook's viewport (an element screenshot
        # of a part scrolled out of Lab's panel would come out blank)
        context = browser.launch_browser(playwright, viewport={"width": 1280, "height": 3000})
        try:
            page = context.new_page()
            errors = browser.console_errors(page)
            browser.open_notebook(page, base_url, token, "screenshots.ipynb")
            # the whole width for the notebook: collapse the file browser (click its current tab)
            current = page.locator(".jp-SideBar.jp-mod-left .lm-TabBar-tab.lm-mod-current")
            if current.count():
                current.first.click()
                page.wait_for_timeout(500)
            browser.run_all(page)
            panel = browser.visible_panel(page)
            cells = panel.locator(".jp-CodeCell")
            for index, (name, _) in enumerate(CELLS):
                if name not in FIGURES:
                    continue
                # the widget's output (a cell may also print warnings to stderr before it)
                output = cells.nth(index).locator(".jp-OutputArea-output").filter(
                    has=page.locator(".jupyter-widgets")).first
                browser.scroll_into_view(page, output)
                output.scroll_into_view_if_needed()
                plots = output.locator(".js-plotly-plot:visible .main-svg")
                deadline = time.monotonic() + 60
                while output.locator(".js-plotly-plot:visible").count() < FIGURES[name]:
                    if time.monotonic() > deadline:
                        page.screenshot(path=str(out / f"FAILED-{name}-page.png"))
                        raise TimeoutError(f"{name}: {output.locator('.js-plotly-plot:visible').count()} of "
                                           f"{FIGURES[name]} figures rendered")
                    page.wait_for_timeout(250)
                plots.first.wait_for(state="visible")
                page.wait_for_timeout(1000)  # plotly's transitions and the sliders' layout
                path = out / f"{name}.png"
                output.screenshot(path=str(path), animations="disabled")
                written.append(path)
                print(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
            problems = browser.unexpected(errors)
            if problems:
                print("console errors:\n  " + "\n  ".join(problems), file=sys.stderr)
        finally:
            browser.close_browser(context)
    finally:
        browser.stop_lab(process)
    return written


def report(root: Path, out: Path, playwright) -> Path:
    """Screenshots the top of the store's report, opened from disk with the network blocked."""
    html = root / "report.html"
    _grokscope("report", STORE, "-o", str(html), cwd=root)
    context = browser.launch_browser(playwright, viewport={"width": 1280, "height": 1100})
    try:
        context.route("**/*", lambda route: route.continue_() if route.request.url.startswith("file://")
                      else route.abort())
        page = context.new_page()
        page.goto(html.as_uri())
        page.wait_for_selector(".js-plotly-plot .main-svg", timeout=60_000)
        page.wait_for_timeout(1000)
        path = out / "report.png"
        page.screenshot(path=str(path), animations="disabled")
        print(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
        return path
    finally:
        browser.close_browser(context)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images", help="where to write the PNGs")
    args = parser.parse_args(argv)
    if not Path(browser.CHROMIUM).exists():
        print(f"error: {browser.CHROMIUM} is missing (apt install chromium)", file=sys.stderr)
        return 1
    from playwright.sync_api import sync_playwright

    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="grokscope-screenshots-") as tmp:
        root = Path(tmp)
        _grokscope("dump", "--prompts", str(EXAMPLES), "--out", STORE, "--quiet", cwd=root)
        with sync_playwright() as playwright:
            widgets(root, args.out, playwright)
            report(root, args.out, playwright)
    return 0


if __name__ == "__main__":
    sys.exit(main())
