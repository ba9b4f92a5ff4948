"""Notebook views of routing and attention (ipywidgets + plotly), and their static copies.

  RoutingExplorer(source)    which expert each token takes, layer by layer
  AttentionExplorer(source)  where each head looks (full, head_mean or topk records)
  ExpertDashboard(source)    load, entropy, co-activation, flow between layers, top tokens, groups
  GenerationView(session)    the model writes; each token appears with its routing
  AttributionExplorer(source) routed vs dense FFN updates; each chosen expert's direct effect on
                             the next token's logit

`source` is a `Session` (type a prompt, run it) or a Dataset from `open_store` (pick a
sequence). `grokscope.widgets.figures` holds the plotly figures the views draw, as plain
functions of a Dataset; `grokscope.report.write_report` puts them in one offline HTML file.
"""

import importlib

_VIEWS = {"AttentionExplorer": "attention", "AttributionExplorer": "attribution", "ExpertDashboard": "dashboard",
          "GenerationView": "generation", "RoutingExplorer": "routing"}

__all__ = list(_VIEWS)


def __getattr__(name: str):
    # The views (and ipywidgets) load on first use, so that `figures` and `data` import
    # without them (the static report needs neither ipywidgets nor a kernel).
    if name in _VIEWS:
        return getattr(importlib.import_module(f"grokscope.widgets.{_VIEWS[name]}"), name)
    raise AttributeError(f"module 'grokscope.widgets' has no attribute {name!r}")


def _install_renderer() -> None:
    from grokscope.widgets.offline import install_renderer

    install_renderer()


_install_renderer()
