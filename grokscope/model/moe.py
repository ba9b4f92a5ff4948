"""The router and the mixture-of-experts feed-forward block of Grok-1.

Algorithm:
  1. router_logits = float32(x) @ router.w  (float32, no bias, no noise, no cap);
     probs = softmax over *all* experts.
  2. (expert_gate, expert_index) = top_k(probs, k): ties go to the lower index; the gates are
     the raw probabilities, *not* renormalised.
  3. each selected expert e computes linear_1[e]( gelu(x @ linear[e]) * (x @ linear_v[e]) ),
     with tanh-approximate GELU; the outputs are weighted by their gates and summed in
     float32, then cast to the activation dtype.
Pad tokens are routed like any other token, as in the release.
"""

from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp

from grokscope.config import ModelConfig
from grokscope.model.linear import HIGHEST, fan_in_init
from grokscope.quant import dequantize
from grokscope.record import probe


class Router(hk.Module):
    """Float32 linear router over all experts."""

    def __init__(self, config: ModelConfig, name: str = "router"):
        super().__init__(name=name)
        self.config = config

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x: [B, T, D] -> (router_logits [B, T, E] f32, probs [B, T, E] f32)."""
        w = hk.get_parameter("w", [x.shape[-1], self.config.num_experts], jnp.float32,
                             init=fan_in_init(2.0))
        logits = jnp.einsum("btd,de->bte", x.astype(jnp.float32), w.astype(jnp.float32), precision=HIGHEST)
        return logits, jax.nn.softmax(logits, axis=-1)


def route(probs: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Top-k of the router probabilities: (gates [..., k] f32, indices [..., k] int32)."""
    gates, index = jax.lax.top_k(probs, k)
    return gates, index.astype(jnp.int32)


def _expert_weight(name: str, shape: list[int]):
    with hk.name_scope(name):
        return hk.get_parameter("w", shape, jnp.float32, init=fan_in_init(1.0))


class MoELayer(hk.Module):
    """Top-k mixture of GeGLU experts (dense reference formulation)."""

    def __init__(self, config: ModelConfig, name: str = "moe"):
        super().__init__(name=name)
        self.config = config

    def __call__(self, x: jax.Array, probs: jax.Array) -> jax.Array:
        """x: [B, T, D] normalised input; probs: [B, T, E] router probabilities."""
        c = self.config
        E, D, F = c.num_experts, c.emb_size, c.ffn_size
        w_gate = dequantize(_expert_weight("linear", [E, D, F]), x.dtype)  # [E, D, F]
        w_up = dequantize(_expert_weight("linear_v", [E, D, F]), x.dtype)  # [E, D, F]
        w_down = dequantize(_expert_weight("linear_1", [E, F, D]), x.dtype)  # [E, F, D]

        gates, index = route(probs, c.num_selected_experts)  # [B, T, k]
        probe("expert_index", index)
        probe("expert_gate", gates)
        # Gate of every expert: the top-k probability where selected, 0 elsewhere.
        dense_gates = jnp.einsum(
            "btk,btke->bte", gates.astype(x.dtype).astype(jnp.float32),
            jax.nn.one_hot(index, E, dtype=jnp.float32), precision=HIGHEST)  # [B, T, E]

        h_gate = jnp.einsum("btd,edf->btef", x, w_gate, precision=HIGHEST).astype(jnp.float32)  # [B, T, E, F]
        h_up = jnp.einsum("btd,edf->btef", x, w_up, precision=HIGHEST).astype(jnp.float32)
        hidden = jax.nn.gelu(h_gate, approximate=True) * h_up
        out = jnp.einsum("btef,efd->bted", hidden, w_down.astype(jnp.float32), precision=HIGHEST)  # [B, T, E, D]
        return jnp.einsum("bte,bted->btd", dense_gates, out, precision=HIGHEST).astype(x.dtype)
