"""Notebook views of routing and attention (ipywidgets + plotly), and their static copies.

  RoutingExplorer(source)    which expert each token takes, layer by layer
  AttentionExplorer(source)  where each head looks (full, head_mean or topk records)
  ExpertDashboard(source)    load, entropy, co-activation, flow between layers, top tokens, groups
  GenerationView(session)    the model writes; each token appears with its routing

`source` is a `Session` (type a prompt, run it) or a Dataset from `open_store` (pick a
sequence). `grokscope.widgets.figures` holds the plotly figures the views draw, as plain
functions of a Dataset; `grokscope.report.write_report` puts them in one offline HTML file.
"""

from grokscope.widgets.attention import AttentionExplorer
from grokscope.widgets.dashboard import ExpertDashboard
from grokscope.widgets.generation import GenerationView
from grokscope.widgets.routing import RoutingExplorer

__all__ = ["AttentionExplorer", "ExpertDashboard", "GenerationView", "RoutingExplorer"]
