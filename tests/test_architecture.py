"""The architecture fields of ModelConfig change exactly what they name (Grok-1's defaults none)."""

import dataclasses

import numpy as np
import pytest

from grokscope import RecordSpec, forward

F32 = {"logits_dtype": "float32"}  # unrounded logits, so that caps can be checked exactly


@pytest.fixture(scope="module")
def tokens(tiny_config):
    return np.random.default_rng(5).integers(3, tiny_config.vocab_size, (2, 24)).astype(np.int32)


def _run(params, config, tokens, **fields):
    return forward(params, dataclasses.replace(config, **fields), tokens, record=RecordSpec(routing=True))


def test_router_cap_is_applied_before_the_softmax(tiny_config, tiny_params, tokens):
    plain = _run(tiny_params, tiny_config, tokens, **F32)
    capped = _run(tiny_params, tiny_config, tokens, router_logit_softcap=0.5, **F32)
    raw = np.asarray(plain.record["router_logits"], np.float64)
    want = 0.5 * np.tanh(raw / 0.5)
    # layer 0 sees the same input either way: its recorded logits are the capped raw logits
    np.testing.assert_allclose(np.asarray(capped.record["router_logits"])[:, :, 0], want[:, :, 0], rtol=1e-5,
                               atol=1e-6)
    assert np.abs(np.asarray(capped.record["router_logits"])).max() <= 0.5
    probs = np.exp(want[:, :, 0]) / np.exp(want[:, :, 0]).sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(capped.record["expert_gate"])[:, :, 0],
                               -np.sort(-probs, axis=-1)[..., :2], rtol=1e-5)


def test_final_cap_bounds_the_logits(tiny_config, tiny_params, tokens):
    plain = np.asarray(_run(tiny_params, tiny_config, tokens, **F32).logits, np.float64)
    capped = np.asarray(_run(tiny_params, tiny_config, tokens, final_logit_softcap=2.0, **F32).logits)
    np.testing.assert_allclose(capped, 2.0 * np.tanh(plain / 2.0), rtol=1e-5, atol=1e-6)


def test_logits_dtype_rounds_through_bfloat16_by_default(tiny_config, tiny_params, tokens):
    import ml_dtypes

    rounded = np.asarray(_run(tiny_params, tiny_config, tokens).logits)
    full = np.asarray(_run(tiny_params, tiny_config, tokens, **F32).logits)
    np.testing.assert_array_equal(rounded, full.astype(ml_dtypes.bfloat16).astype(np.float32))
    assert not np.array_equal(rounded, full)


def test_attention_temperature_changes_only_queries_past_its_length(tiny_config, tiny_params, tokens):
    plain = np.asarray(_run(tiny_params, tiny_config, tokens, **F32).logits)
    tempered = np.asarray(_run(tiny_params, tiny_config, tokens, attn_temperature_len=8, **F32).logits)
    np.testing.assert_array_equal(tempered[:, :9], plain[:, :9])  # q <= 8: scale 1, causal
    assert (np.abs(tempered[:, 9:] - plain[:, 9:]).max(-1) > 0).all()


def test_rope_theta_and_gelu_and_eps_are_used(tiny_config, tiny_params, tokens):
    base = np.asarray(_run(tiny_params, tiny_config, tokens, **F32).logits)
    for fields in ({"rope_theta": 500.0}, {"gelu": "erf"}, {"norm_eps": 1.0}):
        other = np.asarray(_run(tiny_params, tiny_config, tokens, **F32, **fields).logits)
        assert not np.allclose(other, base, rtol=0, atol=1e-6), fields
    # position 0 is not rotated: the first token's logits ignore the RoPE base
    other = np.asarray(_run(tiny_params, tiny_config, tokens, rope_theta=500.0, **F32).logits)
    np.testing.assert_array_equal(other[:, 0], base[:, 0])
