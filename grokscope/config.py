"""Model configuration: the Grok-1 hyper-parameters under their official names.

`ModelConfig` mirrors the fields of the official release's `TransformerConfig`
and `LanguageModelConfig` that change what the network computes or how its
parameters are shaped. `GROK_1` holds the released model's values; the small
presets exist so the same code runs on a laptop CPU.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

__all__ = ["ModelConfig", "GROK_1", "GROK_TINY", "TINY", "SMALL", "PRESETS", "ffn_size", "load_config"]


def ffn_size(emb_size: int, widening_factor: float) -> int:
    """Hidden width of one expert: int(widening * emb) * 2 // 3, rounded up to a multiple of 8."""
    size = int(widening_factor * emb_size) * 2 // 3
    return size + (-size) % 8


# Fields of the official LanguageModelConfig / TransformerConfig that do not affect the
# forward pass or the parameter shapes. `from_official` accepts and drops them.
_OFFICIAL_UNUSED = frozenset({
    "name", "capacity_factor", "init_scale", "shard_activations", "data_axis", "model_axis",
    "model_size", "embedding_init_scale", "fprop_dtype", "model_type", "init_scale_override",
    "shard_embeddings",
})


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Hyper-parameters of a Grok-1-architecture model.

    Attributes:
      emb_size: width of the residual stream (d_model).
      key_size: width of one attention head.
      num_q_heads: number of query heads.
      num_kv_heads: number of key/value heads (grouped-query attention).
      num_layers: number of decoder layers.
      vocab_size: number of token ids (rows of the tied embedding).
      widening_factor: expert hidden width = `ffn_size(emb_size, widening_factor)`.
      attn_output_multiplier: scale applied to the fp32 attention logits.
      num_experts: experts per MoE layer.
      num_selected_experts: experts each token is routed to (top-k).
      embedding_multiplier_scale: multiplier on the input embeddings.
      output_multiplier_scale: multiplier on the output logits.
      pad_token: token id treated as padding (masked as an attention key).
      eos_token: end-of-sequence token id.
      sequence_len: the longest context the model was configured for.

    Architecture (how Grok variants differ; the defaults are Grok-1's):
      attn_logit_softcap: attention logits become cap * tanh(logits / cap) (None: no cap).
      attn_temperature_len: L > 0 multiplies the capped logits of a query at 0-based position
        q > L by log2(q) / log2(L) (None: never).
      router_logit_softcap: the same cap on the router logits, before the softmax (None: none).
      final_logit_softcap: the same cap on the output logits (None: none).
      rope_theta: the rotary base.
      norm_eps: the RMSNorms' epsilon.
      gelu: "tanh" (the tanh approximation) or "erf" (exact) in the experts' GeGLU.
      logits_dtype: the dtype the output logits are rounded through ("bfloat16" in Grok-1's
        release; "float32": not rounded).
    """

    emb_size: int
    key_size: int
    num_q_heads: int
    num_kv_heads: int
    num_layers: int
    vocab_size: int
    widening_factor: float
    attn_output_multiplier: float
    num_experts: int
    num_selected_experts: int
    embedding_multiplier_scale: float
    output_multiplier_scale: float
    pad_token: int = 0
    eos_token: int = 2
    sequence_len: int = 8192
    attn_logit_softcap: float | None = 30.0
    attn_temperature_len: int | None = None
    router_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    gelu: str = "tanh"
    logits_dtype: str = "bfloat16"

    def __post_init__(self):
        positive = ("emb_size", "key_size", "num_q_heads", "num_kv_heads", "num_layers",
                    "vocab_size", "num_experts", "num_selected_experts", "sequence_len")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name}: expected a positive int, got {value!r}")
        for name in ("widening_factor", "attn_output_multiplier", "embedding_multiplier_scale",
                     "output_multiplier_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"ModelConfig.{name}: expected a finite number, got {value!r}")
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_q_heads: expected a multiple of num_kv_heads={self.num_kv_heads}, "
                f"got {self.num_q_heads}")
        if self.num_selected_experts > self.num_experts:
            raise ValueError(
                f"ModelConfig.num_selected_experts: expected at most num_experts={self.num_experts}, "
                f"got {self.num_selected_experts}")
        for name in ("attn_logit_softcap", "router_logit_softcap", "final_logit_softcap"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value <= 0):
                raise ValueError(f"ModelConfig.{name}: expected None or a positive number, got {value!r}")
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                raise ValueError(f"ModelConfig.{name}: expected a positive number, got {value!r}")
        value = self.attn_temperature_len
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 2):
            raise ValueError(f"ModelConfig.attn_temperature_len: expected None or an int >= 2, got {value!r}")
        if self.gelu not in ("tanh", "erf"):
            raise ValueError(f"ModelConfig.gelu: expected 'tanh' or 'erf', got {self.gelu!r}")
        if self.logits_dtype not in ("bfloat16", "float32"):
            raise ValueError(f"ModelConfig.logits_dtype: expected 'bfloat16' or 'float32', got {self.logits_dtype!r}")
        for name in ("pad_token", "eos_token"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ValueError(
                    f"ModelConfig.{name}: expected an int in [0, vocab_size={self.vocab_size}), got {value!r}")

    @property
    def ffn_size(self) -> int:
        """Hidden width of one expert's feed-forward network."""
        return ffn_size(self.emb_size, self.widening_factor)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        """Builds a config from a flat dict with the official field names.

        Raises:
          ValueError: naming any key that is not a field, or any missing required field.
        """
        names = [f.name for f in dataclasses.fields(cls)]
        extra = sorted(set(d) - set(names))
        if extra:
            raise ValueError(f"ModelConfig.from_dict: unknown keys {extra}; expected a subset of {names}")
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.name not in d]
        if required:
            raise ValueError(f"ModelConfig.from_dict: missing keys {required}")
        return cls(**d)

    @classmethod
    def from_official(cls, language_model_config: Mapping[str, Any]) -> "ModelConfig":
        """Builds a config from the official nested `LanguageModelConfig` dict.

        The official dict holds the transformer's fields under `model`, and the
        language model's (`vocab_size`, multipliers, tokens) at the top level;
        `model.vocab_size` there is an unused default and is ignored. Fields that do not
        affect the forward pass (sharding flags, init scales, names) are dropped; any other
        unknown key is an error.
        """
        top = dict(language_model_config)
        model = dict(top.pop("model", {}) or {})
        model.pop("vocab_size", None)
        flat = {**{k: v for k, v in model.items() if k not in _OFFICIAL_UNUSED},
                **{k: v for k, v in top.items() if k not in _OFFICIAL_UNUSED}}
        return cls.from_dict(flat)


