"""The bundled grok-tiny model, checked on the shipped files (int8 weights via `load_params`).

Everything is computed here from the shipped weights, tokenizer and held-out example prompts
(plus the training split, rebuilt from this interpreter's standard library, for the unigram
baseline); no figure from the training run is taken as given (the run's own int8-vs-float
comparison stays in metrics.json and the model card: the float weights are not shipped).
"""

import json

import numpy as np
import pytest

from grokscope import QuantizedWeight8bit, corpus
from grokscope.forward import is_quantizable
from grokscope.train import (ASSET_DIR, GROK_TINY, evaluate, example_windows, heldout_loss,
                             load_bundled, routing_summary)


@pytest.fixture(scope="module")
def bundle():
    if not (ASSET_DIR / "ckpt-0").is_dir():
        pytest.fail(f"{ASSET_DIR}/ckpt-0 is missing: the bundled model must be shipped")
    return load_bundled(ASSET_DIR)


@pytest.fixture(scope="module")
def examples():
    with open(ASSET_DIR / "examples.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def example_eval(bundle, examples):
    config, params, tokenizer = bundle
    windows, labels = example_windows(examples, tokenizer)
    return evaluate(params, config, windows, batch=16), labels


def test_bundle_layout_and_size(bundle):
    config, params, tokenizer = bundle
    assert config == GROK_TINY
    assert (config.num_experts, config.num_selected_experts) == (8, 2)
    assert config.num_q_heads > config.num_kv_heads
    assert tokenizer.vocab_size == config.vocab_size
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
    for module, values in params.items():
        for name, value in values.items():
            path = f"{module}/{name}"
            assert isinstance(value, QuantizedWeight8bit) == is_quantizable(path), path
    total = sum(p.stat().st_size for p in ASSET_DIR.rglob("*") if p.is_file())
    assert total <= 10 * 1000 * 1000, f"{ASSET_DIR} holds {total:,} bytes"
    for name in ("README.md", "config.json", "tokenizer.model", "examples.jsonl", "metrics.json",
                 "corpus.json"):
        assert (ASSET_DIR / name).is_file(), name


def test_examples_are_heldout_and_short(bundle, examples):
    _, _, tokenizer = bundle
    labels = [e["label"] for e in examples]
    assert labels.count("code") >= 16 and labels.count("prose") >= 16
    for e in examples:
        assert corpus.split_of(e["source"]) == "heldout", e["source"]
        assert e["source"].startswith(f"{e['label']}:")
        ids = tokenizer.encode(e["text"])
        assert 0 < len(ids) <= 200
        assert tokenizer.decode(ids) == e["text"]


def test_split_rule():
    names = [f"code:pkg/module_{i}.py" for i in range(2000)]
    held = [n for n in names if corpus.split_of(n) == "heldout"]
    assert 0.07 < len(held) / len(names) < 0.13
    # Pinned: the split must not move between versions or processes (a moved split would
    # leak held-out documents into training).
    assert [i for i in range(12) if corpus.split_of(names[i]) == "heldout"] == [2, 5, 7, 11]
    assert corpus.split_of("prose:licenses/GPL-3") == "train"


def test_heldout_loss_beats_unigram(bundle, example_eval):
    config, _, tokenizer = bundle
    result, _ = example_eval
    docs = [d for d in corpus.load_corpus() if d.split == "train"]
    counts = corpus.unigram_counts(corpus.encode_documents(tokenizer, docs), config.vocab_size)
    unigram = corpus.unigram_loss(corpus.unigram_log_probs(counts), result.tokens, config.pad_token)
    model = heldout_loss(result)
    assert np.isfinite(model)
    assert model <= 0.75 * unigram, f"int8 held-out {model:.3f} vs unigram {unigram:.3f} nats/token"
    for label in ("code", "prose"):
        rows = np.asarray([e == label for e in example_eval[1]])
        part = result.select(rows)
        assert heldout_loss(part) < corpus.unigram_loss(corpus.unigram_log_probs(counts), part.tokens)


def test_routing_is_neither_collapsed_nor_domain_blind(bundle, example_eval):
    config, _, _ = bundle
    result, labels = example_eval
    summary = routing_summary(result, labels, config.num_experts)
    load = np.asarray(summary["load"])
    assert load.shape == (config.num_layers, config.num_experts)
    np.testing.assert_allclose(load.sum(axis=1), 1.0)
    assert load.min() >= 0.02, f"least-used expert share per layer: {summary['load_min']}"
    assert max(summary["max_fold"]) >= 2.0, f"largest code/prose share fold per layer: {summary['max_fold']}"
    entropy = np.asarray(summary["entropy"])
    assert np.all(entropy < 0.99), f"router entropy / ln E per layer: {entropy}"


def test_the_model_card_renders_from_the_shipped_metrics():
    """The card template reproduces the shipped card's text from metrics.json."""
    from grokscope.train import _card

    metrics = json.loads((ASSET_DIR / "metrics.json").read_text())
    card = _card(metrics)
    shipped = (ASSET_DIR / "README.md").read_text()
    assert shipped.startswith(card)
    assert f"**{metrics['parameters']['total']:,}** in total" in card
    assert card.count("\n| ") > 20  # the tables were filled in
