"""`grokscope analyze`: the summary table, written as JSON and CSV, computed by the analysis functions."""

import json

import numpy as np

from grokscope.analysis import hard_load, load_cv, repetition_rate, synthetic_store
from grokscope.analysis.summary import summarize
from grokscope.cli import main


def _store(tmp_path):
    rng = np.random.default_rng(0)
    S, P, L = 6, 20, 3
    logits = rng.normal(size=(S, P, L, 8)).astype(np.float32)
    logits[:3, :, :, 5] += 3.0  # group "a" prefers expert 5
    index = np.argsort(-logits, axis=-1, kind="stable")[..., :2]
    ds = synthetic_store(index, [20, 15, 9, 20, 12, 4], router_logits=logits,
                         metadata={"label": ["a", "a", "a", "b", "b", "b"]})
    assert ds.attrs == {"grokscope": {"kind": "synthetic"}}  # not a dump: no schema, no chunk checks
    path = tmp_path / "s.zarr"
    ds.to_zarr(path, zarr_format=3, consolidated=False)
    return ds, path


def test_summary_uses_the_analysis_functions(tmp_path):
    ds, _ = _store(tmp_path)
    summary = summarize(ds, by="label", n_permutations=50)
    np.testing.assert_allclose(summary["load_cv"], load_cv(ds))
    np.testing.assert_allclose(summary["load_max"], hard_load(ds).max("expert"))
    np.testing.assert_allclose(summary["repetition"], repetition_rate(ds))
    assert list(summary["top_expert"].sel(group="a").values) == [5, 5, 5]


def test_cli_prints_and_writes(tmp_path, capsys):
    _, path = _store(tmp_path)
    assert main(["analyze", str(path), "--by", "label", "--permutations", "20", "-o", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    assert "load CV" in out and "repeat" in out and "a: expert 5" in out
    data = json.loads((tmp_path / "s.json").read_text())
    assert "repetition" in data["data_vars"] and data["attrs"]["by"] == "label"
    assert main(["analyze", str(path), "-o", str(tmp_path / "s.csv")]) == 0
    assert (tmp_path / "s.csv").read_text().startswith("layer,")
    assert main(["analyze", str(path), "--by", "nope"]) == 1
    assert "no such per-sequence variable" in capsys.readouterr().err
