"""Session with the bundled model, and the README's main job."""

import subprocess
import sys

import numpy as np

from grokscope import AttentionSpec, RecordSpec, Session, load_config, open_store
from grokscope.session import default_model_dir


def test_default_session_is_the_bundled_model():
    session = Session()
    assert session.config == load_config(str(default_model_dir() / "config.json"))
    assert session.tokenizer.vocab_size <= session.config.vocab_size
    texts = ["def mean(xs):\n    return sum(xs) / len(xs)\n", "The river ran quietly to the sea."]
    ds = session.run(texts, record=RecordSpec(attention=AttentionSpec(format="topk", k=8)),
                     metadata={"label": ["code", "prose"]})
    lengths = [len(session.tokenizer.encode(t)) for t in texts]
    assert list(ds["length"].values) == lengths
    assert ds["expert_index"].dims == ("sequence", "position", "layer", "slot")
    assert ds.sizes["layer"] == session.config.num_layers and ds.sizes["position"] == max(lengths)
    index = ds["expert_index"].values
    for s, n in enumerate(lengths):
        assert (index[s, :n] >= 0).all() and (index[s, n:] == -1).all()
    assert session.tokenizer.decode(ds["tokens"].values[0, : lengths[0]]) == texts[0]


def test_readme_main_job(tmp_path):
    out = tmp_path / "examples.zarr"
    prompts = default_model_dir() / "examples.jsonl"
    result = subprocess.run([sys.executable, "-m", "grokscope.cli", "dump", "--prompts", str(prompts),
                             "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert f"store: {out}" in result.stdout and "first-choice expert share by label" in result.stdout
    ds = open_store(str(out))
    assert ds.attrs["status"] == "complete"
    assert set(np.unique(ds["label"].values.astype(object))) == {"code", "prose"}
