"""Large feed-forward weights run in tiles of their hidden width (int8 dequantized a tile at a time,
inside each device's shard): the same expert choices and outputs as the whole-weight path."""

import dataclasses

import jax
import ml_dtypes
import numpy as np
import pytest

import grokscope as gs
from grokscope import quant
from grokscope.config import load_config
from grokscope.quant import hidden_tile
from grokscope.record import RecordSpec
from grokscope.sharding import make_mesh


@pytest.fixture(autouse=True)
def xla_tiles(monkeypatch):
    """These tests are about XLA's tiles: the native kernels (tests/test_kernels.py), which take
    decode-sized blocks of rows where they run, stay off."""
    monkeypatch.setenv("GROKSCOPE_NATIVE_KERNELS", "0")


def test_hidden_tile_divides_shards_and_scale_blocks():
    # Grok-1's experts: F 32768 over 8 devices, the down projection in 8 scale blocks
    assert hidden_tile(6144, 32768, 8, 8) == 512
    assert hidden_tile(6144, 32768, 1, 8) == 512
    assert hidden_tile(8192, 16384, 8, 1) == 512  # Grok-2's bf16 experts (no scale blocks)
    assert hidden_tile(64, 344, 1, 8) is None  # small weights run whole
    # a tile never straddles a shard or a scale block
    for d, f, shards, blocks in [(6144, 32768, 4, 8), (8192, 32768, 2, 8), (4096, 24576, 8, 8)]:
        t = hidden_tile(d, f, shards, blocks)
        assert t and (f // shards) % t == 0 and (f // blocks) % t == 0


def _while_loops(config, params, tokens, dispatch):
    from grokscope.forward import make_forward

    positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
    apply = make_forward(config, RecordSpec(routing=True), "float32", dispatch)
    text = str(jax.make_jaxpr(apply)(params, tokens, positions))
    return text.count("while[") + text.count("scan[")  # fori_loop with static bounds becomes a scan


def test_the_tiles_are_really_used(wide, monkeypatch):
    config, params, tokens = wide
    least = quant.TILE_MIN_BYTES
    for dispatch in ("grouped", "ragged", "dense"):
        whole = _while_loops(config, params, tokens, dispatch)
        monkeypatch.setattr(quant, "TILE_MIN_BYTES", 0)
        tiled = _while_loops(config, params, tokens, dispatch)
        monkeypatch.setattr(quant, "TILE_MIN_BYTES", least)
        # loops over tiles in every layer: the all-experts computation's (the dense path's own, or
        # the every-expert probe's, traced and then compiled away when unrecorded), ragged's, and
        # the grouped path's two (the gate/up rows, then the down rows, of each block)
        per_layer = {"grouped": 3, "ragged": 2, "dense": 1}[dispatch]
        assert tiled - whole == per_layer * config.num_layers, dispatch


@pytest.fixture(scope="module")
def wide():
    config = dataclasses.replace(load_config("tiny"), moe_ffn_size=512, num_layers=2)  # 8 scale blocks of 64 rows
    params = gs.init_params(config, seed=3)
    tokens = np.random.default_rng(0).integers(3, config.vocab_size, size=(4, 24)).astype(np.int32)
    return config, params, tokens


@pytest.mark.parametrize("dispatch, mesh_shape", [("grouped", None), ("grouped", (2, 4)), ("ragged", None),
                                                  ("ragged", (1, 4)), ("dense", (1, 4))])
def test_tiled_experts_match_the_whole_weights(wide, monkeypatch, dispatch, mesh_shape, forget_compiled):
    config, params, tokens = wide
    mesh = None if mesh_shape is None else make_mesh(*mesh_shape)
    spec = RecordSpec(routing=True, expert_outputs=(1,))
    whole = gs.forward(params, config, tokens, record=spec, moe_dispatch=dispatch, mesh=mesh)
    monkeypatch.setattr(quant, "TILE_MIN_BYTES", 0)  # tile everything that can be tiled
    forget_compiled()  # the programs are cached per config: trace them again with tiles
    shards = 1 if mesh is None else mesh_shape[1]
    assert hidden_tile(config.emb_size, config.ffn_size, shards, 8) == 64
    tiled = gs.forward(params, config, tokens, record=spec, moe_dispatch=dispatch, mesh=mesh)
    forget_compiled()
    np.testing.assert_array_equal(np.asarray(tiled.record["expert_index"]), np.asarray(whole.record["expert_index"]))
    for name in ("expert_output", "moe_output"):
        np.testing.assert_allclose(np.asarray(tiled.record[name]), np.asarray(whole.record[name]), rtol=1e-5,
                                   atol=1e-5, err_msg=name)
    # the logits are rounded to bfloat16 (Grok-1's release): a 1e-6 change may move one by an ulp
    np.testing.assert_allclose(np.asarray(tiled.logits), np.asarray(whole.logits), rtol=2 ** -7, atol=1e-4)


@pytest.mark.parametrize("native", ["0", "1"])
def test_streamed_experts_find_the_scale_block_of_every_shard(wide, monkeypatch, native, forget_compiled):
    """The grouped path's tiles take their own scale block, also when the down projection has fewer
    scale blocks than the mesh has model shards (its scales are then whole on every device); so do
    the native kernels' blocks of rows (grokscope/kernels: blocks of 8 rows here)."""
    config, params, tokens = wide
    monkeypatch.setenv("GROKSCOPE_NATIVE_KERNELS", native)
    down = "transformer/decoder_layer_0/moe/linear_1"
    w = np.asarray(quant.dequantize(params[down]["w"], np.float32))
    params = {**params, down: {"w": quant.quantize(w, n_blocks=2)}}  # 2 blocks of 256 rows over 4 shards
    spec = RecordSpec(routing=True, expert_outputs=(0,))
    whole = gs.forward(params, config, tokens, record=spec, moe_dispatch="grouped")
    monkeypatch.setattr(quant, "TILE_MIN_BYTES", 0)
    forget_compiled()
    assert quant.stream_tile(config.emb_size, config.ffn_size, 4, 1, 2) == 64
    tiled = gs.forward(params, config, tokens, record=spec, moe_dispatch="grouped", mesh=make_mesh(1, 4))
    forget_compiled()
    np.testing.assert_array_equal(np.asarray(tiled.record["expert_index"]), np.asarray(whole.record["expert_index"]))
    np.testing.assert_allclose(np.asarray(tiled.record["moe_output"]), np.asarray(whole.record["moe_output"]),
                               rtol=1e-5, atol=1e-5)


def test_stream_tile_divides_shards_and_scale_blocks():
    # Grok-1's experts on 8 devices: tiles of 64 rows ([64, 4096] and [64, 6144] in float32, 1-1.5 MB)
    assert quant.stream_tile(6144, 32768, 8, 1, 8) == 64
    assert quant.stream_tile(64, 344, 1, 1, 8) is None  # small weights run whole
    for d, f, shards, blocks in [(6144, 32768, 4, 8), (8192, 16384, 8, 1), (4096, 24576, 16, 8)]:
        t = quant.stream_tile(d, f, shards, 1, blocks)
        assert t and d % t == 0 and (f // shards) % t == 0 and (f // blocks) % t == 0


def test_tiled_float_experts_and_dense_mlp_match(monkeypatch, forget_compiled):
    """Grok-2's weights are bfloat16, not int8, and its dense MLP runs through the same tiles."""
    config = dataclasses.replace(load_config("grok2-tiny"), num_layers=1, vocab_size=512, moe_ffn_size=512,
                                 dense_ffn_size=1024)
    params = jax.tree.map(lambda v: np.asarray(v).astype(ml_dtypes.bfloat16), gs.init_params(config, seed=4))
    tokens = np.random.default_rng(1).integers(3, config.vocab_size, size=(2, 12)).astype(np.int32)
    spec = RecordSpec(routing=True, expert_outputs="all")
    whole = gs.forward(params, config, tokens, record=spec)
    monkeypatch.setattr(quant, "TILE_MIN_BYTES", 0)
    forget_compiled()
    assert hidden_tile(config.emb_size, config.dense_ffn_size, 1, 1) == 512
    tiled = gs.forward(params, config, tokens, record=spec)
    forget_compiled()
    np.testing.assert_array_equal(np.asarray(tiled.record["expert_index"]), np.asarray(whole.record["expert_index"]))
    for name in ("mlp_output", "moe_output"):
        np.testing.assert_allclose(np.asarray(tiled.record[name]), np.asarray(whole.record[name]), rtol=1e-5,
                                   atol=1e-5, err_msg=name)
    np.testing.assert_allclose(np.asarray(tiled.logits), np.asarray(whole.logits), rtol=1e-5, atol=1e-4)


def test_a_large_bfloat16_head_is_never_widened_and_matches_the_whole_table(monkeypatch, forget_compiled):
    """The releases' bfloat16 output head is used as it is: float32 activations in three bfloat16
    parts, on one device and with the vocabulary split over a mesh."""
    from grokscope.model import lm

    config = dataclasses.replace(load_config("tiny"), num_layers=1)
    params = gs.init_params(config, seed=5)
    params = {**params, "language_model/in_out_embed": {
        "embeddings": np.asarray(params["language_model/in_out_embed"]["embeddings"]).astype(ml_dtypes.bfloat16)}}
    tokens = np.random.default_rng(2).integers(3, config.vocab_size, size=(2, 10)).astype(np.int32)
    whole = gs.forward(params, config, tokens)
    assert not lm.large_head(config.vocab_size, config.emb_size)  # small tables are widened whole
    assert lm.large_head(131072 // 8, 6144)  # Grok-1's vocabulary on each of 8 devices: 403 MB in float32
    calls = []
    monkeypatch.setattr(lm, "large_head", lambda V, D: calls.append((V, D)) or True)
    forget_compiled()
    split = gs.forward(params, config, tokens)  # 20 rows: one product of the three parts
    monkeypatch.setattr(lm, "HEAD_STACKED_ROWS", 8)
    forget_compiled()
    one_by_one = gs.forward(params, config, tokens)  # a product per part
    on_mesh = gs.forward(params, config, tokens, mesh=make_mesh(1, 4))  # the table's vocabulary split in 4
    forget_compiled()
    assert set(calls) == {(config.vocab_size, config.emb_size), (config.vocab_size // 4, config.emb_size)}
    # Grok-1's logits are rounded to bfloat16: a float32-rounding difference may move one by an ulp
    for logits in (split.logits, one_by_one.logits, on_mesh.logits):
        np.testing.assert_allclose(np.asarray(logits), np.asarray(whole.logits), rtol=2 ** -7, atol=1e-4)
        assert np.mean(np.asarray(logits) == np.asarray(whole.logits)) > 0.99


def test_bfloat16_parts_sum_to_the_float32_value():
    from grokscope.model.lm import bfloat16_parts

    x = np.random.default_rng(3).standard_normal(10000).astype(np.float32) * np.float32(7.0)
    parts = np.asarray(bfloat16_parts(jax.numpy.asarray(x))).astype(np.float64)
    assert parts.shape == (3, 10000)
    np.testing.assert_allclose(parts.sum(0), x, rtol=2 ** -23, atol=0)


@pytest.mark.parametrize("mesh_shape", [None, (2, 4)])
def test_large_int8_projections_are_widened_a_tile_of_columns_at_a_time(wide, monkeypatch, mesh_shape,
                                                                         forget_compiled):
    """Attention projections whose int8 weight would be large widened (Grok's) run a tile of
    columns at a time (on a mesh inside each device's part: its columns, or its rows and one sum
    over the scale blocks it holds): the same routing, residual stream and logits."""
    from grokscope.model import linear

    config, params, tokens = wide
    mesh = None if mesh_shape is None else make_mesh(*mesh_shape)
    spec = RecordSpec(routing=True, residual="all")
    whole = gs.forward(params, config, tokens, record=spec, mesh=mesh)
    loops = _while_loops(config, params, tokens, "sparse")
    monkeypatch.setattr(linear, "TILE_MIN_BYTES", 0)
    monkeypatch.setattr(linear, "TILE_BYTES", 4 * config.emb_size * 8)  # 8 columns of the query a tile
    forget_compiled()
    assert linear.column_tile(config.emb_size, config.num_q_heads * config.key_size) == 8
    # a loop over column tiles in each of the four projections of every layer
    assert _while_loops(config, params, tokens, "sparse") - loops == 4 * config.num_layers
    tiled = gs.forward(params, config, tokens, record=spec, mesh=mesh)
    np.testing.assert_array_equal(np.asarray(tiled.record["expert_index"]), np.asarray(whole.record["expert_index"]))
    np.testing.assert_allclose(np.asarray(tiled.record["residual"]), np.asarray(whole.record["residual"]),
                               rtol=1e-5, atol=1e-5)
    # the logits are rounded to bfloat16 (Grok-1's release): a 1e-6 change may move one by an ulp
    np.testing.assert_allclose(np.asarray(tiled.logits), np.asarray(whole.logits), rtol=2 ** -7, atol=1e-4)
