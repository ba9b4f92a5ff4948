"""Model configuration: the Grok hyper-parameters, and the fields that tell Grok variants apart.

`ModelConfig` mirrors the fields of Grok-1's official `TransformerConfig` and
`LanguageModelConfig` that change what the network computes or how its parameters are
shaped, plus the architecture fields Grok-2 sets differently (soft-caps, attention
temperature, a dense MLP beside the experts, an untied head). `GROK_1` and `GROK_2` hold the
released models' values; the small presets exist so the same code runs on a laptop CPU.

`load_config` reads a preset name, grokscope's own JSON, Grok-1's official nested config, or
a Hugging Face `config.json` such as Grok-2's release has (`from_hf`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

__all__ = ["ModelConfig", "GROK_1", "GROK_2", "GROK_TINY", "GROK2_TINY", "TINY", "SMALL", "PRESETS", "ffn_size",
           "load_config", "ConfigError"]


def ffn_size(emb_size: int, widening_factor: float) -> int:
    """Hidden width of one expert: int(widening * emb) * 2 // 3, rounded up to a multiple of 8."""
    size = int(widening_factor * emb_size) * 2 // 3
    return size + (-size) % 8


class ConfigError(ValueError):
    """A config file that cannot be read as a model config; the message names the file and key."""


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
      gelu: "tanh" (the tanh approximation) or "erf" (exact) in the experts' and the dense
        MLP's GeGLU. Grok-2's ports disagree: sglang-jax and Grok-1's JAX code use tanh, SGLang's
        CUDA kernels compute exact erf although its module declares tanh; tanh is the default.
      logits_dtype: the dtype the output logits are rounded through ("bfloat16" in Grok-1's
        release; "float32": not rounded).
      multipliers_dtype: the dtype the embedding and output multipliers are rounded to before
        they multiply ("bfloat16": Grok-1's release multiplies bf16 arrays by Python floats,
        which rounds them, 78.38 -> 78.5; "float32": Grok-2's PyTorch reference does not).
      moe_ffn_size: hidden width of one expert when given (Grok-2: 16384); None: from
        `widening_factor` as Grok-1 computes it (`ffn_size`).
      dense_ffn_size: width of a dense gated MLP run beside the experts on the same normalized
        input, the FFN output then being (mlp + moe) / sqrt(2) (Grok-2's `residual_moe`,
        32768); None: no dense MLP (Grok-1).
      tied_embeddings: the output head is the input embedding (Grok-1); False: a separate
        `unembed` table [V, D] (Grok-2's `lm_head`).
      weight_format: how the release stores the matmul weights: "int8" (Grok-1's
        `QuantizedWeight8bit`) or "bfloat16" (Grok-2's safetensors).
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
    multipliers_dtype: str = "bfloat16"
    moe_ffn_size: int | None = None
    dense_ffn_size: int | None = None
    tied_embeddings: bool = True
    weight_format: str = "int8"

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
        for name in ("logits_dtype", "multipliers_dtype"):
            if getattr(self, name) not in ("bfloat16", "float32"):
                raise ValueError(f"ModelConfig.{name}: expected 'bfloat16' or 'float32', got {getattr(self, name)!r}")
        for name in ("moe_ffn_size", "dense_ffn_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"ModelConfig.{name}: expected None or a positive int, got {value!r}")
        if not isinstance(self.tied_embeddings, bool):
            raise ValueError(f"ModelConfig.tied_embeddings: expected true or false, got {self.tied_embeddings!r}")
        if self.weight_format not in ("int8", "bfloat16"):
            raise ValueError(f"ModelConfig.weight_format: expected 'int8' or 'bfloat16', got {self.weight_format!r}")
        for name in ("pad_token", "eos_token"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ValueError(
                    f"ModelConfig.{name}: expected an int in [0, vocab_size={self.vocab_size}), got {value!r}")

    @property
    def ffn_size(self) -> int:
        """Hidden width of one expert's feed-forward network."""
        if self.moe_ffn_size is not None:
            return self.moe_ffn_size
        return ffn_size(self.emb_size, self.widening_factor)

    @property
    def has_dense_mlp(self) -> bool:
        """Whether every layer runs a dense MLP beside the experts (Grok-2)."""
        return self.dense_ffn_size is not None

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

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], source: str = "config.json") -> "ModelConfig":
        """Builds a config from a Hugging Face `config.json` of the Grok-2 release's kind.

        Keys that change the computation map to fields (`HF_KEYS`); keys documented to have no
        effect in the reference implementation (the YaRN-looking RoPE fields under `rope_type:
        "original"`, `max_position_embeddings`-independent serving hints) are accepted and
        dropped (`HF_NO_OP_KEYS`); a value that would change the computation in a way this
        implementation does not have (a sliding window, `rope_type` other than "original", an
        architecture other than Grok's) and any unknown key raise `ConfigError` naming it.
        """
        hf = dict(hf)
        architectures = hf.get("architectures", ["Grok1ForCausalLM"])
        if architectures != ["Grok1ForCausalLM"]:
            raise ConfigError(f"{source}: architectures: expected ['Grok1ForCausalLM'] (Grok-1/Grok-2), "
                              f"got {architectures!r}")
        for key, allowed in _HF_REQUIRED_VALUES.items():
            if key in hf and hf[key] not in allowed:
                raise ConfigError(f"{source}: {key}: expected {' or '.join(map(repr, allowed))}, got {hf[key]!r} "
                                  f"(not implemented)")
        unknown = sorted(set(hf) - set(HF_KEYS) - HF_NO_OP_KEYS - set(_HF_REQUIRED_VALUES) - {"architectures"})
        if unknown:
            raise ConfigError(f"{source}: unknown keys {unknown}; expected Grok-2's config.json keys")
        missing = sorted(k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                     "num_key_value_heads", "vocab_size", "num_local_experts",
                                     "num_experts_per_tok", "moe_intermediate_size") if k not in hf)
        if missing:
            raise ConfigError(f"{source}: missing keys {missing}")
        fields = {HF_KEYS[k]: v for k, v in hf.items() if k in HF_KEYS and HF_KEYS[k] is not None}
        head_dim = hf.get("head_dim", hf["hidden_size"] // hf["num_attention_heads"])
        fields["key_size"] = head_dim
        fields["attn_output_multiplier"] = head_dim ** -0.5
        # widening_factor is Grok-1's way to give the expert width; here the width is explicit.
        fields["widening_factor"] = hf["moe_intermediate_size"] * 1.5 / hf["hidden_size"]
        fields["moe_ffn_size"] = hf["moe_intermediate_size"]
        if hf.get("residual_moe", False):
            if "intermediate_size" not in hf:
                raise ConfigError(f"{source}: residual_moe is true but intermediate_size (the dense MLP's "
                                  f"width) is missing")
            fields["dense_ffn_size"] = hf["intermediate_size"]
        fields["tied_embeddings"] = bool(hf.get("tie_word_embeddings", False))
        fields.setdefault("attn_logit_softcap", None)
        fields.setdefault("router_logit_softcap", None)
        fields.setdefault("final_logit_softcap", None)
        temperature = hf.get("attn_temperature_len")
        fields["attn_temperature_len"] = temperature if temperature is not None and temperature > 0 else None
        for name in ("attn_logit_softcap", "router_logit_softcap", "final_logit_softcap"):
            if fields[name] is not None:
                fields[name] = float(fields[name])
        if "rope_theta" in fields:
            fields["rope_theta"] = float(fields["rope_theta"])
        fields.update(logits_dtype="float32", multipliers_dtype="float32", weight_format="bfloat16")
        fields.setdefault("output_multiplier_scale", 1.0)
        fields.setdefault("embedding_multiplier_scale", 1.0)
        try:
            return cls(**fields)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_hf(self) -> dict[str, Any]:
        """This config as a Hugging Face `config.json` of Grok-2's kind (`from_hf` reads it back).

        Raises ValueError for what that format cannot say (Grok-1's int8 release, bf16-rounded
        multipliers or logits, an attention multiplier other than head_dim ** -0.5).
        """
        problems = [name for name, ok in (
            ("weight_format", self.weight_format == "bfloat16"),
            ("multipliers_dtype", self.multipliers_dtype == "float32"),
            ("logits_dtype", self.logits_dtype == "float32"),
            ("gelu", self.gelu == "tanh"),
            ("attn_output_multiplier", math.isclose(self.attn_output_multiplier, self.key_size ** -0.5)),
        ) if not ok]
        if problems:
            raise ValueError(f"ModelConfig.to_hf: {', '.join(problems)} cannot be written as a Hugging Face config")
        hf = {"architectures": ["Grok1ForCausalLM"]}
        for key, field in HF_KEYS.items():
            if field is not None:
                hf[key] = getattr(self, field)
        hf.update(head_dim=self.key_size, moe_intermediate_size=self.ffn_size,
                  residual_moe=self.dense_ffn_size is not None, tie_word_embeddings=self.tied_embeddings,
                  attn_temperature_len=self.attn_temperature_len or -1, rope_type="original",
                  torch_dtype="bfloat16")
        if self.dense_ffn_size is not None:
            hf["intermediate_size"] = self.dense_ffn_size
        return {k: v for k, v in hf.items() if v is not None}


HF_KEYS: dict[str, str | None] = {
    "hidden_size": "emb_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_q_heads",
    "num_key_value_heads": "num_kv_heads",
    "head_dim": None,  # key_size, and attn_output_multiplier = head_dim ** -0.5
    "vocab_size": "vocab_size",
    "num_local_experts": "num_experts",
    "num_experts_per_tok": "num_selected_experts",
    "moe_intermediate_size": None,  # moe_ffn_size
    "intermediate_size": None,  # dense_ffn_size, when residual_moe
    "residual_moe": None,
    "embedding_multiplier_scale": "embedding_multiplier_scale",
    "output_multiplier_scale": "output_multiplier_scale",
    "rms_norm_eps": "norm_eps",
    "attn_logit_softcapping": "attn_logit_softcap",
    "router_logit_softcapping": "router_logit_softcap",
    "final_logit_softcapping": "final_logit_softcap",
    "attn_temperature_len": None,
    "rope_theta": "rope_theta",
    "max_position_embeddings": "sequence_len",
    "pad_token_id": "pad_token",
    "eos_token_id": "eos_token",
    "tie_word_embeddings": None,
}
"""Hugging Face config keys that set a `ModelConfig` field (None: derived in `from_hf`)."""

HF_NO_OP_KEYS = frozenset({
    # RoPE: with rope_type "original", SGLang builds plain RoPE; its YaRN mscale is commented
    # out, so these have no effect (fixtures/grok2-tiny/README.md cites the lines).
    "original_max_position_embeddings", "scaling_factor", "extrapolation_factor", "attn_factor",
    "beta_fast", "beta_slow",
    # Bookkeeping that does not change what is computed.
    "model_type", "torch_dtype", "transformers_version", "use_cache", "bos_token_id", "initializer_range",
    "_name_or_path",
})
"""Hugging Face config keys accepted and ignored: documented to have no effect on the output."""

_HF_REQUIRED_VALUES: dict[str, tuple] = {
    "rope_type": ("original",),
    "sliding_window_size": (-1, None),
    "global_attn_every_n": (1,),
    "hidden_act": ("gelu", "gelu_pytorch_tanh", "gelu_new"),
}


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

GROK_2 = ModelConfig(
    emb_size=8192,
    key_size=128,
    num_q_heads=64,
    num_kv_heads=8,
    num_layers=64,
    vocab_size=131072,
    widening_factor=3,
    attn_output_multiplier=128 ** -0.5,
    num_experts=8,
    num_selected_experts=2,
    embedding_multiplier_scale=90.50966799187809,
    output_multiplier_scale=0.5,
    pad_token=0,
    eos_token=2,
    sequence_len=131072,
    attn_logit_softcap=30.0,
    attn_temperature_len=1024,
    router_logit_softcap=30.0,
    final_logit_softcap=50.0,
    rope_theta=208533496.0,
    norm_eps=1e-5,
    gelu="tanh",
    logits_dtype="float32",
    multipliers_dtype="float32",
    moe_ffn_size=16384,
    dense_ffn_size=32768,
    tied_embeddings=False,
    weight_format="bfloat16",
)
"""The released Grok-2 (xai-org/grok-2, "Grok 2.5"; 270B parameters), as its config.json reads."""

GROK2_TINY = dataclasses.replace(
    GROK_2, emb_size=128, key_size=32, num_q_heads=4, num_kv_heads=2, num_layers=4, vocab_size=4096,
    widening_factor=1.5, attn_output_multiplier=32 ** -0.5, embedding_multiplier_scale=math.sqrt(128),
    sequence_len=256, attn_temperature_len=64, moe_ffn_size=128, dense_ffn_size=256,
)
"""grok2-tiny: Grok-2's architecture at d=128, 4 layers, 8 experts (top-2) of width 128 beside a
dense MLP of width 256, 4 q / 2 kv heads, attention temperature from position 64."""

PRESETS: dict[str, ModelConfig] = {"grok-1": GROK_1, "grok-2": GROK_2, "grok-tiny": GROK_TINY,
                                   "grok2-tiny": GROK2_TINY, "tiny": TINY, "small": SMALL}


def load_config(spec: str) -> ModelConfig:
    """A preset name (`grok-1`, `grok-2`, `grok-tiny`, `grok2-tiny`, `tiny`, `small`) or a JSON file.

    The JSON may be a flat dict of `ModelConfig` fields, the official nested
    `LanguageModelConfig` dict (with `model`), a file holding one under
    `language_model_config` (as the reference fixture's `config.json` does), or a Hugging
    Face config (with `hidden_size`, as Grok-2's release has: `ModelConfig.from_hf`).
    """
    import json
    from pathlib import Path

    if spec in PRESETS:
        return PRESETS[spec]
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"config {spec!r}: not a preset ({', '.join(PRESETS)}) and not a JSON file")
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not a readable JSON config ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(d).__name__}")
    if "hidden_size" in d or "architectures" in d:
        return ModelConfig.from_hf(d, str(path))
    if "language_model_config" in d:
        return ModelConfig.from_official(d["language_model_config"])
    if "model" in d:
        return ModelConfig.from_official(d)
    return ModelConfig.from_dict(d)
