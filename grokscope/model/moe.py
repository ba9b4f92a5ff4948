"""The router and the mixture-of-experts feed-forward block of Grok-1.

Algorithm:
  1. router_logits = float32(x) @ router.w  (float32, no bias, no noise; capped by
     `router_logit_softcap` when the config has one, as Grok-2 does: no cap in Grok-1);
     probs = softmax over *all* experts.
  2. (expert_gate, expert_index) = top_k(probs, k): ties go to the lower index; the gates are
     the raw probabilities, *not* renormalized.
  3. each selected expert e computes linear_1[e]( gelu(x @ linear[e]) * (x @ linear_v[e]) ),
     with the config's GELU (tanh approximation in Grok-1); the outputs are weighted by their gates and summed in
     float32, then cast to the activation dtype.
Pad tokens are routed like any other token, as in the release.

Dispatch (how step 3 is computed; all exact, no token is ever dropped):
  "dense"    the reference: every expert on every token, gate 0 for the unselected ones
             (E/k times the FLOPs; the formulation the release computes).
  "grouped"  the (token, slot) pairs sorted by expert and run through each expert in blocks
             of rows (a loop over experts, and over blocks within an expert): about
             (k + E*M/N)/E of the dense FLOPs for N tokens and block size M. Small weights
             are dequantized one expert at a time; large ones (`streamed_experts`) are read
             in tiles of rows, per device, with one sum across devices at the end.
  "ragged"   the same sorted rows through `jax.lax.ragged_dot`, a grouped matmul (native on
             GPUs; lowered to a masked dense dot on CPU).
  "sparse"   "ragged" on GPU/TPU, "grouped" on CPU (the default).
"""

from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from grokscope import kernels
from grokscope.config import ModelConfig
from grokscope.interventions import ROUTING_KINDS, apply_routing
from grokscope.model.attention import softcap
from grokscope.model.linear import HIGHEST, fan_in_init
from grokscope.quant import QuantizedWeight8bit, dequantize, hidden_tile, local_scales, stream_tile
from grokscope.record import probe
from grokscope.sharding import model_shards


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
        logits = softcap(logits, self.config.router_logit_softcap)
        return logits, jax.nn.softmax(logits, axis=-1)


