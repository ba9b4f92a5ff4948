"""Sparse expert dispatch against the dense reference: same choices, same outputs to rounding,
no token dropped, whatever the routing."""

import dataclasses
import zlib

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grokscope import TINY, forward, init_params
from grokscope.model.moe import MoELayer, _block_rows, resolve_dispatch
from grokscope.quant import quantize

CONFIG = dataclasses.replace(TINY, num_experts=8, num_selected_experts=2)


class _Layer:
    """MoELayer(dispatch) as init(key, x, p) -> params and apply(params, x, p) -> output."""

    def __init__(self, dispatch):
        self._f = hk.without_apply_rng(hk.transform_with_state(lambda x, p: MoELayer(CONFIG, dispatch)(x, p)))

    def init(self, key, x, p):
        return self._f.init(key, x, p)[0]

    def apply(self, params, x, p):
        return self._f.apply(params, {}, x, p)[0]


def _layer(dispatch):
    return _Layer(dispatch)


@pytest.fixture(scope="module")
def moe_params():
    x = jnp.zeros((1, 1, CONFIG.emb_size))
    p = jnp.full((1, 1, CONFIG.num_experts), 1 / CONFIG.num_experts)
    params = jax.device_get(_layer("dense").init(jax.random.PRNGKey(3), x, p))
    quantized = {m: {n: quantize(v, 8 if "linear_1" in m else 1) for n, v in values.items()}
                 for m, values in params.items()}
    return {"float": params, "int8": quantized}


def _routing(kind, B, T, E, rng):
    if kind == "random":
        logits = rng.standard_normal((B, T, E))
    elif kind == "one_expert":  # every token's first choice is expert 5, second expert 2
        logits = rng.standard_normal((B, T, E)) * 0.1
        logits[..., 5] += 6
        logits[..., 2] += 3
    elif kind == "skewed":  # most tokens on experts 0/1, a few elsewhere
        logits = rng.standard_normal((B, T, E))
        logits[: , : T * 3 // 4, :2] += 5
    else:
        raise ValueError(kind)
    return jax.nn.softmax(jnp.asarray(logits, jnp.float32), -1)


@pytest.mark.parametrize("dispatch", ["grouped", "ragged"])
@pytest.mark.parametrize("routing", ["random", "one_expert", "skewed"])
@pytest.mark.parametrize("weights", ["float", "int8"])
@pytest.mark.parametrize("shape", [(2, 37), (1, 1), (3, 64)])
def test_sparse_equals_dense(moe_params, dispatch, routing, weights, shape):
    rng = np.random.default_rng(zlib.crc32(f"{routing} {shape}".encode()))
    B, T = shape
    x = jnp.asarray(rng.standard_normal((B, T, CONFIG.emb_size)), jnp.float32)
    probs = _routing(routing, B, T, CONFIG.num_experts, rng)
    params = moe_params[weights]
    dense = _layer("dense").apply(params, x, probs)
    sparse = jax.jit(_layer(dispatch).apply)(params, x, probs)
    scale = float(jnp.abs(dense).max())
    np.testing.assert_allclose(np.asarray(sparse), np.asarray(dense), atol=1e-5 * max(scale, 1), rtol=1e-5)
    assert (np.abs(np.asarray(dense)).sum(-1) > 0).all()  # every token got its experts' output


def test_bfloat16_activations_agree_to_bf16_rounding(moe_params):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 50, CONFIG.emb_size)), jnp.bfloat16)
    probs = _routing("random", 2, 50, CONFIG.num_experts, rng)
    dense = np.asarray(_layer("dense").apply(moe_params["int8"], x, probs), np.float32)
    sparse = np.asarray(_layer("grouped").apply(moe_params["int8"], x, probs), np.float32)
    # bf16 matmuls round their outputs (h_gate, h_up) in both paths, each summing in its own
    # order: the difference is a few bf16 ulps of the row's magnitude, not of each element.
    row_scale = np.abs(dense).max(-1, keepdims=True)
    assert (np.abs(sparse - dense) <= 4 * 2.0**-8 * row_scale).all()
    assert np.median(np.abs(sparse - dense)) <= 2.0**-8 * np.median(row_scale)


def test_forward_sparse_and_dense_make_the_same_choices():
    params = init_params(TINY, seed=1)
    tokens = np.random.default_rng(1).integers(1, TINY.vocab_size, (4, 48))
    dense = forward(params, TINY, tokens, moe_dispatch="dense")
    for dispatch in ("sparse", "grouped", "ragged"):
        out = forward(params, TINY, tokens, moe_dispatch=dispatch)
        np.testing.assert_array_equal(out.record["expert_index"], dense.record["expert_index"])
        diff = np.abs(np.asarray(out.logits) - np.asarray(dense.logits))
        assert diff.max() <= 2.0**-7 * max(1.0, float(np.abs(dense.logits).max()))  # bf16 logits: one ulp


def test_dispatch_names():
    assert jax.default_backend() == "cpu"  # the tests run on CPU (conftest): sparse is the grouped loop
    assert resolve_dispatch("sparse") == "grouped"
    assert resolve_dispatch("ragged") == "ragged" and resolve_dispatch("dense") == "dense"
    with pytest.raises(ValueError, match="moe_dispatch"):
        resolve_dispatch("fast")
    assert _block_rows(2048, 8) == 64 and _block_rows(2, 8) == 16 and _block_rows(10**6, 8) == 256
    # the streamed experts: a decode step's 16 rows over 8 experts take blocks of 4; a prefill's 1024, of 32
    assert _block_rows(16, 8, least=4, step=4) == 4 and _block_rows(1024, 8, least=4, step=4) == 32
