"""`grokscope report`: one offline HTML file of a store's figures."""

import json
import re

import pytest

from grokscope import RecordSpec, dump
from grokscope.cli import main
from grokscope.report import report_layers, write_report


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    directory = tmp_path_factory.mktemp("report")
    prompts = directory / "p.jsonl"
    prompts.write_text("".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in
                               [("def f(x):\n    return x", "code"), ("A quiet morning.", "prose"),
                                ("x = [1, 2, 3]", "code")]))
    dump(prompts, directory / "s.zarr", batch_size=2, progress=False)
    return directory / "s.zarr"


def test_report_embeds_every_figure_and_plotlyjs_once(store, tmp_path):
    out = write_report(store, tmp_path / "r.html", sequences=2, summary=False)
    page = out.read_text()
    # 2 overview + 4 layers x (co-activation, top tokens, by label) + 3 flows + 2 sequences
    assert page.count('class="plotly-graph-div"') == 2 + 4 * 3 + 3 + 2
    assert page.count("window.PlotlyConfig") == 1
    assert not re.search(r'<script[^>]+src="http', page)  # nothing loaded from the network
    assert "expert load at layer 3 by label" in page


def test_report_cli_and_errors(store, tmp_path, capsys):
    assert main(["report", str(store), "-o", str(tmp_path / "r.html"), "--no-summary"]) == 0
    assert "opens offline" in capsys.readouterr().out
    assert main(["report", str(store), "-o", str(tmp_path / "r.html"), "--by", "colour"]) == 1
    assert "--by 'colour'" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing.zarr"), "-o", str(tmp_path / "x.html")]) == 1
    assert "not a grokscope store" in capsys.readouterr().err
    assert main(["report", str(store), "-o", str(tmp_path / "y.html"), "--layer", "99", "--no-summary"]) == 1
    assert "--layer" in capsys.readouterr().err and not (tmp_path / "y.html").exists()
    assert main(["report", str(store), "-o", str(tmp_path / "z.html"), "--layer", "1", "--no-summary"]) == 0
    assert "layer 1" in (tmp_path / "z.html").read_text()


def test_report_needs_routing(tmp_path, store):
    dump(store.parent / "p.jsonl", tmp_path / "attn.zarr", record=RecordSpec(routing=False, residual=(0,)),
         progress=False)
    with pytest.raises(ValueError, match="no routing recorded"):
        write_report(tmp_path / "attn.zarr", tmp_path / "r.html")


def test_report_layers_spread_over_deep_models():
    assert report_layers(range(4)) == [0, 1, 2, 3]
    picks = report_layers(range(64))
    assert len(picks) == 8 and picks[0] == 0 and picks[-1] == 63
