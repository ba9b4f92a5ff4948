"""Int8 weights with block-wise scales, as stored in the Grok-1 release.

A `QuantizedWeight8bit` holds an int8 `weight[..., in, out]` and `scales[..., n_blocks, out]`
(bfloat16 in the release). The input dimension is cut into `n_blocks` equal blocks of rows,
and every (block, output column) has its own scale:

    W[..., i, o] = weight[..., i, o] * scales[..., i // (in // n_blocks), o]

The release uses `n_blocks = 1` for q/k/v and the MoE `linear`/`linear_v` weights, and
`n_blocks = 8` where the input dimension is sharded (attention `linear`, MoE `linear_1`).
Any `n_blocks` that divides the input size works here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

__all__ = ["QuantizedWeight8bit", "dequantize", "quantize", "hidden_tile", "stream_tile", "TILE_MIN_BYTES"]


@dataclasses.dataclass
class QuantizedWeight8bit:
    """An int8 weight with block-wise scales (a JAX pytree with leaves `weight`, `scales`)."""

    weight: Any
    scales: Any

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical (dequantized) shape: that of `weight`."""
        return tuple(self.weight.shape)

    @property
    def n_blocks(self) -> int:
        """Number of row blocks along the input dimension."""
        return int(self.scales.shape[-2])

    @property
    def nbytes(self) -> int:
        return int(self.weight.nbytes) + int(self.scales.nbytes)


jax.tree_util.register_dataclass(QuantizedWeight8bit, data_fields=["weight", "scales"], meta_fields=[])


def dequantize(w: Any, dtype=jnp.bfloat16) -> jax.Array:
    """Returns the full-precision weight; plain arrays are cast to `dtype`.

    The product `int8 -> dtype` times `scales -> dtype` is taken in `dtype`, as the
    release does in bfloat16.
    """
    if not isinstance(w, QuantizedWeight8bit):
        return jnp.asarray(w).astype(dtype)
    weight = w.weight.astype(dtype)
    *lead, n_in, n_out = weight.shape
    n_blocks = w.n_blocks
    scales = w.scales.astype(dtype)
    if n_blocks == 1:
        return weight * scales
    blocked = weight.reshape(*lead, n_blocks, n_in // n_blocks, n_out)  # [..., nb, in/nb, out]
    return (blocked * scales[..., :, None, :]).reshape(*lead, n_in, n_out)


def quantize(w: np.ndarray, n_blocks: int = 1, scale_dtype=ml_dtypes.bfloat16) -> QuantizedWeight8bit:
    """Symmetric per-(row block, output column) int8 quantization of `w[..., in, out]` (host side).

    scales = (max |w| over the block's rows) / 127, rounded to `scale_dtype`;
    weight = clip(rint(w / scales), -127, 127). All-zero columns get scale 0 and weight 0.
    """
    w = np.asarray(w, dtype=np.float32)
    *lead, n_in, n_out = w.shape
    if n_blocks < 1 or n_in % n_blocks:
        raise ValueError(f"quantize: n_blocks={n_blocks} must divide the input size {n_in}")
    blocked = w.reshape(*lead, n_blocks, n_in // n_blocks, n_out)
    scales = (np.abs(blocked).max(axis=-2) / 127.0).astype(scale_dtype)  # [..., nb, out]
    s32 = scales.astype(np.float32)[..., :, None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(s32 > 0, np.rint(blocked / np.where(s32 > 0, s32, 1)), 0)
    weight = np.clip(q, -127, 127).astype(np.int8).reshape(w.shape)
    return QuantizedWeight8bit(weight=weight, scales=scales)


TILE_MIN_BYTES = 64 * 1024 * 1024
"""A gated feed-forward network whose three weights, dequantized to float32, would take more than
this on one device is computed in tiles of its hidden width (`hidden_tile`); smaller ones (every
bundled and test model) are computed whole, exactly as before."""


def hidden_tile(d_model: int, hidden: int, shards: int, down_blocks: int, target: int = 512) -> int | None:
    """Hidden units per tile and per model shard for a GeGLU of width `hidden` split over `shards`
    devices, or None to compute it whole.

    A tile divides each shard's hidden units and the rows of one scale block of the down
    projection (so a tile's rows share one scale); it is the largest such divisor up to
    `target`, at least 64, and needs `down_blocks` to be a multiple of `shards` (or 1).
    """
    if hidden % shards or 3 * d_model * (hidden // shards) * 4 <= TILE_MIN_BYTES:
        return None
    if down_blocks > 1 and (down_blocks % shards or hidden % down_blocks):
        return None
    local = hidden // shards
    unit = hidden // down_blocks if down_blocks > 1 else local
    tile = max((t for t in range(1, min(target, unit, local) + 1) if unit % t == 0 and local % t == 0), default=1)
    return tile if 64 <= tile < local else None


def stream_tile(d_model: int, hidden: int, shards: int, gate_blocks: int, down_blocks: int,
                target_bytes: int = 2 * 1024 * 1024) -> int | None:
    """Rows per tile for the grouped path's streamed experts (`grokscope.model.moe.streamed_experts`),
    or None to compute them whole.

    Each expert's weights are read in tiles of rows: `t` rows of the gate and up projections
    (`[t, hidden / shards]`) and `t` rows of the down projection (`[t, d_model]`), each widened
    to float32 on its own, so a tile takes about `target_bytes` (2 MB: it stays in the CPU's
    caches between its conversion and its product). `t` divides the rows of one scale block of
    every weight (so a tile's rows share their scales) and each shard's hidden units; it is at
    least 8. Weights at or under `TILE_MIN_BYTES` per shard run whole, as before.
    """
    if hidden % shards or 3 * d_model * (hidden // shards) * 4 <= TILE_MIN_BYTES:
        return None
    local = hidden // shards
    if d_model % gate_blocks or hidden % down_blocks:
        return None
    units = [d_model // gate_blocks, local, hidden // down_blocks if down_blocks > 1 else local]
    want = max(8, target_bytes // (4 * max(local, d_model)))
    tile = max((t for t in range(1, want + 1) if all(u % t == 0 for u in units)), default=1)
    return tile if tile >= 8 else None


def local_scales(scales: jax.Array, rows: int, shards: int, split: bool, axis: int = -2) -> jax.Array:
    """Float32 scale blocks of this device's `rows` input rows, in equal blocks, inside a
    `jax.shard_map` over `model` that splits a weight's input rows (`rows * shards` in all).

    `scales` [..., B, C] block the whole input dim; with `split` they were split over the
    devices as the rows are (B a multiple of `shards`), and are this device's already; else
    they are whole on every device and this device's blocks are picked by its `axis_index`,
    in blocks of gcd(rows, rows of a block) rows, so that none straddles a scale block."""
    scales = scales.astype(jnp.float32)
    n_blocks = scales.shape[axis]
    if n_blocks == 1 or split:
        return scales
    block_rows = rows * shards // n_blocks
    step = math.gcd(rows, block_rows)
    first = jax.lax.axis_index("model") * rows + jnp.arange(rows // step) * step
    return jnp.take(scales, first // block_rows, axis=axis)