GROK_1 = ModelConfig(
    emb_size=6144,
    key_size=128,
    num_q_heads=48,
    num_kv_heads=8,
    num_layers=64,
    vocab_size=131072,
    widening_factor=8,
    attn_output_multiplier=0.08838834764831845,
    num_experts=8,
    num_selected_experts=2,
    embedding_multiplier_scale=78.38367176906169,
    output_multiplier_scale=0.5773502691896257,
    pad_token=0,
    eos_token=2,
    sequence_len=8192,
)
"""The released Grok-1 (314B parameters)."""

TINY = ModelConfig(
    emb_size=64, key_size=16, num_q_heads=4, num_kv_heads=2, num_layers=2, vocab_size=512,
    widening_factor=8, attn_output_multiplier=0.25, num_experts=8, num_selected_experts=2,
    embedding_multiplier_scale=8.0, output_multiplier_scale=0.5773502691896257,
    pad_token=0, eos_token=2, sequence_len=256,
)
"""Two layers, d=64: the shape of the official reference fixture; runs in milliseconds."""

SMALL = ModelConfig(
    emb_size=256, key_size=32, num_q_heads=8, num_kv_heads=2, num_layers=4, vocab_size=4096,
    widening_factor=2, attn_output_multiplier=1 / math.sqrt(32), num_experts=8,
    num_selected_experts=2, embedding_multiplier_scale=16.0,
    output_multiplier_scale=0.5773502691896257, pad_token=0, eos_token=2, sequence_len=1024,
)
"""Four layers, d=256: large enough for sharding and dumps to be meaningful on a CPU."""

GROK_TINY = ModelConfig(
    emb_size=128, key_size=32, num_q_heads=4, num_kv_heads=2, num_layers=4, vocab_size=4096,
    widening_factor=4, attn_output_multiplier=1 / math.sqrt(32), num_experts=8,
    num_selected_experts=2, embedding_multiplier_scale=math.sqrt(128),
    output_multiplier_scale=0.5773502691896257, pad_token=0, eos_token=2, sequence_len=256,
)
"""grok-tiny: Grok-1's architecture at d=128, 4 layers, 8 experts (top-2), 4 q / 2 kv heads.

The multipliers follow Grok-1's pattern: attention 1/sqrt(key_size), input sqrt(emb_size),
output 1/sqrt(3).
"""

PRESETS: dict[str, ModelConfig] = {"grok-1": GROK_1, "grok-tiny": GROK_TINY, "tiny": TINY, "small": SMALL}


def load_config(spec: str) -> ModelConfig:
    """A preset name (`grok-1`, `grok-tiny`, `tiny`, `small`) or a JSON file.

    The JSON may be a flat dict of `ModelConfig` fields, the official nested
    `LanguageModelConfig` dict (with `model`), or a file holding one under
    `language_model_config` (as the reference fixture's `config.json` does).
    """
    import json
    from pathlib import Path

    if spec in PRESETS:
        return PRESETS[spec]
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"config {spec!r}: not a preset ({', '.join(PRESETS)}) and not a JSON file")
    d = json.loads(path.read_text())
    if "language_model_config" in d:
        return ModelConfig.from_official(d["language_model_config"])
    if "model" in d:
        return ModelConfig.from_official(d)
    return ModelConfig.from_dict(d)
