"""A small harness for driving JupyterLab and static HTML in a real (headless) Chromium.

Used by tests/test_browser.py and docs/screenshots.py. Plain functions, no pytest:

- `start_lab` / `stop_lab`: a headless JupyterLab server on a free port, with its config,
  settings, workspaces, data and runtime directories in a fresh temporary directory (nothing
  of the user's set-up leaks in, nothing is written into it).
- `launch_browser`: Debian's Chromium through playwright (never a downloaded browser).
- `run_notebook_in_lab`: opens a notebook in Lab, runs all cells and waits for a plotly
  figure to render.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

__all__ = ["CHROMIUM", "HARMLESS_CONSOLE", "start_lab", "stop_lab", "launch_browser", "close_browser",
           "open_notebook", "run_all", "run_notebook_in_lab", "wait_kernel_idle", "unexpected",
           "visible_panel", "console_errors", "scroll_into_view", "outputs_overflowing", "watch_titles",
           "titles_seen"]

CHROMIUM = "/usr/bin/chromium"

# Console messages that are not failures of the page under test.
HARMLESS_CONSOLE = (
    # Chromium's Debian wrapper script, not the page.
    "/usr/bin/chromium: 9: [",
    # Lab asks for the lab-extension manager's listing of PyPI; the server has no network.
    "Failed to load resource: the server responded with a status of 404",
)

PANEL = ".jp-NotebookPanel:not(.lm-mod-hidden)"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _jupyter() -> list[str]:
    exe = Path(sys.executable).with_name("jupyter")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "jupyter"]


def start_lab(root_dir, port: int | None = None, timeout: float = 60.0):
    """Starts a headless JupyterLab serving `root_dir`. Returns (process, base_url, token).

    The server runs in its own process group (so `stop_lab` also ends its kernels) and keeps
    every Jupyter directory in a fresh temporary one (removed by `stop_lab`). Its log goes to
    `process.log_path`.
    """
    port = port or _free_port()
    token = secrets.token_hex(16)
    home = Path(tempfile.mkdtemp(prefix="grokscope-lab-"))
    env = dict(os.environ)
    for var, sub in (("JUPYTER_CONFIG_DIR", "config"), ("JUPYTERLAB_SETTINGS_DIR", "settings"),
                     ("JUPYTERLAB_WORKSPACES_DIR", "workspaces"), ("JUPYTER_RUNTIME_DIR", "runtime"),
                     ("JUPYTER_DATA_DIR", "data"), ("IPYTHONDIR", "ipython")):
        (home / sub).mkdir()
        env[var] = str(home / sub)
    env["JUPYTER_PLATFORM_DIRS"] = "1"
    # no "get notified about Jupyter news?" toast over the notebook (and no request for the news)
    (home / "config" / "labconfig").mkdir()
    (home / "config" / "labconfig" / "page_config.json").write_text(
        '{"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": true}}')
    # the notebook's kernel starts without asking: on a busy machine Lab may otherwise open its
    # "Select Kernel" dialog over the notebook
    tracker = home / "settings" / "@jupyterlab" / "notebook-extension"
    tracker.mkdir(parents=True)
    (tracker / "tracker.jupyterlab-settings").write_text('{"autoStartDefaultKernel": true}')
    env.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    log_path = home / "lab.log"
    cmd = _jupyter() + ["lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}", "--port-retries=0",
                        f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root_dir}", "--allow-root",
                        "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
                        "--ServerApp.open_browser=False"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    process.lab_home = home
    process.log_path = log_path
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            log = log_path.read_text(errors="replace")
            stop_lab(process)
            raise RuntimeError(f"jupyter lab exited with {process.returncode}:\n{log[-4000:]}")
        try:
            with urllib.request.urlopen(f"{base_url}/api/status?token={token}", timeout=2) as response:
                if response.status == 200:
                    break
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            log = log_path.read_text(errors="replace")
            stop_lab(process)
            raise TimeoutError(f"jupyter lab did not answer within {timeout:.0f} s:\n{log[-4000:]}")
        time.sleep(0.3)
    return process, base_url, token


def stop_lab(process: subprocess.Popen, timeout: float = 15.0) -> None:
    """Ends the server and its kernels (its process group) and removes its temporary directory."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    # whatever of the group is left (kernels that ignored SIGTERM)
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if process.poll() is None:
        process.wait(timeout=timeout)
    home = getattr(process, "lab_home", None)
    if home is not None:
        shutil.rmtree(home, ignore_errors=True)


