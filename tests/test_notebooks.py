"""Executes every notebook in notebooks/ top to bottom, as a user would run it.

Each notebook is read into memory and executed there (the repository's .ipynb files are never
rewritten); the executed copy is saved under pytest's tmp_path for inspection. The kernel starts
in the repository's `notebooks/` directory and gets `GROKSCOPE_REPO` = the repository root, so
a notebook finds repo-relative paths (e.g. `activations/`) with
`Path(os.environ.get("GROKSCOPE_REPO", Path.cwd().parent))`. It inherits this process's
environment, including XLA_FLAGS (8 simulated CPU devices, set in conftest.py).

Code cells tagged "figure" (cell metadata `tags`) must produce at least one display output.
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
        print(f"{path.name}: executed in {elapsed:.1f} s (executed copy: {tmp_path / path.name})")

    errors = _error_outputs(nb)
    assert not errors, f"{path.name}: error outputs:\n" + "\n\n".join(errors)
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and "figure" in cell.metadata.get("tags", []):
            shown = [o for o in cell.get("outputs", []) if o.get("output_type") in _DISPLAY]
            assert shown, f"{path.name}: cell {index} should show a figure but has no display output:\n{cell.source}"
