import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from grokscope.quant import dequantize, quantize


@pytest.mark.parametrize("n_blocks", [1, 2, 8])
def test_quantize_dequantize_error_is_within_half_a_step(n_blocks):
    w = np.random.default_rng(0).normal(size=(3, 64, 24)).astype(np.float32)
    q = quantize(w, n_blocks)
    assert q.weight.dtype == np.int8 and q.scales.shape == (3, n_blocks, 24)
    assert q.scales.dtype == ml_dtypes.bfloat16
    back = np.asarray(dequantize(q, jnp.float32))
    step = np.repeat(q.scales.astype(np.float32), 64 // n_blocks, axis=1)
    assert np.all(np.abs(back - w) <= 0.5 * step + 1e-2 * np.abs(w))


def test_block_scales_apply_to_their_rows_only():
    weight = np.ones((4, 2), np.int8)
    scales = np.array([[1.0, 10.0], [2.0, 20.0]], dtype=ml_dtypes.bfloat16)
    from grokscope.quant import QuantizedWeight8bit

    w = np.asarray(dequantize(QuantizedWeight8bit(weight, scales), jnp.float32))
    np.testing.assert_array_equal(w, [[1, 10], [1, 10], [2, 20], [2, 20]])


def test_zero_columns_quantize_to_zero():
    w = np.zeros((8, 3), np.float32)
    w[:, 1] = 1.0
    q = quantize(w)
    assert np.all(q.weight[:, 0] == 0) and np.all(q.weight[:, 1] == 127)
    assert not np.any(np.isnan(np.asarray(dequantize(q, jnp.float32))))


def test_quantize_rejects_blocks_that_do_not_divide():
    with pytest.raises(ValueError, match="n_blocks=3 must divide the input size 8"):
        quantize(np.ones((8, 2)), 3)
