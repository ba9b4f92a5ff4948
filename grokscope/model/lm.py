"""Embedding, decoder stack, final norm and output head: the whole Grok forward.

The head is the input embedding (tied, Grok-1) or a separate `unembed` table (Grok-2's
`lm_head`); the output logits are then soft-capped when the config says so (Grok-2: 50).
"""

from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import PartitionSpec as P

from grokscope import kernels
from grokscope.config import ModelConfig
from grokscope.model.attention import softcap
from grokscope.model.decoder import Transformer
from grokscope.model.linear import HIGHEST
from grokscope.model.norm import RMSNorm
from grokscope.sharding import constrain, model_shards

COMPUTE_DTYPES = ("float32", "bfloat16")


def as_activation_constant(x: float, dtype: str = "bfloat16") -> float:
    """A Python-float multiplier as the release applies it: rounded to `dtype`.

    Grok-1's release multiplies bf16 arrays by Python floats, which rounds them to bf16
    (78.38367176906169 becomes 78.5 and 0.5773502691896257 becomes 0.578125); with
    "float32" the multiplier is only rounded to float32.
    """
    value = np.asarray(x, dtype=np.float32)
    if dtype == "bfloat16":
        value = value.astype(ml_dtypes.bfloat16).astype(np.float32)
    return float(value)


