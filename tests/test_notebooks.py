"""Executes every notebook in notebooks/ top to bottom, as a user would run it.

Each notebook is read into memory and executed there (the repository's .ipynb files are never
rewritten); the executed copy is saved under pytest's tmp_path for inspection. The kernel starts
in the repository's `notebooks/` directory and gets `GROKSCOPE_REPO` = the repository root, so
a notebook finds repo-relative paths (e.g. `activations/`) with
`Path(os.environ.get("GROKSCOPE_REPO", Path.cwd().parent))`. It inherits this process's
environment, including XLA_FLAGS (8 simulated CPU devices, set in conftest.py).

Code cells tagged "figure" (cell metadata `tags`) must produce at least one display output.

Each executed notebook is then exported with nbconvert's HTML exporter, as
`jupyter nbconvert --to html` does, and opened in Chromium with the network blocked: every
figure must draw (the views' static copies and plain figures, plotly.js from the notebook
itself), and the executed .ipynb, widget state included, stays under 5 MB.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

import nbclient  # noqa: E402  (dev dependencies: pip install -e .[dev])
import nbformat  # noqa: E402

pytestmark = pytest.mark.slow  # minutes: `pytest -m 'not slow'` leaves them out while iterating

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
EXPECTED = ["01_quickstart.ipynb", "02_attention.ipynb", "03_batch_dump_and_analysis.ipynb",
            "04_grok1_on_a_gpu_cluster.ipynb",
            "05_interventions.ipynb", "06_grok2.ipynb"]
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_DISPLAY = ("display_data", "execute_result")
_EXECUTED: dict[str, Path] = {}  # notebook name -> its executed copy (reused by the export test)
MAX_NOTEBOOK_BYTES = 5_000_000

def _notebooks() -> list[Path]:
    return sorted(NOTEBOOKS.glob("*.ipynb"))


def test_expected_notebooks_exist():
    names = [p.name for p in _notebooks()]
    missing = [n for n in EXPECTED if n not in names]
    assert not missing, f"missing notebooks in {NOTEBOOKS}: {missing}"
    assert len(names) >= 4


def _error_outputs(nb) -> list[str]:
    found = []
    for index, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []) if cell.cell_type == "code" else []:
            if out.get("output_type") == "error":
                found.append(f"cell {index}: {out.get('ename')}: {out.get('evalue')}\n{cell.source}")
    return found


@pytest.mark.parametrize("path", _notebooks(), ids=lambda p: p.name)
def test_notebook_runs(path: Path, tmp_path, monkeypatch):
    monkeypatch.setenv("GROKSCOPE_REPO", str(REPO))
    # keep the kernel's Jupyter runtime files (connection files) out of the user's home
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=600,
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    start = time.perf_counter()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{path.name}: a cell failed\n{_ANSI.sub('', str(e))}", pytrace=False)
    finally:
        elapsed = time.perf_counter() - start
        nbformat.write(nb, tmp_path / path.name)
        _EXECUTED[path.name] = tmp_path / path.name
        print(f"{path.name}: executed in {elapsed:.1f} s (executed copy: {tmp_path / path.name})")

    errors = _error_outputs(nb)
    assert not errors, f"{path.name}: error outputs:\n" + "\n\n".join(errors)
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and "figure" in cell.metadata.get("tags", []):
            shown = [o for o in cell.get("outputs", []) if o.get("output_type") in _DISPLAY]
            assert shown, f"{path.name}: cell {index} should show a figure but has no display output:\n{cell.source}"
    size = (tmp_path / path.name).stat().st_size
    assert size < MAX_NOTEBOOK_BYTES, f"{path.name}: the executed notebook is {size / 1e6:.1f} MB"


def _export_html(executed: Path) -> Path:
    from nbconvert import HTMLExporter

    nb = nbformat.read(executed, as_version=4)
    body, _ = HTMLExporter().from_notebook_node(
        nb, resources={"metadata": {"name": executed.stem, "path": str(executed.parent)}})
    out = executed.with_suffix(".html")
    out.write_text(body, encoding="utf-8")
    return out


def _expected_figures(executed: Path) -> int:
    """Figures the exported page must draw: one per plotly figure in a plain output, and every
    figure in a view's static copy (their JSON is in the notebook)."""
    nb = nbformat.read(executed, as_version=4)
    count = 0
    for cell in nb.cells:
        for out in cell.get("outputs", []) if cell.cell_type == "code" else []:
            data = out.get("data", {})
            if "application/vnd.plotly.v1+json" in data:
                assert "text/html" in data, f"{executed.name}: a plotly figure without an HTML copy"
            count += data.get("text/html", "").count('class="grokscope-figure"')
    return count


def test_exported_notebooks_show_every_figure_offline(tmp_path, monkeypatch, playwright):
    import browser

    for path in _notebooks():
        if path.name not in _EXECUTED:  # run on its own: execute first
            (tmp_path / path.stem).mkdir()
            test_notebook_runs(path, tmp_path / path.stem, monkeypatch)
    context = browser.launch_browser(playwright)
    try:
        context.route("**/*", lambda route: route.continue_() if route.request.url.startswith(
            ("file://", "data:", "blob:")) else route.abort())
        for name, executed in sorted(_EXECUTED.items()):
            expected = _expected_figures(executed)
            page = context.new_page()
            errors = browser.console_errors(page)
            page.goto(_export_html(executed).as_uri())
            drawn = lambda: page.locator(".grokscope-figure.js-plotly-plot").count()  # noqa: E731
            try:
                page.wait_for_function("n => document.querySelectorAll('.grokscope-figure.js-plotly-plot').length >= n",
                                       arg=expected, timeout=60_000)
            except Exception:  # noqa: BLE001 - reported below with the counts
                pass
            assert drawn() == expected, f"{name}: {drawn()} of {expected} figures drawn offline"
            assert page.locator(".grokscope-figure .main-svg").count() >= expected
            mine = [e for e in errors if "net::ERR_FAILED" not in e]  # the CDN scripts nbconvert adds
            assert not mine, f"{name}: console errors:\n" + "\n".join(mine)
            print(f"{name}: {expected} figures drawn offline")
            page.close()
    finally:
        browser.close_browser(context)
