"""The parameter layout (grokscope.layout) is the tree the model's haiku modules create."""

import dataclasses

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grokscope import GROK_1, TINY
from grokscope.config import GROK_TINY
from grokscope.layout import param_layout
from grokscope.model import forward_fn


def _haiku_tree(config):
    """{path: shape} of the parameters haiku creates for the model, without memory."""
    f = hk.transform_with_state(lambda t, p: forward_fn(config, t, p))
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    params, _ = jax.eval_shape(f.init, jax.random.PRNGKey(0), tokens, tokens)
    return {f"{module}/{name}": tuple(leaf.shape) for module, values in params.items()
            for name, leaf in values.items()}


@pytest.mark.parametrize("config", [TINY, GROK_TINY, GROK_1, dataclasses.replace(TINY, num_layers=12)],
                         ids=["tiny", "grok-tiny", "grok-1", "12-layers"])
def test_layout_is_the_tree_the_model_creates(config):
    layout = param_layout(config)
    assert {path: spec.shape for path, spec in layout.items()} == _haiku_tree(config)
    # checkpoint order: module paths sorted as strings, then names
    order = list(layout)
    assert order == sorted(order, key=lambda p: (p.rsplit("/", 1)[0], p.rsplit("/", 1)[1]))
    if config.num_layers > 10:
        assert order.index("transformer/decoder_layer_10/moe/linear/w") < \
            order.index("transformer/decoder_layer_2/moe/linear/w")


def test_release_int8_blocks_and_specs_of_grok1():
    layout = param_layout(GROK_1)
    layer = "transformer/decoder_layer_0"
    quantized = {p for p, s in layout.items() if s.quantized}
    assert {p.split("/", 2)[2] for p in quantized if p.startswith(layer + "/")} == {
        "multi_head_attention/query/w", "multi_head_attention/key/w", "multi_head_attention/value/w",
        "multi_head_attention/linear/w", "moe/linear/w", "moe/linear_v/w", "moe/linear_1/w"}
    assert all(layout[p].dtype == np.int8 for p in quantized)
    assert layout[f"{layer}/moe/linear_1/w"].scale_blocks == 8 and layout[f"{layer}/moe/linear/w"].scale_blocks == 1
    assert layout[f"{layer}/multi_head_attention/linear/w"].scale_blocks == 8
    assert layout[f"{layer}/moe/linear/w"].partition == (None, "data", "model")
    assert layout[f"{layer}/router/w"].partition == (None, None) and layout[f"{layer}/router/w"].dtype == np.float32
    assert layout["language_model/in_out_embed/embeddings"].partition == ("model", "data")
    # 314B parameters, as the release says
    assert 3.1e11 < sum(int(np.prod(s.shape)) for s in layout.values()) < 3.2e11