class InOutEmbed(hk.Module):
    """A token embedding table `[V, D]`: the tied one (`in_out_embed`, input lookup and output
    logits) or an untied output head (`unembed`)."""

    def __init__(self, config: ModelConfig, name: str = "in_out_embed"):
        super().__init__(name=name)
        self.config = config

    def _table(self) -> jax.Array:
        return hk.get_parameter("embeddings", [self.config.vocab_size, self.config.emb_size],
                                jnp.float32, init=hk.initializers.TruncatedNormal(1.0))

    def embed(self, tokens: jax.Array) -> jax.Array:
        # The table's vocabulary is split over `model` (its width over `data`); re-split the
        # looked-up [B, T, D] by batch on `data` and width on `model`, as the release shards activations.
        return constrain(jnp.take(self._table(), tokens, axis=0), "data", None, "model")

    def decode(self, h: jax.Array, finish=lambda logits: logits) -> jax.Array:
        """h [B, T, D] -> finish(logits [B, T, V]), `finish` elementwise. On a mesh each device
        computes the logits of its own part of the vocabulary (the table's rows are split over
        `model`): the logits stay split the same way, never replicated, and no device sums
        another's partial products."""
        table = self._table()
        V, D = table.shape
        shards = model_shards()
        shards = shards if V % shards == 0 else 1
        if not (table.dtype == jnp.bfloat16 and h.dtype == jnp.float32 and large_head(V // shards, D)):
            return finish(jnp.einsum("btd,vd->btv", h, table.astype(h.dtype), precision=HIGHEST))
        B, T, _ = h.shape

        def local(h, table):
            return native(h, table) if kernels.available() else three_parts(h, table)

        def native(h, table):
            # The native kernel reads the bfloat16 table and widens it in registers: the float32
            # activations times the table, exactly as a widened copy, 8 rows at a time.
            logits = finish(kernels.bf16_rows(h.reshape(B * T, D), table))
            return logits.reshape(B, T, table.shape[0])

        def three_parts(h, table):
            # The releases' bfloat16 table is used as it is, never widened: float32 activations
            # are split into three bfloat16 parts that sum to them (to float32 precision), and
            # their products with the table are summed in float32 (bfloat16 products are exact
            # in float32). A widened copy of the table would be a float32 temporary of its whole
            # size, and the CPU backend widens the operand of any bf16 slice too
            # (benchmarks/head_memory.py). A few rows (a decode step) go through as one product
            # that reads the table once; more rows as three, one part at a time, so that only
            # one [B T, V] float32 product is alive beside the sum.
            parts = bfloat16_parts(h.reshape(B * T, D))  # [3, B T, D]
            if B * T <= HEAD_STACKED_ROWS:
                products = jnp.einsum("pnd,vd->pnv", parts, table, preferred_element_type=jnp.float32)
                logits = (products[0] + products[1]) + products[2]
            else:
                logits = jnp.einsum("nd,vd->nv", parts[0], table, preferred_element_type=jnp.float32)
                logits = logits + jnp.einsum("nd,vd->nv", parts[1], table, preferred_element_type=jnp.float32)
                logits = logits + jnp.einsum("nd,vd->nv", parts[2], table, preferred_element_type=jnp.float32)
            return finish(logits.reshape(B, T, table.shape[0]))

        if shards == 1:
            return local(h, table)
        return jax.shard_map(local, in_specs=(P(), P("model", None)), out_specs=P(None, None, "model"),
                             axis_names={"model"}, check_vma=False)(h, table)


def bfloat16_parts(x: jax.Array) -> jax.Array:
    """[3, ...] bfloat16 parts of float32 `x` whose sum is `x` to within float32 rounding: each is
    the bfloat16 rounding of what the earlier ones leave (8 bits of the significand apiece)."""
    first = x.astype(jnp.bfloat16)
    rest = x - first.astype(jnp.float32)  # exact
    second = rest.astype(jnp.bfloat16)
    third = (rest - second.astype(jnp.float32)).astype(jnp.bfloat16)
    return jnp.stack([first, second, third])


def large_head(vocab: int, width: int) -> bool:
    """Whether a bfloat16 output head of `vocab` rows on one device would take more than
    `quant.TILE_MIN_BYTES` in float32 (Grok-1's and Grok-2's: 403 MB a device on 8), so that it is
    never widened (`InOutEmbed.decode`); smaller ones (every bundled and test model) are widened
    and computed whole, as before."""
    from grokscope import quant

    return vocab * width * 4 > quant.TILE_MIN_BYTES


HEAD_STACKED_ROWS = 64
"""Up to this many rows of activations, a large head's three bfloat16 parts go through as one
product (the table read once: a decode step is bound by reading it); beyond, one part at a time."""

class LanguageModel(hk.Module):
    """tokens -> logits, with the release's multipliers and masks."""

    def __init__(self, config: ModelConfig, compute_dtype: str = "float32", name: str = "language_model"):
        super().__init__(name=name)
        self.config = config
        self.compute_dtype = jnp.dtype(compute_dtype)

    def __call__(self, tokens: jax.Array, positions: jax.Array, transformer: Transformer, cache=None,
                 ban_mask=None, dense_off=None, logits_at=None):
        c = self.config
        embed = InOutEmbed(c)
        h = embed.embed(tokens).astype(self.compute_dtype)  # [B, T, D]
        h = h * as_activation_constant(c.embedding_multiplier_scale, c.multipliers_dtype)
        T = tokens.shape[1]
        if cache is None:
            valid = tokens > c.pad_token  # [B, S]
            causal = jnp.tril(jnp.ones((T, T), dtype=bool))  # [T, S]
            mask = causal[None, :, :] & valid[:, None, :]  # [B, T, S]
            h = transformer(h, mask, positions, ban_mask=ban_mask, dense_off=dense_off)
        else:
            # The new tokens sit at cache rows length.. ; each attends to every valid row up to its own.
            start = cache["length"]
            valid = jax.lax.dynamic_update_slice_in_dim(cache["valid"], tokens > c.pad_token, start, axis=1)
            rows = jnp.arange(valid.shape[1])
            mask = (rows[None, None, :] <= (start + jnp.arange(T))[None, :, None]) & valid[:, None, :]
            h, (keys, values) = transformer(h, mask, positions, (cache["keys"], cache["values"], start),
                                            ban_mask, dense_off)
            cache = {"keys": keys, "values": values, "valid": valid, "length": start + T}
        h = RMSNorm(c.norm_eps, name="rms_norm")(h)
        if logits_at is not None:  # one position a row: the head runs on [B, 1, D], not [B, T, D]
            h = jnp.take_along_axis(h, logits_at[:, None, None], axis=1)
        head = embed if c.tied_embeddings else InOutEmbed(c, name="unembed")
        multiplier = as_activation_constant(c.output_multiplier_scale, c.multipliers_dtype)

        def finish(logits):
            logits = softcap((logits * multiplier).astype(jnp.float32), c.final_logit_softcap)
            return logits.astype(c.logits_dtype).astype(jnp.float32)  # Grok-1's release returns bfloat16 logits

        logits = head.decode(h, finish)
        if logits_at is not None:
            logits = logits[:, 0]
        return logits if cache is None else (logits, cache)


def forward_fn(config: ModelConfig, tokens: jax.Array, positions: jax.Array | None = None,
               compute_dtype: str = "float32", moe_dispatch: str = "sparse", interventions: tuple = (),
               cache: dict | None = None, ban_mask: jax.Array | None = None,
               dense_off: jax.Array | None = None, logits_at: jax.Array | None = None):
    """The haiku function to transform: tokens [B, T] int -> logits [B, T, V] float32.

    `transformer` is built outside `language_model`, so its parameters live at
    `transformer/...` as in the release.

    `compute_dtype` is the dtype of the residual stream and of the matmuls:
      - "float32" (default) reproduces what XLA computes for the release's code, which
        drops most of the bf16 round trips written in it; only the Python-float
        multipliers and the output logits are rounded to bfloat16.
      - "bfloat16" rounds every activation and dequantized weight to bfloat16, as the
        release's source reads op by op: half the activation memory, slightly further
        from the release's outputs.
    Routers, norms, attention logits and softmaxes run in float32 either way.

    `moe_dispatch` is how the experts are computed (`grokscope.model.moe`): "sparse" (each
    token through its k experts only; the default) or "dense" (the reference formulation);
    the outputs agree to rounding and the expert choices are identical.

    `interventions`: `grokscope.interventions.Intervention`s applied inside the forward.

    With a key/value `cache` (`grokscope.forward.init_cache`), `tokens` are the next tokens of
    the cached sequence; returns (logits, updated cache).

    `ban_mask` [num_layers, num_experts] bool bans experts at every position of a layer, as
    `ban` interventions do, but as traced data: one compiled program serves every such ban.
    
    `dense_off` [num_layers] bool zeroes the dense MLP at every position of a layer, as
    `zero_dense` interventions do, but as traced data (models with a dense MLP only).

    `logits_at` [B] int: the logits of one position a row only, [B, V] (the head runs on those
    rows alone: what a prompt filling a cache needs, without its [B, T, V] logits).
    """
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype: expected one of {COMPUTE_DTYPES}, got {compute_dtype!r}")
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    transformer = Transformer(config, moe_dispatch=moe_dispatch, interventions=tuple(interventions))
    return LanguageModel(config, compute_dtype)(tokens, positions, transformer, cache, ban_mask, dense_off,
                                                logits_at)
