"""Bias-free linear layer whose weight may be a `QuantizedWeight8bit`."""

from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from grokscope import kernels
from grokscope.layout import partition_spec
from grokscope.quant import QuantizedWeight8bit, dequantize, local_scales
from grokscope.sharding import model_shards

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
        if kernels.use_int8_rows(x, w):
            return _int8_rows(x, w, partition_spec(f"{self.module_name}/w", w.shape))
        return jnp.einsum("...i,io->...o", x, dequantize(w, x.dtype), precision=HIGHEST)


def _int8_rows(x: jax.Array, w: QuantizedWeight8bit, spec: tuple) -> jax.Array:
    """x @ w by the native int8 kernel (`grokscope.kernels.int8_rows`), per device on a mesh:
    the weight's output columns split over `model` give each device its columns of the output;
    its input rows split give each device a partial sum, added by one `psum`."""
    *lead, K = x.shape
    N = w.shape[-1]
    rows = x.reshape(-1, K).astype(jnp.float32)
    shards = model_shards()
    split = next((d for d, axes in enumerate(spec) if "model" in (axes if isinstance(axes, tuple) else (axes,))), None)
    if shards == 1 or split is None or w.shape[split] % shards:
        scales = w.scales.astype(jnp.float32)[None]
        return kernels.int8_rows(rows, w.weight[None], scales, 0, rows.shape[0]).reshape(*lead, N)
    if split == 1:  # output columns
        def local(rows, weight, scales):
            return kernels.int8_rows(rows, weight[None], scales.astype(jnp.float32)[None], 0, rows.shape[0])

        specs = (P(), P(None, "model"), P(None, "model")), P(None, "model")
    else:  # input rows: partial sums
        split_scales = w.n_blocks % shards == 0

        def local(rows, weight, scales):
            scales = local_scales(scales, weight.shape[0], shards, split_scales)[None]
            return jax.lax.psum(kernels.int8_rows(rows, weight[None], scales, 0, rows.shape[0]), "model")

        specs = (P(None, "model"), P("model", None), P("model", None) if split_scales else P()), P()
    out = jax.shard_map(local, in_specs=specs[0], out_specs=specs[1], axis_names={"model"},
                        check_vma=False)(rows, w.weight, w.scales)
    return out.reshape(*lead, N)
