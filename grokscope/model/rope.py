"""Rotary position embedding (rotate-half layout, as in GPT-NeoX and Grok-1)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def apply_rope(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
    """Rotates pairs (i, i + K/2) of each head by position * base^(-2i/K).

    Args:
      x: [B, T, heads, K].
      positions: [B, T] integer positions (absolute; pads included).
      base: rotary base.

    Returns:
      An array like `x`; the rotation itself runs in float32.
    """
    key_size = x.shape[-1]
    exponents = jnp.arange(0, key_size, 2, dtype=jnp.float32) / key_size  # [K/2]
    inv_freq = 1.0 / (base ** exponents)
    phase = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, K/2]
    phase = jnp.concatenate([phase, phase], axis=-1)[:, :, None, :]  # [B, T, 1, K]
    x32 = x.astype(jnp.float32)
    first, second = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return (x32 * jnp.cos(phase) + rotated * jnp.sin(phase)).astype(x.dtype)
