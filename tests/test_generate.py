"""Generation with a key/value cache: the same model as the full forward, step by step."""

import numpy as np
import pytest

from grokscope import AttentionSpec, RecordSpec, forward


@pytest.fixture(scope="module")
def session(bundled_session):
    return bundled_session


def test_greedy_generation_equals_the_full_forward_at_every_step(session):
    gen = session.generate("def total(values):\n", max_new_tokens=12, stop_at_eos=False)
    ids = np.array([gen.token_ids])
    full = forward(session.params, session.config, ids)
    logits = np.asarray(full.logits[0], np.float32)
    P = gen.prompt_length
    assert len(gen.token_ids) == P + 12 and gen.logits.shape == (12, session.config.vocab_size)
    for i in range(12):
        assert gen.token_ids[P + i] == int(np.argmax(gen.logits[i])) == int(np.argmax(logits[P - 1 + i]))
        # the cached step's logits are the full forward's, to bf16 rounding of the logits
        scale = np.abs(logits[P - 1 + i]).max()
        assert np.abs(gen.logits[i] - logits[P - 1 + i]).max() <= 2 * 2.0**-8 * scale
    # routing recorded for every token, prompt and generated, as the full forward routes it
    ds = gen.dataset
    assert ds["generated"].values[0].tolist() == [False] * P + [True] * 12
    assert ds["length"].values[0] == P + 12
    stored = ds["expert_index"].values[0]
    np.testing.assert_array_equal(stored, np.asarray(full.record["expert_index"][0]))
    np.testing.assert_allclose(ds["router_logits"].values[0], np.asarray(full.record["router_logits"][0]),
                               atol=1e-3, rtol=1e-4)
    assert gen.text == session.tokenizer.decode(gen.token_ids[P:])


def test_generation_records_attention_topk_and_samples_reproducibly(session):
    spec = RecordSpec(attention=AttentionSpec(format="topk", k=4))
    a = session.generate("The river", max_new_tokens=6, temperature=0.8, top_p=0.9, seed=3, record=spec,
                         stop_at_eos=False)
    b = session.generate("The river", max_new_tokens=6, temperature=0.8, top_p=0.9, seed=3, record=spec,
                         stop_at_eos=False)
    assert a.token_ids == b.token_ids
    full = forward(session.params, session.config, np.array([a.token_ids]), record=spec)
    T = len(a.token_ids)
    got = a.dataset["attn_topk_index"].values[0]  # [layer, head, query, rank]
    want = np.asarray(full.record["attn_topk_index"][0])[:, :, :T]
    assert got.shape == want.shape
    assert (got == want).mean() > 0.99  # equal but where two keys' weights tie to rounding
    with pytest.raises(ValueError, match="exceed the model's sequence_len"):
        session.generate("x", max_new_tokens=10_000)


@pytest.mark.parametrize("mesh_shape", [None, (2, 4)])
def test_a_cache_fill_can_return_the_logits_of_one_position_a_row(session, mesh_shape):
    """`logits_at`: the decoder's head runs on one position a row ([B, V] logits), and those are
    the full forward's logits at that position; the cache it leaves is the same."""
    from grokscope import make_mesh
    from grokscope.runner import Model, decode, new_cache
    from grokscope.sharding import shard_params

    rng = np.random.default_rng(5)
    tokens = rng.integers(3, session.config.vocab_size, size=(2, 6)).astype(np.int32)
    full = np.asarray(forward(session.params, session.config, tokens).logits, np.float32)
    at = np.array([2, 5], np.int32)
    mesh = None if mesh_shape is None else make_mesh(*mesh_shape)
    model = Model(session.config, session.params if mesh is None else shard_params(session.params, mesh), mesh)
    every, _, cache_every = decode(model, tokens, 0, new_cache(model, 2, 16), RecordSpec())
    picked, _, cache_picked = decode(model, tokens, 0, new_cache(model, 2, 16), RecordSpec(), logits_at=at)
    assert np.asarray(every).shape == (2, 6, session.config.vocab_size)
    assert np.asarray(picked).shape == (2, session.config.vocab_size)
    want = full[[0, 1], at]
    scale = np.abs(want).max()
    assert np.abs(np.asarray(picked) - want).max() <= 2 * 2.0**-8 * scale
    # the same rows through a head of another shape: equal but where a float32 sum's order moves a
    # bfloat16-rounded logit by an ulp
    np.testing.assert_allclose(np.asarray(picked), np.asarray(every)[[0, 1], at], rtol=2 ** -7, atol=1e-4)
    assert np.mean(np.asarray(picked) == np.asarray(every)[[0, 1], at]) > 0.99
    for name in ("keys", "values", "valid", "length"):
        np.testing.assert_array_equal(np.asarray(cache_picked[name]), np.asarray(cache_every[name]), err_msg=name)