def route(probs: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Top-k of the router probabilities: (gates [..., k] f32, indices [..., k] int32)."""
    gates, index = jax.lax.top_k(probs, k)
    return gates, index.astype(jnp.int32)


def _expert_weight(name: str, shape: list[int]):
    with hk.name_scope(name):
        return hk.get_parameter("w", shape, jnp.float32, init=fan_in_init(1.0))


MOE_DISPATCH = ("sparse", "grouped", "ragged", "dense")


def resolve_dispatch(dispatch: str) -> str:
    """The concrete path of a dispatch name ("sparse" picks by platform)."""
    if dispatch not in MOE_DISPATCH:
        raise ValueError(f"moe_dispatch: expected one of {MOE_DISPATCH}, got {dispatch!r}")
    if dispatch == "sparse":
        return "grouped" if jax.default_backend() == "cpu" else "ragged"
    return dispatch


def _expert_slice(w, e):
    """Expert e's weight of a stacked [E, ...] weight (int8 + scales stay int8 + scales)."""
    if isinstance(w, QuantizedWeight8bit):
        return QuantizedWeight8bit(weight=jax.lax.dynamic_index_in_dim(w.weight, e, keepdims=False),
                                   scales=jax.lax.dynamic_index_in_dim(w.scales, e, keepdims=False))
    return jax.lax.dynamic_index_in_dim(w, e, keepdims=False)


def _block_rows(num_rows: int, num_experts: int, least: int = 16, step: int = 8) -> int:
    """Rows per block of the grouped path: about a quarter of an expert's mean share, within
    [least, 256] and a multiple of `step`. The streamed experts take least = step = 4, so a
    decode step's 2 rows per expert take one block of 4."""
    mean = num_rows / max(num_experts, 1)
    return int(min(256, max(least, step * round(mean / 4 / step))))


def _sorted_assignments(index: jax.Array, num_experts: int):
    """(token of each sorted row, expert of each sorted row, order, rows per expert) for the
    flattened [N, k] expert indices, sorted by expert (stable: token order within an expert)."""
    N, k = index.shape
    experts = index.reshape(-1)
    order = jnp.argsort(experts, stable=True)
    tokens = order // k
    counts = jnp.bincount(experts, length=num_experts).astype(jnp.int32)
    return tokens, experts[order], order, counts


def _gelu(x: jax.Array, variant: str) -> jax.Array:
    """GELU: "tanh" (the tanh approximation) or "erf" (exact)."""
    return jax.nn.gelu(x, approximate=variant == "tanh")


def _scale_blocks(w) -> int:
    """`n_blocks` of an int8 weight; 1 for a float one."""
    return w.n_blocks if isinstance(w, QuantizedWeight8bit) else 1


def _column_tile(w, shards: int, tiles: int, i, dtype):
    """Columns of tile i in every shard of a [..., in, F] weight, dequantized: [..., in, shards * t].

    F is viewed as [shards, tiles, t] (the shard dim outermost, as the mesh splits it), so the
    slice is local to each device; the scales (per column) are sliced the same way."""
    def cut(a):
        *lead, n_in, F = a.shape
        t = F // (shards * tiles)
        a = a.reshape(*lead, n_in, shards, tiles, t)
        return jax.lax.dynamic_index_in_dim(a, i, axis=-2, keepdims=False).reshape(*lead, n_in, shards * t)

    if isinstance(w, QuantizedWeight8bit):
        return cut(w.weight).astype(dtype) * cut(w.scales).astype(dtype)
    return cut(w).astype(dtype)


def _row_tile(w, shards: int, tiles: int, i, dtype):
    """Rows of tile i in every shard of a [..., F, out] weight, dequantized: [..., shards * t, out].
    Each shard's tile lies inside one scale block (`hidden_tile` ensures it)."""
    *lead, F, n_out = w.shape
    t = F // (shards * tiles)
    weight = w.weight if isinstance(w, QuantizedWeight8bit) else w
    rows = weight.reshape(*lead, shards, tiles, t, n_out)
    rows = jax.lax.dynamic_index_in_dim(rows, i, axis=-3, keepdims=False).astype(dtype)  # [..., S, t, out]
    if isinstance(w, QuantizedWeight8bit):
        nb = w.n_blocks
        if nb == 1:
            scale = w.scales.astype(dtype)[..., None, :, :]  # [..., 1, 1, out]
        else:
            per_shard = nb // shards  # blocks in each shard; tile i lies in block (i * t) // (F / nb) of them
            blocks = w.scales.reshape(*lead, shards, per_shard, n_out)
            scale = jax.lax.dynamic_index_in_dim(blocks, (i * t) // (F // nb), axis=-2, keepdims=True)
            scale = scale.astype(dtype)  # [..., S, 1, out]
        rows = rows * scale
    return rows.reshape(*lead, shards * t, n_out)


def _tiled(contract, out_shape, w_gate, w_up, w_down, dtype):
    """`contract(gate, up, down)` summed over tiles of the hidden width when the weights are large
    (`grokscope.quant.hidden_tile`): each tile's weights are dequantized on their own, inside each
    device's shard, so no whole float copy of a weight is ever made. Small weights run whole."""
    D, F = w_gate.shape[-2], w_gate.shape[-1]
    shards = model_shards()
    down_blocks = _scale_blocks(w_down)
    tile = hidden_tile(D, F, shards, down_blocks)
    if tile is None:
        return contract(*(dequantize(w, dtype) for w in (w_gate, w_up, w_down)))
    tiles = F // (shards * tile)

    def body(i, acc):
        return acc + contract(_column_tile(w_gate, shards, tiles, i, dtype), _column_tile(w_up, shards, tiles, i, dtype),
                              _row_tile(w_down, shards, tiles, i, dtype))

    return jax.lax.fori_loop(0, tiles, body, jnp.zeros(out_shape, jnp.float32))


def _ffn(rows, w_gate, w_up, w_down, dtype, gelu: str):
    """One expert's GeGLU on rows [..., D] (weights already this expert's): [..., D] float32.
    Large weights are computed in tiles of the hidden width (`_tiled`)."""
    def contract(w_gate, w_up, w_down):
        h_gate = jnp.dot(rows, w_gate, precision=HIGHEST).astype(jnp.float32)
        h_up = jnp.dot(rows, w_up, precision=HIGHEST).astype(jnp.float32)
        hidden = _gelu(h_gate, gelu) * h_up
        return jnp.dot(hidden, w_down.astype(jnp.float32), precision=HIGHEST)

    return _tiled(contract, rows.shape[:-1] + (w_down.shape[-1],), w_gate, w_up, w_down, dtype)


def grouped_experts(xs, counts, w_gate, w_up, w_down, block: int, gelu: str = "tanh"):
    """Rows xs [R, D] sorted by expert (counts [E] rows each) through their experts.

    A loop over experts (each expert's weights sliced and dequantized once, one expert at a
    time: never a whole [E, D, F] float copy) and, inside, over blocks of `block` rows from the
    expert's first row until its rows are done. A block may run past the expert's rows into
    the next expert's; those rows are written again, correctly, when the next expert's loop
    comes to them (experts go in order and each writes only from its own first row on).
    Returns [R, D] float32.

    Used for small weights (every bundled and test model); large ones go through
    `streamed_experts`.
    """
    R, D = xs.shape
    dtype = xs.dtype
    padded = jnp.concatenate([xs, jnp.zeros((block, D), dtype)])  # windows never clamp
    starts = jnp.cumsum(counts) - counts

    def expert_body(e, out):
        wg, wu, wd = (dequantize(_expert_slice(w, e), dtype) for w in (w_gate, w_up, w_down))
        start, count = starts[e], counts[e]

        def block_body(carry):
            b, out = carry
            row = start + b * block
            rows = jax.lax.dynamic_slice_in_dim(padded, row, block)
            h_gate = jnp.dot(rows, wg, precision=HIGHEST).astype(jnp.float32)
            h_up = jnp.dot(rows, wu, precision=HIGHEST).astype(jnp.float32)
            y = jnp.dot(_gelu(h_gate, gelu) * h_up, wd.astype(jnp.float32), precision=HIGHEST)
            return b + 1, jax.lax.dynamic_update_slice_in_dim(out, y, row, axis=0)

        _, out = jax.lax.while_loop(lambda c: c[0] * block < count, block_body, (jnp.int32(0), out))
        return out

    out = jax.lax.fori_loop(0, counts.shape[0], expert_body, jnp.zeros((R + block, D), jnp.float32))
    return out[:R]


def _row_tile_of(w, e, r0, rows: int, dtype, block=0):
    """Rows r0 .. r0 + rows of expert e's weight `[E, R, C]` (this device's part of it), widened to
    `dtype` and scaled by their scale block `block` (int8): `[rows, C]`."""
    weight = w.weight if isinstance(w, QuantizedWeight8bit) else w
    _, _, C = weight.shape
    tile = jax.lax.dynamic_slice(weight, (e, r0, 0), (1, rows, C))[0].astype(dtype)
    if isinstance(w, QuantizedWeight8bit):
        tile = tile * jax.lax.dynamic_slice(w.scales, (e, block, 0), (1, 1, C))[0].astype(dtype)
    return tile


def native_rows(block: int, dtype, *weights) -> bool:
    """Whether the streamed experts' blocks of `block` rows of `dtype` activations go through the
    native int8 kernel (`grokscope.kernels`): a decode step's few rows are bound by reading the
    weights, which XLA's CPU dot reads well below the memory bandwidth (benchmarks/width.py)."""
    return (block <= kernels.NATIVE_ROWS and dtype == jnp.float32
            and all(isinstance(w, QuantizedWeight8bit) for w in weights) and kernels.available())


def _scale_rows(w) -> int | None:
    """Rows of `w` [E, R, C] per scale block (None for a float weight)."""
    return w.weight.shape[-2] // w.n_blocks if isinstance(w, QuantizedWeight8bit) else None


def streamed_experts(x, tokens, row_gates, counts, w_gate, w_up, w_down, block: int, rows: int,
                     gelu: str = "tanh"):
    """The grouped path for large weights: expert outputs summed into each token, [N, D] float32.

    x [N, D] are the tokens; tokens [R] the token of each (token, slot) row sorted by expert,
    counts [E] rows per expert, row_gates [R] each row's gate. A loop over experts and, inside,
    over blocks of `block` rows from the expert's first row; each block runs through the
    expert's weights a tile of `rows` rows at a time (`grokscope.quant.stream_tile`): h_gate
    and h_up are summed over tiles of the gate/up weights' input rows, then the output over
    tiles of the down weight's rows. Tiles are contiguous slices of the int8 (or bfloat16)
    weight, widened on their own, so no float copy of a whole weight is ever made and the
    working set stays in the caches. Each block's gated outputs are added into their tokens;
    rows of a block past its expert's count (the next expert's, or padding) get gate 0.

    On a mesh with a `model` axis this runs per device (`jax.shard_map` over `model`): each
    device streams its own hidden units and the partial sums meet in one `psum` at the end,
    not one per block or tile.
    """
    N, D = x.shape
    dtype = x.dtype
    pad = lambda a: jnp.concatenate([a, jnp.zeros((block,), a.dtype)])  # blocks never clamp
    tokens, row_gates = pad(tokens), pad(row_gates)
    starts = jnp.cumsum(counts) - counts
    shards = model_shards()
    gate_rows = _scale_rows(w_gate)

    down_blocks = _scale_blocks(w_down)
    split_scales = down_blocks % shards == 0  # the down weight's scale blocks split as its rows are

    def down_block(r0, hidden):
        """The scale block of this device's down-weight rows r0.. (its local index)."""
        if down_blocks == 1:
            return 0
        if split_scales:
            return r0 // (hidden * shards // down_blocks)
        return (jax.lax.axis_index("model") * hidden + r0) // (hidden * shards // down_blocks)

    native = native_rows(block, dtype, w_gate, w_up, w_down)

    def local(x, tokens, row_gates, counts, starts, w_gate, w_up, w_down):
        hidden = (w_gate.weight if isinstance(w_gate, QuantizedWeight8bit) else w_gate).shape[-1]  # this device's
        if native:
            gate_scales, up_scales = w_gate.scales.astype(jnp.float32), w_up.scales.astype(jnp.float32)
            down_scales = local_scales(w_down.scales, hidden, shards, split_scales)

        def expert_body(e, out):
            start, count = starts[e], counts[e]

            def block_body(carry):
                b, out = carry
                row = start + b * block
                token = jax.lax.dynamic_slice_in_dim(tokens, row, block)
                keep = b * block + jnp.arange(block) < count
                gate = jnp.where(keep, jax.lax.dynamic_slice_in_dim(row_gates, row, block), 0.0)
                xb = jnp.take(x, token, axis=0)  # [block, D]
                if native:  # few rows: the int8 weights read once, widened in registers
                    valid = jnp.clip(count - b * block, 0, block)
                    h = _gelu(kernels.int8_rows(xb, w_gate.weight, gate_scales, e, valid), gelu) \
                        * kernels.int8_rows(xb, w_up.weight, up_scales, e, valid)
                    y = kernels.int8_rows(h, w_down.weight, down_scales, e, valid)
                    return b + 1, out.at[token].add(y * gate[:, None])

                def up_tile(j, acc):
                    r0 = j * rows
                    g_block = 0 if gate_rows is None else r0 // gate_rows
                    xj = jax.lax.dynamic_slice_in_dim(xb, r0, rows, axis=1)
                    h_gate = jnp.dot(xj, _row_tile_of(w_gate, e, r0, rows, dtype, g_block), precision=HIGHEST,
                                     preferred_element_type=jnp.float32)
                    h_up = jnp.dot(xj, _row_tile_of(w_up, e, r0, rows, dtype, g_block), precision=HIGHEST,
                                   preferred_element_type=jnp.float32)
                    return acc[0] + h_gate, acc[1] + h_up

                zeros = jnp.zeros((block, hidden), jnp.float32)
                h_gate, h_up = jax.lax.fori_loop(0, D // rows, up_tile, (zeros, zeros))
                h = _gelu(h_gate, gelu) * h_up  # [block, hidden] float32

                def down_tile(j, y):
                    r0 = j * rows
                    hj = jax.lax.dynamic_slice_in_dim(h, r0, rows, axis=1)
                    tile = _row_tile_of(w_down, e, r0, rows, dtype, down_block(r0, hidden)).astype(jnp.float32)
                    return y + jnp.dot(hj, tile, precision=HIGHEST)

                y = jax.lax.fori_loop(0, hidden // rows, down_tile, jnp.zeros((block, D), jnp.float32))
                return b + 1, out.at[token].add(y * gate[:, None])

            _, out = jax.lax.while_loop(lambda c: c[0] * block < count, block_body, (jnp.int32(0), out))
            return out

        out = jax.lax.fori_loop(0, counts.shape[0], expert_body, jnp.zeros((N, D), jnp.float32))
        return jax.lax.psum(out, "model") if shards > 1 else out

    args = (x, tokens, row_gates, counts, starts, w_gate, w_up, w_down)
    if shards == 1:
        return local(*args)
    split_cols, split_rows = P(None, None, "model"), P(None, "model", None)

    def spec(w, split):
        if not isinstance(w, QuantizedWeight8bit):
            return split
        return QuantizedWeight8bit(weight=split, scales=split if split is split_cols or split_scales else P())

    in_specs = (P(), P(), P(), P(), P(), spec(w_gate, split_cols), spec(w_up, split_cols), spec(w_down, split_rows))
    return jax.shard_map(local, in_specs=in_specs, out_specs=P(), axis_names={"model"}, check_vma=False)(*args)


def ragged_experts(xs, counts, w_gate, w_up, w_down, gelu: str = "tanh"):
    """Rows xs [R, D] sorted by expert through their experts with `jax.lax.ragged_dot` (large
    weights in tiles of the hidden width, `_tiled`)."""
    def contract(w_gate, w_up, w_down):
        h_gate = jax.lax.ragged_dot(xs, w_gate, counts, precision=HIGHEST).astype(jnp.float32)
        h_up = jax.lax.ragged_dot(xs, w_up, counts, precision=HIGHEST).astype(jnp.float32)
        hidden = _gelu(h_gate, gelu) * h_up
        return jax.lax.ragged_dot(hidden, w_down.astype(jnp.float32), counts, precision=HIGHEST)

    return _tiled(contract, xs.shape, w_gate, w_up, w_down, xs.dtype)


def _all_experts(x, w_gate, w_up, w_down, gelu: str):
    """Every expert's GeGLU output for every token: x [B, T, D] -> [B, T, E, D] float32 (large
    weights in tiles of the hidden width, `_tiled`)."""
    def contract(w_gate, w_up, w_down):
        h_gate = jnp.einsum("btd,edf->btef", x, w_gate, precision=HIGHEST).astype(jnp.float32)  # [B, T, E, F]
        h_up = jnp.einsum("btd,edf->btef", x, w_up, precision=HIGHEST).astype(jnp.float32)
        hidden = _gelu(h_gate, gelu) * h_up
        return jnp.einsum("btef,efd->bted", hidden, w_down.astype(jnp.float32), precision=HIGHEST)

    return _tiled(contract, x.shape[:-1] + (w_gate.shape[0], x.shape[-1]), w_gate, w_up, w_down, x.dtype)


class DenseMLP(hk.Module):
    """The dense gated MLP beside the experts (Grok-2's `mlp`): linear_1(gelu(x @ linear) * (x @ linear_v)),
    on the same normalized input; computed as one expert is (float32 GELU and product)."""

    def __init__(self, config: ModelConfig, name: str = "mlp"):
        super().__init__(name=name)
        self.config = config

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, T, D] -> [B, T, D] float32."""
        D, Fd = self.config.emb_size, self.config.dense_ffn_size
        w_gate = _expert_weight("linear", [D, Fd])
        w_up = _expert_weight("linear_v", [D, Fd])
        w_down = _expert_weight("linear_1", [Fd, D])
        return _ffn(x, w_gate, w_up, w_down, x.dtype, self.config.gelu)


class MoELayer(hk.Module):
    """Top-k mixture of GeGLU experts; `dispatch` picks how it is computed (see the module)."""

    def __init__(self, config: ModelConfig, dispatch: str = "sparse", interventions: tuple = (),
                 name: str = "moe"):
        super().__init__(name=name)
        self.config = config
        self.dispatch = resolve_dispatch(dispatch)
        self.interventions = tuple(iv for iv in interventions if iv.kind in ROUTING_KINDS)

    def __call__(self, x: jax.Array, probs: jax.Array, positions: jax.Array | None = None,
                 banned: jax.Array | None = None) -> jax.Array:
        """x: [B, T, D] normalized input; probs: [B, T, E] router probabilities; positions
        [B, T] (where interventions apply); banned: [E] bool, experts banned at this layer
        (traced, see `grokscope.interventions.apply_routing`)."""
        c = self.config
        E, D, F = c.num_experts, c.emb_size, c.ffn_size
        if self.interventions or banned is not None:
            if positions is None:
                positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
            gates, index = apply_routing(probs, positions, c.num_selected_experts, self.interventions, banned)
        else:
            gates, index = route(probs, c.num_selected_experts)  # [B, T, k]
        probe("expert_index", index)
        probe("expert_gate", gates)
        w_gate_q = _expert_weight("linear", [E, D, F])
        w_up_q = _expert_weight("linear_v", [E, D, F])
        w_down_q = _expert_weight("linear_1", [E, F, D])
        if self.dispatch == "dense":
            out = self._dense(x, gates, index, w_gate_q, w_up_q, w_down_q)
            probe("moe_output", out)
            return out.astype(x.dtype)
        # What every expert would output: computed only when recorded (otherwise the value is
        # unused and compiled away).
        probe("expert_output", _all_experts(x, w_gate_q, w_up_q, w_down_q, c.gelu))
        B, T, k = index.shape
        tokens, _, order, counts = _sorted_assignments(index.reshape(B * T, k), E)
        flat = x.reshape(B * T, D)
        # Gates rounded through the activation dtype, as the dense path's one-hot product is.
        row_gates = gates.astype(x.dtype).astype(jnp.float32).reshape(-1)[order]
        rows = self._stream_rows(w_gate_q, w_down_q) if self.dispatch == "grouped" else None
        if rows is not None:
            out = streamed_experts(flat, tokens, row_gates, counts, w_gate_q, w_up_q, w_down_q,
                                   _block_rows(B * T * k, E, least=4, step=4), rows, c.gelu).reshape(B, T, D)
            probe("moe_output", out)
            return out.astype(x.dtype)
        xs = jnp.take(flat, tokens, axis=0)  # [N k, D], sorted by expert
        if self.dispatch == "grouped":
            ys = grouped_experts(xs, counts, w_gate_q, w_up_q, w_down_q, _block_rows(B * T * k, E), c.gelu)
        else:
            ys = ragged_experts(xs, counts, w_gate_q, w_up_q, w_down_q, c.gelu)
        out = jnp.zeros((B * T, D), jnp.float32).at[tokens].add(ys * row_gates[:, None]).reshape(B, T, D)
        probe("moe_output", out)
        return out.astype(x.dtype)

    def _stream_rows(self, w_gate, w_down) -> int | None:
        """Rows per tile when the grouped path streams the experts' weights (large weights), else None."""
        return stream_tile(self.config.emb_size, self.config.ffn_size, model_shards(), _scale_blocks(w_gate),
                           _scale_blocks(w_down))

    def _dense(self, x, gates, index, w_gate_q, w_up_q, w_down_q):
        E = self.config.num_experts
        # Gate of every expert: the top-k probability where selected, 0 elsewhere.
        dense_gates = jnp.einsum(
            "btk,btke->bte", gates.astype(x.dtype).astype(jnp.float32),
            jax.nn.one_hot(index, E, dtype=jnp.float32), precision=HIGHEST)  # [B, T, E]

        out = _all_experts(x, w_gate_q, w_up_q, w_down_q, self.config.gelu)  # [B, T, E, D]
        probe("expert_output", out)
        return jnp.einsum("bte,bted->btd", dense_gates, out, precision=HIGHEST)
