import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grokscope import RecordSpec, forward, make_forward
from grokscope.model.attention import MultiHeadAttention
from grokscope.model.lm import as_activation_constant
from grokscope.model.moe import route
from grokscope.model.norm import RMSNorm
from grokscope.model.rope import apply_rope


def test_rms_norm_of_a_constant_is_the_scale():
    f = hk.transform(lambda x: RMSNorm()(x))
    x = jnp.full((2, 3, 16), 5.0)
    params = f.init(None, x)
    np.testing.assert_allclose(f.apply(params, None, x), np.full((2, 3, 16), 5 / np.sqrt(25 + 1e-5)), rtol=1e-6)


def test_rope_is_identity_at_position_zero_and_preserves_norms():
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 5, 2, 8))
    pos = jnp.arange(5)[None]
    y = apply_rope(x, pos)
    np.testing.assert_allclose(y[:, 0], x[:, 0], rtol=1e-6)
    np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
    # rotate-half layout: pair (i, i + K/2) at position 1 rotated by base^(-2i/K)
    theta = 1.0 / 10000 ** (np.arange(0, 8, 2) / 8)
    a, b = x[0, 1, 0, :4], x[0, 1, 0, 4:]
    np.testing.assert_allclose(y[0, 1, 0, :4], a * np.cos(theta) - b * np.sin(theta), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y[0, 1, 0, 4:], b * np.cos(theta) + a * np.sin(theta), rtol=1e-5, atol=1e-6)


def test_top_k_keeps_raw_probabilities_and_breaks_ties_to_the_lower_index():
    probs = jnp.array([[0.1, 0.3, 0.3, 0.05, 0.25, 0.0, 0.0, 0.0]])
    gates, index = route(probs, 2)
    np.testing.assert_array_equal(index, [[1, 2]])
    np.testing.assert_allclose(gates, [[0.3, 0.3]])  # not renormalized to 0.5 each


def test_multipliers_become_bfloat16_constants():
    assert as_activation_constant(78.38367176906169) == 78.5
    assert as_activation_constant(0.5773502691896257) == 0.578125
    assert as_activation_constant(8.0) == 8.0