def launch_browser(playwright, viewport=None):
    """A headless Chromium (Debian's) with a fresh profile; returns its persistent context."""
    profile = tempfile.mkdtemp(prefix="grokscope-chromium-")
    context = playwright.chromium.launch_persistent_context(
        profile, executable_path=CHROMIUM, headless=True,
        args=["--headless=new", "--no-sandbox", "--disable-background-networking", "--disable-component-update",
              "--disable-sync", "--disable-gpu"],
        viewport=viewport or {"width": 1280, "height": 1000})
    context.grokscope_profile = profile
    return context


def close_browser(context) -> None:
    """Closes a context from `launch_browser` (and its browser) and removes its profile."""
    try:
        context.close()
    finally:
        profile = getattr(context, "grokscope_profile", None)
        if profile:
            shutil.rmtree(profile, ignore_errors=True)


def console_errors(page) -> list[str]:
    """Starts collecting the page's console errors and uncaught exceptions; returns the list."""
    errors: list[str] = []
    page.on("console", lambda msg: errors.append(f"console.{msg.type}: {msg.text}") if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
    return errors


def unexpected(errors: list[str], harmless=HARMLESS_CONSOLE) -> list[str]:
    return [e for e in errors if not any(h in e for h in harmless)]


def visible_panel(page):
    return page.locator(PANEL)


def scroll_into_view(page, locator, timeout: float = 30.0) -> None:
    """Scrolls the (virtualised) notebook until `locator` exists, then brings it into view."""
    deadline = time.monotonic() + timeout
    outer = page.locator(f"{PANEL} .jp-WindowedPanel-outer").first
    while locator.count() == 0:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{locator} did not appear in the notebook")
        outer.evaluate("el => el.scrollBy(0, el.clientHeight / 2)")
        page.wait_for_timeout(200)
    while True:  # the element may be replaced (or a view's static copy hidden) meanwhile: find it again
        try:
            locator.first.scroll_into_view_if_needed(timeout=5_000)
            return
        except Exception:  # noqa: BLE001 - playwright's TimeoutError
            if time.monotonic() > deadline:
                raise


def wait_kernel_idle(page, timeout: float = 120.0) -> None:
    """Waits until the kernel is idle and no cell is queued or running."""
    page.wait_for_function(
        """(panel) => {
            const p = document.querySelector(panel);
            if (!p) return false;
            const ind = p.querySelector('.jp-Notebook-ExecutionIndicator');
            if (!ind || ind.getAttribute('data-status') !== 'idle') return false;
            const prompts = [...p.querySelectorAll('.jp-InputArea-prompt')].map(e => e.textContent);
            return !prompts.some(t => t.includes('*'));
        }""", arg=PANEL, timeout=timeout * 1000, polling=250)


def _menu(page, menu: str, item: str) -> None:
    dialog = page.locator(".jp-Dialog")
    if dialog.count():
        raise AssertionError(f"a dialog is open before {menu} > {item}: {dialog.first.inner_text()!r}")
    page.locator(".lm-MenuBar-itemLabel").get_by_text(menu, exact=True).click()
    page.locator(".lm-Menu-content .lm-Menu-itemLabel").get_by_text(item, exact=True).click()


def open_notebook(page, base_url: str, token: str, path: str, timeout: float = 120.0) -> None:
    """Opens `path` (relative to Lab's root) in Lab, with a fresh workspace (`?reset`), and
    waits for its kernel to be idle."""
    page.goto(f"{base_url}/lab/tree/{path}?reset&token={token}", timeout=timeout * 1000)
    page.wait_for_selector(f"{PANEL} .jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=timeout * 1000)


def run_all(page, timeout: float = 120.0) -> None:
    """Runs every cell of the open notebook; returns when the kernel is idle again and a
    plotly figure has rendered in the notebook."""
    # Edit -> Clear Outputs of All Cells (a notebook saved with outputs would look "already run"),
    # then Run -> Run All Cells
    _menu(page, "Edit", "Clear Outputs of All Cells")
    started = """(panel) => {
        const p = document.querySelector(panel);
        return p && [...p.querySelectorAll('.jp-InputArea-prompt')].some(e => /\\[[0-9*]+\\]/.test(e.textContent));
    }"""
    # a menu command Lab receives while it is still settling can be dropped: ask again until a cell starts
    deadline = time.monotonic() + timeout
    while True:
        _menu(page, "Run", "Run All Cells")
        try:
            page.wait_for_function(started, arg=PANEL, timeout=30_000)
            break
        except Exception:  # noqa: BLE001 - playwright's TimeoutError
            if time.monotonic() > deadline:
                raise
    # the kernel goes busy, then idle once every cell ran
    wait_kernel_idle(page, timeout)
    plot = page.locator(f"{PANEL} .js-plotly-plot .main-svg").filter(visible=True)  # not a hidden static copy
    scroll_into_view(page, plot, timeout)
    plot.first.wait_for(state="visible", timeout=timeout * 1000)


def run_notebook_in_lab(page, base_url: str, token: str, path: str, timeout: float = 120.0) -> list[str]:
    """Opens `path` (relative to Lab's root) in Lab, runs all cells and waits until the kernel
    is idle again and a plotly figure has rendered in the notebook. Returns the list that
    collects the page's console errors (it keeps collecting after this returns)."""
    errors = console_errors(page)
    open_notebook(page, base_url, token, path, timeout)
    run_all(page, timeout)
    return errors


_MEASURE = """(panel) => {
    // every drawn figure and widget box in the outputs now laid out, against its output area
    const out = [];
    for (const area of document.querySelectorAll(`${panel} .jp-OutputArea-output`)) {
        const a = area.getBoundingClientRect();
        if (a.width === 0) continue;
        const parts = area.querySelectorAll(
            '.js-plotly-plot, .js-plotly-plot .main-svg, .jupyter-widgets, .widget-box');
        for (const el of parts) {
            const r = el.getBoundingClientRect();
            if (r.width === 0 || r.height === 0) continue;  // a hidden static copy
            const plot = el.closest('.js-plotly-plot');
            const title = plot && plot.layout && plot.layout.title ? String(plot.layout.title.text).slice(0, 60) : '';
            out.push({area: [a.left, a.right], box: [r.left, r.right], what: el.className.baseVal !== undefined
                      ? 'svg' : el.className.split(' ').slice(0, 2).join(' '), title});
        }
    }
    return out;
}"""


def outputs_overflowing(page, tolerance: float = 1.0) -> tuple[list[dict], set, float]:
    """Scrolls the whole notebook and measures every drawn figure (its div and its svg) and
    widget box in the outputs. Returns (the boxes wider than their output area or reaching
    past its edges, the boxes measured as (what, title, left, right), the widest output area)."""
    outer = page.locator(f"{PANEL} .jp-WindowedPanel-outer").first
    outer.evaluate("el => el.scrollTo(0, 0)")
    page.wait_for_timeout(300)
    bad, seen, widest = {}, set(), 0.0
    while True:
        for box in page.evaluate(_MEASURE, PANEL):
            (left, right), (x0, x1) = box["area"], box["box"]
            widest = max(widest, right - left)
            key = (box["what"], box["title"], round(x0), round(x1))
            seen.add(key)
            if x1 - x0 > right - left + tolerance or x1 > right + tolerance or x0 < left - tolerance:
                bad[key] = box
        at_end = outer.evaluate("el => el.scrollTop + el.clientHeight >= el.scrollHeight - 2")
        if at_end:
            break
        outer.evaluate("el => el.scrollBy(0, el.clientHeight * 0.7)")
        page.wait_for_timeout(250)
    return list(bad.values()), seen, widest


def watch_titles(page, plots: dict) -> None:
    """Starts recording every title each plotly figure in `plots` ({name: locator}) shows
    (plotly's own layout, read at each change of the figure's DOM)."""
    handles = {name: locator.element_handle() for name, locator in plots.items()}
    page.evaluate("""(plots) => {
        window.__grokscopeTitles = {};
        for (const [name, el] of Object.entries(plots)) {
            const seen = window.__grokscopeTitles[name] = [];
            const read = () => {
                const t = el.layout && el.layout.title ? String(el.layout.title.text) : null;
                if (seen.length === 0 || seen[seen.length - 1] !== t) seen.push(t);
            };
            read();
            new MutationObserver(read).observe(el, {subtree: true, childList: true, characterData: true,
                                                    attributes: true});
        }
    }""", handles)


def titles_seen(page) -> dict[str, list[str]]:
    """{name: the titles shown since `watch_titles`, in order (the first is the one shown then)}."""
    return page.evaluate("() => window.__grokscopeTitles")
