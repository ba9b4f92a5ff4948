"""The forward API: parameter shapes, initialization and the recorded forward pass.

`make_forward(config, spec)` returns a pure function `(params, tokens, positions) ->
(logits, record)`; `jitted_forward` jits it once per (config, spec). `grokscope.forward`
(the function, in `grokscope.runner`) runs it, on one device or on a mesh.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from grokscope.config import ModelConfig
from grokscope.layout import ParamShape, is_quantizable, param_shapes, release_scale_blocks
from grokscope.model import forward_fn
from grokscope.quant import quantize
from grokscope.record import RecordSpec, collect, record_filter

__all__ = ["ParamShape", "param_shapes", "is_quantizable", "release_scale_blocks", "init_params", "init_cache",
           "jitted_decoder",
           "make_forward", "jitted_forward"]

def _transformed(config: ModelConfig, spec: RecordSpec, compute_dtype: str = "float32",
                 moe_dispatch: str = "sparse", interventions: tuple = ()):
    def fn(tokens, positions, ban_mask=None, dense_off=None):
        with hk.custom_setter(record_filter(spec, config)):
            return forward_fn(config, tokens, positions, compute_dtype, moe_dispatch, interventions, None, ban_mask,
                              dense_off)

    return hk.transform_with_state(fn)


def init_params(config: ModelConfig, seed: int = 0, quantized: bool | None = None) -> dict:
    """Random parameters; with `quantized` (default: when the release stores int8, as Grok-1's
    does), quantizable weights become int8 with the release's scale blocks."""
    if quantized is None:
        quantized = config.weight_format == "int8"
    f = _transformed(config, RecordSpec(routing=False))
    tokens = jnp.zeros((1, 1), jnp.int32)
    params, _ = jax.jit(f.init)(jax.random.PRNGKey(seed), tokens, tokens)  # one compiled program, not op by op
    params = jax.device_get(params)
    if quantized:
        params = {module: {name: (quantize(v, release_scale_blocks(f"{module}/{name}", v.shape))
                                  if is_quantizable(f"{module}/{name}") else v)
                           for name, v in values.items()}
                  for module, values in params.items()}
    return params


def make_forward(config: ModelConfig, spec: RecordSpec = RecordSpec(),
                 compute_dtype: str = "float32", moe_dispatch: str = "sparse",
                 interventions: tuple = ()) -> Callable:
    """A pure `(params, tokens [B, T], positions [B, T], ban_mask=None, dense_off=None) -> (logits
    [B, T, V] f32, record)`; `ban_mask` [layers, experts] bool bans experts and `dense_off` [layers]
    bool zeroes the dense MLP, as traced data (see `forward_fn`).

    See `grokscope.model.lm.forward_fn` for `compute_dtype`, `moe_dispatch` and `interventions`.
    """
    for iv in interventions:
        iv.check(config)
    f = _transformed(config, spec, compute_dtype, moe_dispatch, tuple(interventions))

    def apply(params, tokens, positions, ban_mask=None, dense_off=None):
        logits, state = f.apply(params, {}, None, tokens, positions, ban_mask, dense_off)
        return logits, collect(state)

    return apply


@functools.lru_cache(maxsize=32)
def jitted_forward(config: ModelConfig, spec: RecordSpec, compute_dtype: str, moe_dispatch: str = "sparse",
                   interventions: tuple = ()):
    """`make_forward` jitted once per (config, spec, compute_dtype, moe_dispatch, interventions),
    shared by every caller."""
    return jax.jit(make_forward(config, spec, compute_dtype, moe_dispatch, interventions))


def init_cache(config: ModelConfig, batch: int, max_len: int, compute_dtype: str = "float32") -> dict:
    """An empty key/value cache for `max_len` positions: keys/values [layers, batch, max_len,
    kv heads, key size] in the compute dtype, `valid` [batch, max_len] and `length` (rows used)."""
    shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.key_size)
    return {"keys": jnp.zeros(shape, compute_dtype), "values": jnp.zeros(shape, compute_dtype),
            "valid": jnp.zeros((batch, max_len), bool), "length": jnp.zeros((), jnp.int32)}


@functools.lru_cache(maxsize=32)
def jitted_decoder(config: ModelConfig, spec: RecordSpec, compute_dtype: str = "float32",
                   moe_dispatch: str = "sparse", interventions: tuple = ()):
    """A jitted `(params, tokens [B, T], positions [B, T], cache, logits_at=None) -> (logits,
    record, cache)`: the forward of the next T tokens of sequences whose earlier keys and values
    are in `cache` (from `init_cache`). Logits [B, T, V] equal the full forward's at the same
    positions (to rounding); with `logits_at` [B] int, [B, V] at those positions of `tokens` only."""
    for iv in interventions:
        iv.check(config)

    def fn(tokens, positions, cache, logits_at):
        with hk.custom_setter(record_filter(spec, config)):
            return forward_fn(config, tokens, positions, compute_dtype, moe_dispatch, interventions, cache,
                              logits_at=logits_at)

    f = hk.transform_with_state(fn)

    def apply(params, tokens, positions, cache, logits_at=None):
        (logits, cache), state = f.apply(params, {}, None, tokens, positions, cache, logits_at)
        return logits, collect(state), cache

    return jax.jit(apply, donate_argnums=(3,))
