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
        # A large int8 weight (each of Grok's attention projections) is never widened whole: a
        # few rows go through the native kernel, more through its columns widened a tile at a time.
        if kernels.use_int8_rows(x, w):
            return _per_device(x, w, partition_spec(f"{self.module_name}/w", w.shape), _native_rows)
        if isinstance(w, QuantizedWeight8bit) and w.weight.size * 4 // model_shards() > TILE_MIN_BYTES:
            return _per_device(x, w, partition_spec(f"{self.module_name}/w", w.shape), _column_tiles)
        return jnp.einsum("...i,io->...o", x, dequantize(w, x.dtype), precision=HIGHEST)


TILE_MIN_BYTES = 8 * 1024 * 1024
"""An int8 weight that would take more than this widened to float32 on one device (each of
Grok-1's and Grok-2's attention projections; none of the bundled and test models') is never
widened whole."""

TILE_BYTES = 2 * 1024 * 1024
"""About what one column tile of such a weight takes widened (it stays in the CPU's caches
between its conversion and its product)."""


def column_tile(rows: int, columns: int, target_bytes: int | None = None) -> int:
    """Columns per tile of a [rows, columns] weight: the largest divisor of `columns` whose
    tile widened to float32 takes at most `target_bytes` (default `TILE_BYTES`; at least 1)."""
    want = max(1, (target_bytes or TILE_BYTES) // (4 * rows))
    return max(t for t in range(1, min(want, columns) + 1) if columns % t == 0)


def _native_rows(rows: jax.Array, weight: jax.Array, scales: jax.Array) -> jax.Array:
    """rows [R, K] float32 @ (weight [K, N] int8 with scales [B, N]) by the native kernel."""
    return kernels.int8_rows(rows, weight[None], scales.astype(jnp.float32)[None], 0, rows.shape[0])


def _column_tiles(rows: jax.Array, weight: jax.Array, scales: jax.Array) -> jax.Array:
    """rows [R, K] @ (weight [K, N] int8 with scales [B, N]), a tile of columns at a time, each
    widened to the rows' dtype on its own: the same products as the whole weight widened."""
    K, N = weight.shape
    tile = column_tile(K, N)

    def body(i, out):
        columns = QuantizedWeight8bit(jax.lax.dynamic_slice_in_dim(weight, i * tile, tile, axis=1),
                                      jax.lax.dynamic_slice_in_dim(scales, i * tile, tile, axis=1))
        part = jnp.einsum("ri,io->ro", rows, dequantize(columns, rows.dtype), precision=HIGHEST)
        return jax.lax.dynamic_update_slice_in_dim(out, part, i * tile, axis=1)

    return jax.lax.fori_loop(0, N // tile, body, jnp.zeros((rows.shape[0], N), rows.dtype))


def _per_device(x: jax.Array, w: QuantizedWeight8bit, spec: tuple, product) -> jax.Array:
    """x @ w by `product(rows, weight, scales)` on each device's part of the weight on a mesh:
    the weight's output columns split over `model` give each device its columns of the output;
    its input rows split give each device a partial sum, added by one `psum`."""
    *lead, K = x.shape
    N = w.shape[-1]
    rows = x.reshape(-1, K)  # float32 where the native kernel runs (`kernels.use_int8_rows`)
    shards = model_shards()
    split = next((d for d, axes in enumerate(spec) if "model" in (axes if isinstance(axes, tuple) else (axes,))), None)
    if shards == 1 or split is None or w.shape[split] % shards:
        return product(rows, w.weight, w.scales).reshape(*lead, N)
    if split == 1:  # output columns
        specs = (P(), P(None, "model"), P(None, "model")), P(None, "model")
        local = product
    else:  # input rows: partial sums
        split_scales = w.n_blocks % shards == 0

        def local(rows, weight, scales):
            scales = local_scales(scales, weight.shape[0], shards, split_scales)
            return jax.lax.psum(product(rows, weight, scales), "model")

        specs = (P(None, "model"), P("model", None), P("model", None) if split_scales else P()), P()
    out = jax.shard_map(local, in_specs=specs[0], out_specs=specs[1], axis_names={"model"},
                        check_vma=False)(rows, w.weight, w.scales)
    return out.reshape(*lead, N)
