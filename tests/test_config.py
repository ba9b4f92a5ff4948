import dataclasses
import json

import pytest

from grokscope import GROK_1, ModelConfig
from grokscope.config import ffn_size, load_config


def test_grok1_preset_holds_the_release_values():
    assert dataclasses.asdict(GROK_1) == {
        "emb_size": 6144, "key_size": 128, "num_q_heads": 48, "num_kv_heads": 8, "num_layers": 64,
        "vocab_size": 131072, "widening_factor": 8, "attn_output_multiplier": 0.08838834764831845,
        "num_experts": 8, "num_selected_experts": 2, "embedding_multiplier_scale": 78.38367176906169,
        "output_multiplier_scale": 0.5773502691896257, "pad_token": 0, "eos_token": 2, "sequence_len": 8192,
        # the architecture as the release's code has it: a 30 tanh cap on attention logits, no
        # router or final cap, RoPE base 10000, eps 1e-5, tanh GELU, bfloat16 logits and
        # multipliers, experts only (no dense MLP), tied embeddings, int8 weights
        "attn_logit_softcap": 30.0, "attn_temperature_len": None, "router_logit_softcap": None,
        "final_logit_softcap": None, "rope_theta": 10000.0, "norm_eps": 1e-5, "gelu": "tanh",
        "logits_dtype": "bfloat16", "multipliers_dtype": "bfloat16", "moe_ffn_size": None,
        "dense_ffn_size": None, "tied_embeddings": True, "weight_format": "int8",
    }
    assert GROK_1.ffn_size == 32768


def test_ffn_size_rounds_up_to_a_multiple_of_8():
    assert ffn_size(64, 8) == 344  # 512 * 2 // 3 = 341 -> 344
    assert ffn_size(48, 8) == 256
    assert ffn_size(6144, 8) == 32768


def test_from_dict_round_trips_and_names_extra_keys():
    assert ModelConfig.from_dict(GROK_1.to_dict()) == GROK_1
    with pytest.raises(ValueError, match=r"unknown keys \['capacity_factor', 'foo'\]"):
        ModelConfig.from_dict({**GROK_1.to_dict(), "foo": 1, "capacity_factor": 1.0})
    d = GROK_1.to_dict()
    del d["emb_size"]
    with pytest.raises(ValueError, match=r"missing keys \['emb_size'\]"):
        ModelConfig.from_dict(d)


def test_validation_names_field_expected_and_got():
    with pytest.raises(ValueError, match=r"num_q_heads: expected a multiple of num_kv_heads=8, got 12"):
        dataclasses.replace(GROK_1, num_q_heads=12)
    with pytest.raises(ValueError, match=r"pad_token: expected an int in \[0, vocab_size=131072\), got -1"):
        dataclasses.replace(GROK_1, pad_token=-1)


def test_fixture_config_from_its_flat_keys(fixture_dir):
    official = json.loads((fixture_dir / "config.json").read_text())["language_model_config"]
    # The flat dict: the transformer's fields from `model` (less its unused vocab_size)
    # plus the language model's own fields.
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    flat = {k: v for k, v in official["model"].items() if k in names and k != "vocab_size"}
    flat.update({k: v for k, v in official.items() if k in names})
    config = ModelConfig.from_dict(flat)
    assert config.vocab_size == 512 and config.emb_size == 64 and config.ffn_size == 344
    assert config.attn_output_multiplier == 0.25 and config.embedding_multiplier_scale == 8.0
    assert ModelConfig.from_official(official) == config
    assert load_config(str(fixture_dir / "config.json")) == config


def test_from_official_rejects_unknown_fields():
    official = {"model": {k: v for k, v in GROK_1.to_dict().items() if k != "vocab_size"},
                "vocab_size": 131072, "mystery": 3}
    with pytest.raises(ValueError, match="mystery"):
        ModelConfig.from_official(official)


@pytest.mark.parametrize("field, value, message", [
    ("attn_logit_softcap", 0.0, "expected None or a positive number, got 0.0"),
    ("final_logit_softcap", float("inf"), "expected None or a positive number, got inf"),
    ("rope_theta", -1.0, "expected a positive number, got -1.0"),
    ("attn_temperature_len", 1, "expected None or an int >= 2, got 1"),
    ("gelu", "relu", "expected 'tanh' or 'erf', got 'relu'"),
    ("logits_dtype", "float16", "expected 'bfloat16' or 'float32', got 'float16'"),
])
def test_architecture_fields_are_validated_by_name(field, value, message):
    with pytest.raises(ValueError, match=rf"ModelConfig.{field}: {message}"):
        dataclasses.replace(GROK_1, **{field: value})
