"""The native CPU kernels (grokscope/kernels): int8 and bfloat16 weights read as they are stored,
against float64 products of the widened weights, and a decode-sized forward through them against
XLA's own path."""

import dataclasses
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import grokscope as gs
from grokscope import kernels, quant
from grokscope.config import load_config
from grokscope.record import RecordSpec
from grokscope.sharding import make_mesh

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                reason="no C++ compiler to build grokscope/kernels/cpu.cc")


def test_the_kernels_build_here():
    assert kernels.available(), kernels.why_unavailable()
    assert sorted(kernels.cache_dir().glob("cpu-*.so"))


@pytest.mark.parametrize("R, K, N, B, valid", [
    (4, 512, 256, 8, 2),  # the vector path: 8 streams of rows, 16 columns at a time
    (9, 96, 48, 2, 9),  # rows in groups of 4 (4 + 4 + 1)
    (3, 52, 37, 4, 3),  # no vector path: 13 rows a block, 37 columns
    (4, 64, 32, 1, 0),  # no valid row
])
def test_int8_rows_match_float64_products(R, K, N, B, valid):
    rng = np.random.default_rng(R * K + N)
    E = 3
    w = rng.integers(-127, 128, size=(E, K, N), dtype=np.int8)
    scales = (rng.random((E, B, N)) + 0.5).astype(ml_dtypes.bfloat16)
    x = rng.standard_normal((R, K)).astype(np.float32)
    for e in range(E):
        got = np.asarray(jax.jit(kernels.int8_rows)(x, w, scales, e, valid))
        widened = (w[e].astype(np.float64).reshape(B, K // B, N)
                   * scales[e].astype(np.float64)[:, None, :]).reshape(K, N)
        want = x.astype(np.float64) @ widened
        want[valid:] = 0.0
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * np.abs(want).max(initial=1.0))
        assert not got[valid:].any()


def test_int8_rows_refuses_an_expert_out_of_range():
    w = np.zeros((2, 16, 16), np.int8)
    with pytest.raises(Exception, match="expert out of range"):
        jax.block_until_ready(kernels.int8_rows(np.ones((1, 16), np.float32), w, np.ones((2, 1, 16), np.float32),
                                                2, 1))


@pytest.mark.parametrize("R, D, V", [(8, 256, 64), (11, 96, 33), (3, 40, 7)])
def test_bf16_rows_match_float64_products(R, D, V):
    rng = np.random.default_rng(R + D + V)
    table = rng.standard_normal((V, D)).astype(ml_dtypes.bfloat16)
    x = rng.standard_normal((R, D)).astype(np.float32)
    got = np.asarray(jax.jit(kernels.bf16_rows)(x, table))
    want = x.astype(np.float64) @ table.astype(np.float64).T
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.fixture(scope="module")
def decode_sized():
    """A Grok-1 tiny whose experts stream (8 scale blocks of 64 rows in the down projection), with a
    bfloat16 table, and 2 x 3 tokens: decode-sized blocks of rows."""
    config = dataclasses.replace(load_config("tiny"), moe_ffn_size=512, num_layers=2)
    params = gs.init_params(config, seed=7)
    table = "language_model/in_out_embed"
    params = {**params, table: {"embeddings": np.asarray(params[table]["embeddings"]).astype(ml_dtypes.bfloat16)}}
    tokens = np.random.default_rng(4).integers(3, config.vocab_size, size=(2, 3)).astype(np.int32)
    return config, params, tokens


