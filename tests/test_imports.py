"""The package's import graph: no cycles, and the views and the report need no model code."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "grokscope"


def _import_graph() -> dict[str, set[str]]:
    """{module: grokscope modules it imports}, counting imports inside functions too."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def _cycles(graph):
    state, stack, found = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_no_import_cycles():
    graph = _import_graph()
    assert "grokscope.runner" in graph and "grokscope.forward" in graph["grokscope.runner"]  # the graph is real
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_checkpoint_does_not_import_the_model_api():
    graph = _import_graph()
    assert "grokscope.forward" not in graph["grokscope.checkpoint"]
    assert not any(t.startswith("grokscope.model") for t in graph["grokscope.checkpoint"])


def test_the_report_the_figures_and_the_store_load_no_model_code_and_no_ipywidgets():
    code = ("import sys\n"
            "import grokscope.report, grokscope.widgets.figures, grokscope.widgets.data, grokscope.store\n"
            "import grokscope.analysis\n"
            "print(sorted(m for m in ('haiku', 'ipywidgets', 'grokscope.model', 'grokscope.forward',"
            " 'grokscope.session') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_public_api_still_resolves_every_name():
    import grokscope
    import grokscope.widgets

    for name in grokscope.__all__:
        assert getattr(grokscope, name) is not None, name
    assert grokscope.Session.__name__ == "Session" and grokscope.interventions.ban
    for name in grokscope.widgets.__all__:
        assert getattr(grokscope.widgets, name).__name__ == name


def test_functions_named_like_their_module_stay_functions():
    code = ("import grokscope.runner, grokscope.dump, grokscope.effects\n"  # submodules loaded first
            "import grokscope\n"
            "print(callable(grokscope.forward), callable(grokscope.dump), callable(grokscope.effects))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True", "True"]
