"""What XLA's CPU backend allocates for a bfloat16 output head: compiled temporary bytes of
ways to compute `h @ table.T` with a bf16 table and float32 activations, on one device.

    python benchmarks/head_memory.py [--vocab 16384] [--width 6144] [--rows 128]

The default table is one device's part of Grok-1's head on an 8-way mesh (the vocabulary is
split over `model`). Each variant's logits are compared with the whole-table product (max
|difference|). Measured 2026-11-30 on the 2-core CPU, [16384, 6144] in tiles of 128 rows:
whole 402.7 MB of temporaries (a float32 copy of the table); tiles sliced from the bf16 table
406.1 MB, and the same widened by their bits instead of a convert 406.1 MB (the backend's
bfloat16 normalization widens the operand of any bf16 slice, the whole table, before the loop);
tiles sliced from the table's bits as uint16 204.7 MB (the uint16 view is itself a copy), all
with identical logits. The model's head (`grokscope.model.lm.InOutEmbed.decode`) takes the
uint16 tiles. (Earlier, a width-split shard [131072, 768] in tiles of 8192 rows: 402.7 /
444.6 / 243.3 MB.)
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax import lax

HIGHEST = lax.Precision.HIGHEST


def whole(table, h):
    return jnp.einsum("btd,vd->btv", h, table.astype(jnp.float32), precision=HIGHEST)


def tiles(rows: int, as_bits: bool):
    def head(table, h):
        V = table.shape[0]
        source = lax.bitcast_convert_type(table, jnp.uint16) if as_bits else table

        def one(i, logits):
            tile = lax.dynamic_slice_in_dim(source, i * rows, rows, axis=0)
            if as_bits:
                tile = lax.bitcast_convert_type(tile, jnp.bfloat16)
            part = jnp.einsum("btd,vd->btv", h, tile.astype(jnp.float32), precision=HIGHEST)
            return lax.dynamic_update_slice_in_dim(logits, part, i * rows, axis=2)

        return lax.fori_loop(0, V // rows, one, jnp.zeros((*h.shape[:-1], V), jnp.float32))

    return head


def widened(tile):
    """bfloat16 -> float32 exactly, by its bits: the 16 bits become the top half of a float32."""
    bits = lax.bitcast_convert_type(tile, jnp.uint16).astype(jnp.uint32) << 16
    return lax.bitcast_convert_type(bits, jnp.float32)


def shifted_tiles(rows: int):
    def head(table, h):
        V = table.shape[0]

        def one(i, logits):
            tile = widened(lax.dynamic_slice_in_dim(table, i * rows, rows, axis=0))
            part = jnp.einsum("btd,vd->btv", h, tile, precision=HIGHEST)
            return lax.dynamic_update_slice_in_dim(logits, part, i * rows, axis=2)

        return lax.fori_loop(0, V // rows, one, jnp.zeros((*h.shape[:-1], V), jnp.float32))

    return head


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--width", type=int, default=6144)
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    table = jnp.asarray(rng.standard_normal((args.vocab, args.width)).astype(ml_dtypes.bfloat16))
    h = jnp.asarray(rng.standard_normal((args.batch, args.length, args.width)).astype(np.float32))
    reference = np.asarray(jax.jit(whole)(table, h))
    print(f"table [{args.vocab}, {args.width}] bf16 = {table.nbytes / 1e6:.1f} MB; activations [{args.batch}, "
          f"{args.length}, {args.width}] float32")
    for name, fn in (("whole", whole), (f"tiles of {args.rows} rows", tiles(args.rows, False)),
                     (f"tiles of {args.rows} rows from uint16 bits", tiles(args.rows, True)),
                     (f"tiles of {args.rows} rows widened by bits", shifted_tiles(args.rows))):
        compiled = jax.jit(fn).lower(table, h).compile()
        memory = compiled.memory_analysis()
        diff = float(np.abs(np.asarray(compiled(table, h)) - reference).max())
        print(f"{name:36s} temp {memory.temp_size_in_bytes / 1e6:8.1f} MB  output "
              f"{memory.output_size_in_bytes / 1e6:8.1f} MB  max |diff| {diff:.3g}")


if __name__ == "__main__":
    main()
