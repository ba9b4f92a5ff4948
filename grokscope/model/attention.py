"""Grouped-query self-attention with RoPE and a tanh soft cap on the logits (30 in Grok-1)."""

from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp

from grokscope.config import ModelConfig
from grokscope.interventions import ablate_heads
from grokscope.model.linear import HIGHEST, Linear
from grokscope.model.rope import apply_rope
from grokscope.record import probe

MASK_VALUE = -1e30


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """cap * tanh(x / cap), or x unchanged when `cap` is None."""
    return x if cap is None else cap * jnp.tanh(x / cap)


class MultiHeadAttention(hk.Module):
    """Causal GQA attention.

    Algorithm (dtypes as in the release):
      1. q, k, v = x @ w_{query,key,value} in the activation dtype; RoPE on q and k.
      2. logits = (q . k) -> float32, * attn_output_multiplier, then cap * tanh(logits / cap)
         (`attn_logit_softcap`, 30 in Grok-1); with `attn_temperature_len` L, the logits of a
         query at position q > L are multiplied by log2(q) / log2(L).
      3. masked logits (future keys, pad keys) are set to -1e30 *after* the cap, so a query
         whose keys are all masked attends uniformly to every key.
      4. float32 softmax over keys, cast to the activation dtype, weighted sum of v,
         output projection `linear`.
    Query head j reads kv head j // (H / G).
    """

    def __init__(self, config: ModelConfig, interventions: tuple = (), name: str = "multi_head_attention"):
        super().__init__(name=name)
        self.config = config
        self.interventions = interventions

    def __call__(self, x: jax.Array, mask: jax.Array, positions: jax.Array, cache=None):
        """x: [B, T, D]; mask: [B, T, S] bool (True = may attend); positions: [B, T].

        With `cache` = (keys [B, S, G, K], values [B, S, G, K], start): this call's keys and
        values are written at rows start.. of the cache, the queries attend over all S rows
        (as `mask` allows), and (output, (keys, values)) is returned; without, the output.
        """
        c = self.config
        B, T, _ = x.shape
        H, G, K = c.num_q_heads, c.num_kv_heads, c.key_size
        q = Linear(H * K, init_scale=2.5, name="query")(x).reshape(B, T, H, K)
        k = Linear(G * K, init_scale=2.5, name="key")(x).reshape(B, T, G, K)
        v = Linear(G * K, name="value")(x).reshape(B, T, G, K)
        q = apply_rope(q, positions, c.rope_theta)
        k = apply_rope(k, positions, c.rope_theta)
        if cache is not None:
            k_cache, v_cache, start = cache
            k = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), start, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), start, axis=1)
        q = q.reshape(B, T, G, H // G, K)  # [B, T, G, R, K]
        logits = jnp.einsum("btgrk,bsgk->bgrts", q, k, precision=HIGHEST).astype(jnp.float32)  # [B, G, R, T, S]
        logits = logits * c.attn_output_multiplier
        logits = softcap(logits, c.attn_logit_softcap)
        if c.attn_temperature_len is not None:
            L = c.attn_temperature_len
            q_pos = positions.astype(jnp.float32)  # [B, T]
            scale = jnp.where(q_pos > L, jnp.log2(jnp.maximum(q_pos, 1.0)) / jnp.log2(float(L)), 1.0)
            logits = logits * scale[:, None, None, :, None]
        logits = jnp.where(mask[:, None, None, :, :], logits, MASK_VALUE)
        weights = jax.nn.softmax(logits, axis=-1)  # [B, G, R, T, S] float32
        probe("attn_weights", weights.reshape(B, H, T, -1))  # head j = g * R + r
        weights = weights.astype(x.dtype)
        out = jnp.einsum("bgrts,bsgk->btgrk", weights, v, precision=HIGHEST).reshape(B, T, H, K)
        if any(iv.kind == "ablate_head" for iv in self.interventions):
            out = ablate_heads(out, positions, self.interventions)
        out = Linear(c.emb_size, name="linear")(out.reshape(B, T, H * K))
        return (out, (k, v)) if cache is not None else out
