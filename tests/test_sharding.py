import jax
import numpy as np
import pytest

from grokscope import GROK_1, SMALL, forward, init_params, make_mesh, param_shapes
from grokscope.sharding import _fit, partition_spec


def test_eight_simulated_devices_are_available():
    assert jax.device_count() == 8


@pytest.fixture(scope="module")
def small_params():
    return init_params(SMALL, seed=3)


@pytest.mark.parametrize("data,model", [(1, 8), (2, 4), (8, 1)])
def test_sharded_forward_matches_one_device(small_params, data, model):
    tokens = np.random.default_rng(0).integers(1, SMALL.vocab_size, (4, 24)).astype(np.int32)
    tokens[2, 15:] = 0
    single = forward(small_params, SMALL, tokens)
    mesh = make_mesh(data=data, model=model)
    sharded = forward(small_params, SMALL, tokens, mesh=mesh)
    assert sharded.logits.sharding.mesh.shape == {"data": data, "model": model}
    np.testing.assert_array_equal(np.asarray(sharded.record["expert_index"]), np.asarray(single.record["expert_index"]))
    np.testing.assert_allclose(np.asarray(sharded.record["router_logits"]), np.asarray(single.record["router_logits"]),
                               atol=1e-4)
    # logits are bfloat16 values: a different summation order may move one by one ulp (2^-7 relative)
    a, b = np.asarray(sharded.logits), np.asarray(single.logits)
    np.testing.assert_allclose(a, b, rtol=2**-7, atol=2**-7)
    assert np.mean(a != b) < 1e-3


def test_batch_that_does_not_divide_the_data_axis(small_params):
    tokens = np.random.default_rng(1).integers(1, SMALL.vocab_size, (3, 8)).astype(np.int32)
    mesh = make_mesh(data=2, model=4)
    np.testing.assert_allclose(np.asarray(forward(small_params, SMALL, tokens, mesh=mesh).logits),
                               np.asarray(forward(small_params, SMALL, tokens).logits), rtol=2**-7, atol=2**-7)


def test_release_partition_rules_on_the_grok1_tree():
    mesh = make_mesh(data=1, model=8)
    specs = {path: tuple(_fit(partition_spec(path, s.shape), s.shape, mesh))
             for path, s in param_shapes(GROK_1).items()}
    layer = "transformer/decoder_layer_7"
    assert specs[f"{layer}/multi_head_attention/query/w"] == ("data", "model")
    assert specs[f"{layer}/multi_head_attention/linear/w"] == ("model", "data")
    assert specs[f"{layer}/moe/linear/w"] == (None, "data", "model")
    assert specs[f"{layer}/moe/linear_1/w"] == (None, "model", "data")
    assert specs[f"{layer}/router/w"] == (None, None)
    assert specs["language_model/in_out_embed/embeddings"] == ("model", "data")


def test_axes_that_do_not_divide_are_dropped():
    mesh = make_mesh(data=2, model=4)
    assert tuple(_fit(("data", "model"), (6, 10), mesh)) == ("data", None)
    assert tuple(_fit((None, ("data", "model")), (3, 12), mesh)) == (None, "data")


def test_make_mesh_errors_name_the_shortfall():
    with pytest.raises(ValueError, match="needs 16 devices, 8 available"):
        make_mesh(data=2, model=8)