def test_query_with_every_key_masked_attends_uniformly(tiny_config):
    def f(x, mask, pos):
        attn = MultiHeadAttention(tiny_config)
        return attn(x, mask, pos)

    t = hk.transform_with_state(f)
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 4, tiny_config.emb_size))
    pos = jnp.arange(4)[None]
    mask = jnp.tril(jnp.ones((4, 4), bool))[None].at[:, 0, :].set(False)
    params, _ = t.init(jax.random.PRNGKey(1), x, mask, pos)
    out_masked, state = t.apply(params, {}, None, x, mask, pos)
    np.testing.assert_allclose(state["multi_head_attention"]["attn_weights"][0, :, 0], 0.25)
    # row 0 sees all keys, including future ones, with equal weight: the same as
    # attending to every key with logits all equal, i.e. the mean of the values.
    v = x @ params["multi_head_attention/value"]["w"]  # [1, 4, G*K]
    G, K, H = tiny_config.num_kv_heads, tiny_config.key_size, tiny_config.num_q_heads
    mean_v = v.mean(axis=1).reshape(G, K)
    per_head = jnp.repeat(mean_v, H // G, axis=0).reshape(H * K)
    expected = per_head @ params["multi_head_attention/linear"]["w"]
    np.testing.assert_allclose(out_masked[0, 0], expected, rtol=1e-4, atol=1e-5)


def test_recording_does_not_change_the_logits(tiny_config, tiny_params):
    tokens = np.random.default_rng(0).integers(1, tiny_config.vocab_size, (2, 12)).astype(np.int32)
    with_record = forward(tiny_params, tiny_config, tokens, record=RecordSpec(routing=True))
    without = forward(tiny_params, tiny_config, tokens, record=RecordSpec(routing=False))
    assert without.record == {}
    np.testing.assert_array_equal(np.asarray(with_record.logits), np.asarray(without.logits))


def test_record_names_shapes_and_dtypes(tiny_config, tiny_params):
    tokens = np.ones((3, 5), np.int32)
    out = forward(tiny_params, tiny_config, tokens)
    L, E, k = tiny_config.num_layers, tiny_config.num_experts, tiny_config.num_selected_experts
    assert sorted(out.record) == ["expert_gate", "expert_index", "router_logits"]
    assert out.logits.shape == (3, 5, tiny_config.vocab_size) and out.logits.dtype == jnp.float32
    assert out.record["router_logits"].shape == (3, 5, L, E) and out.record["router_logits"].dtype == jnp.float32
    assert out.record["expert_index"].shape == (3, 5, L, k) and out.record["expert_index"].dtype == jnp.int32
    assert out.record["expert_gate"].shape == (3, 5, L, k) and out.record["expert_gate"].dtype == jnp.float32
    # Independently, in float64 numpy: softmax over all experts, then a stable descending sort
    # (ties to the lower index); gates are the raw probabilities of the first k.
    logits = np.asarray(out.record["router_logits"], np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    order = np.argsort(-probs, axis=-1, kind="stable")[..., :k]
    np.testing.assert_array_equal(out.record["expert_index"], order)
    np.testing.assert_allclose(out.record["expert_gate"], np.take_along_axis(probs, order, -1), rtol=1e-5)


def test_unselected_probes_are_not_computed(tiny_config, tiny_params):
    fn = make_forward(tiny_config, RecordSpec(routing=False))
    tokens = jnp.ones((1, 4), jnp.int32)
    positions = jnp.arange(4)[None]
    out_shapes = jax.eval_shape(fn, tiny_params, tokens, positions)
    assert out_shapes[1] == {}


def test_any_batch_size_matches_row_by_row(tiny_config, tiny_params):
    tokens = np.random.default_rng(1).integers(0, tiny_config.vocab_size, (3, 10)).astype(np.int32)
    tokens[1, 7:] = 0  # right padding
    batch = forward(tiny_params, tiny_config, tokens)
    for i in range(3):
        row = forward(tiny_params, tiny_config, tokens[i : i + 1])
        np.testing.assert_allclose(np.asarray(batch.logits[i]), np.asarray(row.logits[0]), atol=1e-5)
        np.testing.assert_array_equal(np.asarray(batch.record["expert_index"][i]),
                                      np.asarray(row.record["expert_index"][0]))


def test_pads_are_not_attended_to(tiny_config, tiny_params):
    tokens = np.array([[5, 6, 7, 0, 0, 0]], np.int32)
    other = np.array([[5, 6, 7, 0, 0, 0, 0, 0]], np.int32)
    a = forward(tiny_params, tiny_config, tokens)
    b = forward(tiny_params, tiny_config, other)
    np.testing.assert_allclose(np.asarray(a.logits[0, :3]), np.asarray(b.logits[0, :3]), atol=1e-5)


def test_bad_tokens_are_refused(tiny_config, tiny_params):
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 512\), got \[0, 512\]"):
        forward(tiny_params, tiny_config, np.array([[0, 512]]))
    with pytest.raises(ValueError, match=r"tokens must be an int array \[batch, seq\]"):
        forward(tiny_params, tiny_config, np.array([1, 2, 3]))


def test_unrecorded_expert_outputs_are_compiled_away(tiny_config, tiny_params):
    """What every expert would output (E experts on every token) is computed only when
    recorded: the compiled program's FLOPs say so."""
    tokens = jnp.ones((2, 32), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(32), tokens.shape)

    def flops(spec):
        compiled = jax.jit(make_forward(tiny_config, spec)).lower(tiny_params, tokens, positions).compile()
        cost = compiled.cost_analysis()
        return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])

    plain, routing_only = flops(RecordSpec(routing=False)), flops(RecordSpec())
    every_expert = flops(RecordSpec(expert_outputs=(0,)))
    # the E = 8 experts' GeGLU on 64 tokens at one layer: 3 matmuls of 2 * 64 * D * F FLOPs each
    extra = 8 * 3 * 2 * 64 * tiny_config.emb_size * tiny_config.ffn_size
    assert every_expert - plain >= 0.9 * extra
    assert abs(routing_only - plain) < 0.01 * extra


def test_moe_input_is_what_the_router_and_the_experts_read(tiny_config, tiny_params):
    """Recomputed in numpy from the recorded `moe_input`: the router logits and one expert's output."""
    tokens = np.random.default_rng(2).integers(3, tiny_config.vocab_size, (2, 12)).astype(np.int32)
    out = forward(tiny_params, tiny_config, tokens, record=RecordSpec(expert_outputs=(1,)))
    x = np.asarray(out.record["moe_input"], np.float64)[:, :, 0]  # [B, T, D]
    every = np.asarray(out.record["expert_output"], np.float64)[:, :, 0]  # [B, T, E, D]
    layer = tiny_params["transformer/decoder_layer_1/router"]["w"]
    np.testing.assert_allclose(x @ np.asarray(layer, np.float64), np.asarray(out.record["router_logits"])[:, :, 1],
                               rtol=1e-4, atol=1e-4)

    def dense(name, e):
        q = tiny_params[f"transformer/decoder_layer_1/moe/{name}"]["w"]
        w, s = np.asarray(q.weight[e], np.float64), np.asarray(q.scales[e], np.float64)  # [in, out], [nb, out]
        nb = s.shape[0]
        return (w.reshape(nb, -1, w.shape[-1]) * s[:, None, :]).reshape(w.shape)

    def gelu(v):
        return 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v ** 3)))

    e = 3
    want = (gelu(x @ dense("linear", e)) * (x @ dense("linear_v", e))) @ dense("linear_1", e)
    np.testing.assert_allclose(every[:, :, e], want, rtol=1e-3, atol=1e-4 * np.abs(want).max())
