"""RMSNorm as in Grok-1: fp32 inside, eps from the config (1e-5), plain `scale` (not 1 + scale)."""

from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp


class RMSNorm(hk.Module):
    """y = x * rsqrt(mean(x^2) + eps) * scale, computed in float32, returned in x's dtype."""

    def __init__(self, eps: float = 1e-5, name: str | None = None):
        super().__init__(name=name)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        scale = hk.get_parameter("scale", [x.shape[-1]], jnp.float32, init=jnp.ones)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (normed * scale.astype(jnp.float32)).astype(x.dtype)
