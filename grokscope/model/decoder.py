"""One Grok decoder layer and the stack of them ("sandwich" norms around each block).

Grok-1: h += rms_norm_1(attn(rms_norm(h))); x = rms_norm_2(h); h += rms_norm_3(moe(x)).
Grok-2 (`config.dense_ffn_size`) runs a dense MLP beside the experts on the same x and adds
rms_norm_3((mlp(x) + moe(x)) / sqrt(2)).
"""

from __future__ import annotations

import math

import haiku as hk
import jax
import jax.numpy as jnp

from grokscope.config import ModelConfig
from grokscope.interventions import for_layer, zero_dense_output
from grokscope.model.attention import MultiHeadAttention
from grokscope.model.moe import DenseMLP, MoELayer, Router
from grokscope.model.norm import RMSNorm
from grokscope.record import probe
from grokscope.sharding import constrain


class DecoderLayer(hk.Module):
    """h += rms_norm_1(attn(rms_norm(h))); h += rms_norm_3(ffn(rms_norm_2(h))), where ffn is the
    MoE, or (dense MLP + MoE) / sqrt(2) when the config has a dense MLP."""

    def __init__(self, config: ModelConfig, name: str, moe_dispatch: str = "sparse", interventions: tuple = ()):
        super().__init__(name=name)
        self.config = config
        self.moe_dispatch = moe_dispatch
        self.interventions = interventions

    def __call__(self, h: jax.Array, mask: jax.Array, positions: jax.Array, cache=None, banned=None,
                 dense_off=None):
        """h [B, T, D] -> h; with a `cache` (see MultiHeadAttention), (h, (keys, values)).
        `banned`: [E] bool, experts banned at this layer (traced); `dense_off`: bool scalar, the dense
        MLP zeroed at this layer (traced)."""
        eps = self.config.norm_eps
        attn = MultiHeadAttention(self.config, self.interventions)(RMSNorm(eps, name="rms_norm")(h), mask, positions,
                                                                    cache)
        if cache is not None:
            attn, new_cache = attn
        h = h + RMSNorm(eps, name="rms_norm_1")(attn)
        x = RMSNorm(eps, name="rms_norm_2")(h)
        probe("moe_input", x)
        router_logits, probs = Router(self.config)(x)
        probe("router_logits", router_logits)
        ffn = MoELayer(self.config, self.moe_dispatch, self.interventions)(x, probs, positions, banned)
        if self.config.has_dense_mlp:
            mlp_out = DenseMLP(self.config)(x)  # [B, T, D] float32
            mlp_out = zero_dense_output(mlp_out, positions, self.interventions)
            if dense_off is not None:
                mlp_out = jnp.where(dense_off, jnp.zeros_like(mlp_out), mlp_out)
            probe("mlp_output", mlp_out)
            ffn = ((mlp_out + ffn.astype(jnp.float32)) / math.sqrt(2)).astype(x.dtype)
        h = h + RMSNorm(eps, name="rms_norm_3")(ffn)
        probe("residual", h)
        return (h, new_cache) if cache is not None else h


class Transformer(hk.Module):
    """The decoder stack `transformer/decoder_layer_{i}`."""

    def __init__(self, config: ModelConfig, name: str = "transformer", moe_dispatch: str = "sparse",
                 interventions: tuple = ()):
        super().__init__(name=name)
        self.config = config
        self.moe_dispatch = moe_dispatch
        self.interventions = interventions

    def __call__(self, h: jax.Array, mask: jax.Array, positions: jax.Array, cache=None, ban_mask=None,
                 dense_off=None):
        """h -> h; with `cache` = (keys [L, B, S, G, K], values, start), (h, (keys, values)).
        `ban_mask`: [L, E] bool, experts banned at each layer; `dense_off`: [L] bool, the dense MLP
        zeroed at each layer (both traced; None: none)."""
        keys, values = [], []
        for i in range(self.config.num_layers):
            h = constrain(h, "data", None, None)  # [B, T, D]: batch split, width replicated
            layer = DecoderLayer(self.config, name=f"decoder_layer_{i}", moe_dispatch=self.moe_dispatch,
                                 interventions=for_layer(self.interventions, i))
            banned = None if ban_mask is None else ban_mask[i]
            off = None if dense_off is None else dense_off[i]
            if cache is None:
                h = layer(h, mask, positions, banned=banned, dense_off=off)
            else:
                h, (k, v) = layer(h, mask, positions, (cache[0][i], cache[1][i], cache[2]), banned, off)
                keys.append(k)
                values.append(v)
        h = constrain(h, "data", None, None)
        return h if cache is None else (h, (jnp.stack(keys), jnp.stack(values)))