@pytest.mark.parametrize("mesh_shape", [None, (2, 4)])
def test_a_decode_sized_forward_through_the_kernels_matches_xla(decode_sized, monkeypatch, mesh_shape,
                                                               forget_compiled):
    """Experts, attention projections and the head through the kernels (on a mesh: each device its
    own columns, or its own rows and one sum; the data axis left to XLA) give XLA's expert
    choices and outputs."""
    from grokscope.forward import make_forward
    from grokscope.model import lm

    config, params, tokens = decode_sized
    mesh = None if mesh_shape is None else make_mesh(*mesh_shape)
    spec = RecordSpec(routing=True, expert_outputs=(1,), residual="all")
    monkeypatch.setattr(quant, "TILE_MIN_BYTES", 0)  # the experts stream
    monkeypatch.setattr(kernels, "NATIVE_MIN_BYTES", 0)  # the attention projections go native
    monkeypatch.setattr(lm, "large_head", lambda V, D: True)  # the table is never widened
    runs = {}
    for native in ("0", "1"):
        monkeypatch.setenv("GROKSCOPE_NATIVE_KERNELS", native)
        forget_compiled()
        runs[native] = gs.forward(params, config, tokens, record=spec, moe_dispatch="grouped", mesh=mesh)
        positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
        program = str(jax.make_jaxpr(make_forward(config, spec, "float32", "grouped"))(params, tokens, positions))
        # per layer: the experts' gate, up and down, the four attention projections; and the head
        assert program.count("ffi_call[") == (7 * config.num_layers + 1 if native == "1" else 0)
    forget_compiled()
    xla, native = runs["0"], runs["1"]
    np.testing.assert_array_equal(np.asarray(native.record["expert_index"]), np.asarray(xla.record["expert_index"]))
    for name in ("moe_output", "residual"):
        np.testing.assert_allclose(np.asarray(native.record[name]), np.asarray(xla.record[name]), rtol=1e-5,
                                   atol=1e-5, err_msg=name)
    # Grok-1's logits are rounded to bfloat16: a float32-rounding difference may move one by an ulp
    np.testing.assert_allclose(np.asarray(native.logits), np.asarray(xla.logits), rtol=2 ** -7, atol=1e-4)
    assert np.mean(np.asarray(native.logits) == np.asarray(xla.logits)) > 0.98


def test_local_scales_pick_each_devices_block():
    """local_scales inside shard_map: 2 blocks of 8 rows over 4 devices of 4 rows each."""
    from jax.sharding import PartitionSpec as P

    scales = jnp.asarray(np.arange(2 * 3, dtype=np.float32).reshape(2, 3))
    mesh = make_mesh(1, 4)
    picked = jax.shard_map(lambda s: quant.local_scales(s, 4, 4, split=False), mesh=mesh, in_specs=P(),
                           out_specs=P("model"), check_vma=False)(scales)
    np.testing.assert_array_equal(np.asarray(picked), np.asarray(scales)[[0, 0, 1, 1]])


@pytest.mark.parametrize("mesh_shape", [None, (1, 4)])
def test_a_large_head_through_the_kernel_matches_the_widened_table(monkeypatch, mesh_shape, forget_compiled):
    """20 rows (the kernel's groups of 8, 8 and 4) against the small table widened whole, then
    finished alike (the output multiplier and bfloat16 rounding)."""
    from grokscope.model import lm

    config = dataclasses.replace(load_config("tiny"), num_layers=1)
    params = gs.init_params(config, seed=5)
    table = "language_model/in_out_embed"
    params = {**params, table: {"embeddings": np.asarray(params[table]["embeddings"]).astype(ml_dtypes.bfloat16)}}
    tokens = np.random.default_rng(2).integers(3, config.vocab_size, size=(2, 10)).astype(np.int32)
    mesh = None if mesh_shape is None else make_mesh(*mesh_shape)
    whole = gs.forward(params, config, tokens, mesh=mesh)  # a small table: widened whole
    monkeypatch.setattr(lm, "large_head", lambda V, D: True)
    forget_compiled()
    chunked = gs.forward(params, config, tokens, mesh=mesh)
    forget_compiled()
    np.testing.assert_allclose(np.asarray(chunked.logits), np.asarray(whole.logits), rtol=2 ** -7, atol=1e-4)
    assert np.mean(np.asarray(chunked.logits) == np.asarray(whole.logits)) > 0.99
