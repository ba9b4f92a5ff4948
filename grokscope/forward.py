"""The forward API: parameter shapes, initialisation and the recorded forward pass.

`make_forward(config, spec)` returns a pure function `(params, tokens, positions) ->
(logits, record)`; `forward` jits it once per (config, spec) and runs it, on one device
or on a mesh.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from grokscope.config import ModelConfig
from grokscope.layout import ParamShape, is_quantizable, param_shapes, release_scale_blocks
from grokscope.model import forward_fn
from grokscope.quant import quantize
from grokscope.record import RecordSpec, collect, record_filter
from grokscope.sharding import batch_sharding, place, shard_params

__all__ = ["ParamShape", "param_shapes", "is_quantizable", "release_scale_blocks", "init_params", "init_cache",
           "jitted_decoder",
           "make_forward", "jitted_forward", "forward", "ForwardOutput"]

def _transformed(config: ModelConfig, spec: RecordSpec, compute_dtype: str = "float32",
                 moe_dispatch: str = "sparse", interventions: tuple = ()):
    def fn(tokens, positions, ban_mask=None):
        with hk.custom_setter(record_filter(spec, config)):
            return forward_fn(config, tokens, positions, compute_dtype, moe_dispatch, interventions, None, ban_mask)

    return hk.transform_with_state(fn)


def init_params(config: ModelConfig, seed: int = 0, quantized: bool = True) -> dict:
    """Random parameters; quantizable weights become int8 with the release's scale blocks."""
    f = _transformed(config, RecordSpec(routing=False))
    tokens = jnp.zeros((1, 1), jnp.int32)
    params, _ = f.init(jax.random.PRNGKey(seed), tokens, tokens)
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
    """A pure `(params, tokens [B, T], positions [B, T], ban_mask=None) -> (logits [B, T, V] f32,
    record)`; `ban_mask` [layers, experts] bool bans experts as traced data (see `forward_fn`).

    See `grokscope.model.lm.forward_fn` for `compute_dtype`, `moe_dispatch` and `interventions`.
    """
    for iv in interventions:
        iv.check(config)
    f = _transformed(config, spec, compute_dtype, moe_dispatch, tuple(interventions))

    def apply(params, tokens, positions, ban_mask=None):
        logits, state = f.apply(params, {}, None, tokens, positions, ban_mask)
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
    """A jitted `(params, tokens [B, T], positions [B, T], cache) -> (logits, record, cache)`:
    the forward of the next T tokens of sequences whose earlier keys and values are in `cache`
    (from `init_cache`). Logits equal the full forward's at the same positions (to rounding)."""
    for iv in interventions:
        iv.check(config)

    def fn(tokens, positions, cache):
        with hk.custom_setter(record_filter(spec, config)):
            return forward_fn(config, tokens, positions, compute_dtype, moe_dispatch, interventions, cache)

    f = hk.transform_with_state(fn)

    def apply(params, tokens, positions, cache):
        (logits, cache), state = f.apply(params, {}, None, tokens, positions, cache)
        return logits, collect(state), cache

    return jax.jit(apply, donate_argnums=(3,))


class ForwardOutput(NamedTuple):
    """Logits [B, T, V] float32 and the record dict (see `grokscope.record`)."""

    logits: jax.Array
    record: dict[str, jax.Array]


def forward(params: dict, config: ModelConfig, tokens, record: RecordSpec = RecordSpec(),
            mesh: Mesh | None = None, positions=None, compute_dtype: str = "float32",
            moe_dispatch: str = "sparse", interventions=()) -> ForwardOutput:
    """Runs the model on `tokens` (int [batch, seq]) and returns logits and records.

    Any batch size works. `positions` (int [batch, seq]) defaults to 0..seq-1 per row.
    `compute_dtype` is "float32" (the release's outputs) or "bfloat16" (see
    `grokscope.model.lm.forward_fn`). `moe_dispatch` is "sparse" (default) or "dense", the
    reference formulation (see `grokscope.model.moe`). `interventions`: a sequence of
    `grokscope.interventions.Intervention` (ban, zero, force, swap, renormalize, ablate_head)
    applied inside the forward; logits and records are those of the intervened model.

    With a `mesh`, parameters are placed by the release's rules (no copy if `load_params`
    already placed them there) and the batch is split over `data` when it divides.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"forward: tokens must be an int array [batch, seq], got {tokens.dtype}{list(tokens.shape)}")
    if 0 in tokens.shape:
        raise ValueError(f"forward: tokens must hold at least one sequence of at least one token, "
                         f"got shape {list(tokens.shape)}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= config.vocab_size):
        raise ValueError(f"forward: token ids must lie in [0, {config.vocab_size}), "
                         f"got [{tokens.min()}, {tokens.max()}]")
    tokens = tokens.astype(np.int32)
    if positions is None:
        positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
    positions = np.asarray(positions)
    if positions.shape != tokens.shape or not np.issubdtype(positions.dtype, np.integer):
        raise ValueError(f"forward: positions must be an int array shaped like tokens {list(tokens.shape)}, "
                         f"got {positions.dtype}{list(positions.shape)}")
    positions = positions.astype(np.int32)
    fn = jitted_forward(config, record, compute_dtype, moe_dispatch, tuple(interventions))
    if mesh is None:
        return ForwardOutput(*fn(params, tokens, positions))
    params = shard_params(params, mesh)
    tokens = place(tokens, batch_sharding(mesh, tokens.shape))
    positions = place(positions, batch_sharding(mesh, positions.shape))
    with jax.set_mesh(mesh):
        return ForwardOutput(*fn(params, tokens, positions))
