"""RecordSpec: the command-line form, validation, and its round trip through a dict."""

import pytest

from grokscope import TINY, AttentionSpec, RecordSpec


@pytest.mark.parametrize("text,expected", [
    ("routing", RecordSpec()),
    ("routing,attention:layers=0-3:heads=all:format=topk:k=16",
     RecordSpec(attention=AttentionSpec(layers=(0, 1, 2, 3), heads="all", format="topk", k=16))),
    ("routing,attention:layers=0-1:heads=0,2:format=full,residual:layers=3",
     RecordSpec(attention=AttentionSpec(layers=(0, 1), heads=(0, 2), format="full"), residual=(3,))),
    ("residual:layers=0,2,5-7,attention:heads=1,3-4:k=4",
     RecordSpec(routing=False, attention=AttentionSpec(heads=(1, 3, 4), k=4), residual=(0, 2, 5, 6, 7))),
    ("attention:format=head_mean", RecordSpec(routing=False, attention=AttentionSpec(format="head_mean"))),
])
def test_parse(text, expected):
    assert RecordSpec.parse(text) == expected


@pytest.mark.parametrize("text,message", [
    ("routing:k=3", "routing takes no options"),
    ("attention:format=dense", "attention format: expected one of"),
    ("attention:layers=a-b", "expected 'all', numbers or ranges"),
    ("attention:depth=3", r"unknown attention options \['depth'\]"),
    ("experts", "unknown quantity 'experts'"),
    ("attention:layers", "expected key=value"),
])
def test_parse_errors(text, message):
    with pytest.raises(ValueError, match=message):
        RecordSpec.parse(text)


def test_resolved_validates_against_the_model_and_round_trips():
    spec = RecordSpec(attention=AttentionSpec(layers="all", heads=(3, 1)), residual="all")
    resolved = spec.resolved(TINY)
    assert resolved.attention.layers == (0, 1) and resolved.attention.heads == (1, 3) and resolved.residual == (0, 1)
    assert RecordSpec.from_dict(resolved.to_dict()) == resolved
    assert hash(resolved) == hash(RecordSpec.from_dict(resolved.to_dict()))
    with pytest.raises(ValueError, match=r"attention heads: expected indices in \[0, 4\), got \[1, 9\]"):
        RecordSpec(attention=AttentionSpec(heads=(9, 1))).resolved(TINY)


def test_expert_index_widens_when_int8_cannot_hold_the_experts(tiny_config):
    import dataclasses

    import numpy as np

    from grokscope import forward, init_params
    from grokscope.record import store_dtype, to_store_dtypes
    from grokscope.store import layout

    assert store_dtype("expert_index", tiny_config) == np.int8
    wide = dataclasses.replace(tiny_config, num_experts=200, num_layers=1)
    variables, _ = layout(wide, RecordSpec(), 2, 16, 2)
    assert variables["expert_index"].dtype == np.int16
    tokens = np.arange(3, 35, dtype=np.int32).reshape(2, 16)
    record = forward(init_params(wide, seed=0), wide, tokens).record
    stored = to_store_dtypes(record, wide)["expert_index"]
    assert stored.dtype == np.int16
    np.testing.assert_array_equal(np.asarray(stored), np.asarray(record["expert_index"]))
    assert np.asarray(record["expert_index"]).max() > 127  # the case int8 would have wrapped
