"""Bias-free linear layer whose weight may be a `QuantizedWeight8bit`."""

from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp

from grokscope.quant import dequantize

# Every matmul asks for full precision: on GPUs the default would run float32 products
# as TF32, which moves routing decisions; bfloat16 inputs are unaffected.
HIGHEST = jax.lax.Precision.HIGHEST


def fan_in_init(scale: float = 1.0):
    """Truncated normal with std scale / sqrt(fan_in); fan_in is the second-to-last dim."""

    def init(shape, dtype):
        std = scale / jnp.sqrt(shape[-2])
        return hk.initializers.TruncatedNormal(stddev=std)(shape, dtype)

    return init


class Linear(hk.Module):
    """x @ w for w of shape [in, out]; int8 weights are dequantized in x's dtype."""

    def __init__(self, output_size: int, init_scale: float = 1.0, name: str | None = None):
        super().__init__(name=name)
        self.output_size = output_size
        self.init_scale = init_scale

    def __call__(self, x: jax.Array) -> jax.Array:
        w = hk.get_parameter("w", [x.shape[-1], self.output_size], jnp.float32,
                             init=fan_in_init(self.init_scale))
        return jnp.einsum("...i,io->...o", x, dequantize(w, x.dtype), precision=HIGHEST)
