import io
import os
import pickle
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest

from grokscope import GROK_1, TINY, CheckpointError, load_params, param_shapes, save_params
from grokscope.checkpoint import _CheckpointPickler, read_tensor, tensor_path
from grokscope.quant import QuantizedWeight8bit


def _leaves(params):
    out = {}
    for module, values in params.items():
        for name, v in values.items():
            if isinstance(v, QuantizedWeight8bit):
                out[f"{module}/{name}.weight"] = np.asarray(v.weight)
                out[f"{module}/{name}.scales"] = np.asarray(v.scales)
            else:
                out[f"{module}/{name}"] = np.asarray(v)
    return out


def test_official_files_are_rewritten_byte_for_byte(fixture_dir):
    files = sorted((fixture_dir / "ckpt-0").iterdir())
    assert len(files) == 26
    for file in files:
        buffer = io.BytesIO()
        _CheckpointPickler(buffer, protocol=4).dump(read_tensor(file))
        assert buffer.getvalue() == file.read_bytes(), file.name


def test_param_shapes_follow_the_fixture_order(fixture_dir, fixture_config):
    import json

    listed = json.loads((fixture_dir / "config.json").read_text())["params"]
    shapes = param_shapes(fixture_config)
    assert [p["path"] for p in listed] == list(shapes)
    for p in listed:
        stored = p.get("weight_shape", p.get("shape"))
        dtype = p.get("weight_dtype", p.get("dtype"))
        assert shapes[p["path"]] == (tuple(stored), np.dtype(dtype)), p["path"]


def test_param_shapes_of_grok1_are_the_release_tree():
    D, F, E, V, K = 6144, 32768, 8, 131072, 128
    expected = {
        ("language_model/in_out_embed", "embeddings"): ((V, D), np.float32),
        ("language_model/rms_norm", "scale"): ((D,), np.float32),
    }
    for i in range(64):
        layer = f"transformer/decoder_layer_{i}"
        expected[(f"{layer}/multi_head_attention/query", "w")] = ((D, 48 * K), np.int8)
        expected[(f"{layer}/multi_head_attention/key", "w")] = ((D, 8 * K), np.int8)
        expected[(f"{layer}/multi_head_attention/value", "w")] = ((D, 8 * K), np.int8)
        expected[(f"{layer}/multi_head_attention/linear", "w")] = ((48 * K, D), np.int8)
        expected[(f"{layer}/moe/linear", "w")] = ((E, D, F), np.int8)
        expected[(f"{layer}/moe/linear_v", "w")] = ((E, D, F), np.int8)
        expected[(f"{layer}/moe/linear_1", "w")] = ((E, F, D), np.int8)
        expected[(f"{layer}/router", "w")] = ((D, E), np.float32)
        for norm in ("rms_norm", "rms_norm_1", "rms_norm_2", "rms_norm_3"):
            expected[(f"{layer}/{norm}", "scale")] = ((D,), np.float32)
    order = [f"{m}/{n}" for m, n in sorted(expected)]  # flatten order: module path, then name
    shapes = param_shapes(GROK_1)
    assert len(shapes) == 770
    assert list(shapes) == order
    assert order.index("transformer/decoder_layer_10/moe/linear/w") < order.index("transformer/decoder_layer_2/moe/linear/w")
    for (m, n), (shape, dtype) in expected.items():
        assert shapes[f"{m}/{n}"] == (shape, np.dtype(dtype))


def test_synthetic_checkpoint_round_trips_bit_identically(tmp_path, tiny_config, tiny_params):
    save_params(tiny_params, tmp_path, tiny_config)
    assert len(list((tmp_path / "ckpt-0").iterdir())) == len(param_shapes(tiny_config))
    loaded = load_params(tmp_path, tiny_config)
    a, b = _leaves(tiny_params), _leaves(loaded)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    # the release's block counts: 8 where the input dim is sharded, 1 elsewhere
    assert loaded["transformer/decoder_layer_0/moe/linear_1"]["w"].scales.shape == (8, 8, 64)
    assert loaded["transformer/decoder_layer_0/multi_head_attention/query"]["w"].scales.shape == (1, 64)


def test_load_places_params_on_the_mesh(fixture_dir, fixture_config):
    from grokscope import make_mesh

    mesh = make_mesh(data=2, model=4)
    params = load_params(fixture_dir, fixture_config, mesh=mesh)
    w = params["transformer/decoder_layer_0/moe/linear"]["w"]
    assert tuple(w.weight.sharding.spec) == (None, "data", "model")
    assert tuple(w.scales.sharding.spec) == (None, None, "model")  # 1 block: not split on data
    w1 = params["transformer/decoder_layer_0/moe/linear_1"]["w"]
    assert tuple(w1.weight.sharding.spec) == (None, "model", "data")
    assert tuple(w1.scales.sharding.spec) == (None, "model", "data")  # 8 blocks split over model=4


@pytest.mark.parametrize("mesh_shape", [None, (2, 4)])
def test_arrays_read_from_the_mapped_file_equal_those_read_into_memory(fixture_dir, fixture_config, monkeypatch,
                                                                        mesh_shape):
    """`load_params` leaves large payloads in the file, mapped, and places them a device's shard
    at a time, each copied out in blocks: every payload so (threshold 0), the same values,
    shardings and digests."""
    import xxhash

    from grokscope import checkpoint, make_mesh

    mesh = None if mesh_shape is None else make_mesh(*mesh_shape)
    in_memory = _leaves({m: {n: read_tensor(tensor_path(fixture_dir, i)) for i, n in [(i, n)]}
                         for i, (m, n) in enumerate(p.rsplit("/", 1) for p in param_shapes(fixture_config))})
    monkeypatch.setattr(checkpoint, "_MAPPED_MIN_BYTES", 0)
    monkeypatch.setattr(checkpoint, "_COPY_SPAN_BYTES", 512)  # shards copied out in many small blocks
    left_in_file = []
    skip = checkpoint._MappedFile.skip
    monkeypatch.setattr(checkpoint._MappedFile, "skip", lambda self, n: left_in_file.append(n) or skip(self, n))
    digests = {}
    loaded = load_params(fixture_dir, fixture_config, mesh=mesh, digests=digests)
    assert len(left_in_file) >= 7  # the payloads outside the pickles' frames (the larger arrays)
    mapped = _leaves(loaded)
    assert mapped.keys() == in_memory.keys()
    for key in mapped:
        assert mapped[key].dtype == in_memory[key].dtype, key
        np.testing.assert_array_equal(mapped[key], in_memory[key], err_msg=key)
    for i, path in enumerate(param_shapes(fixture_config)):
        assert digests[path] == xxhash.xxh3_128(tensor_path(fixture_dir, i).read_bytes()).hexdigest(), path
    if mesh is not None:
        assert tuple(loaded["transformer/decoder_layer_0/moe/linear"]["w"].weight.sharding.spec) == \
            (None, "data", "model")


def test_a_mapped_payload_that_does_not_fit_its_array_is_refused(tmp_path, monkeypatch):
    from grokscope import checkpoint

    monkeypatch.setattr(checkpoint, "_MAPPED_MIN_BYTES", 0)
    file = tmp_path / "tensor00000_000"
    data = pickle.dumps(np.zeros(32768, np.float32), protocol=4)  # outside the pickle's frames
    assert data.count(b"M\x00\x80\x85") == 1  # the shape (32768,)
    file.write_bytes(data.replace(b"M\x00\x80\x85", b"M\x01\x80\x85"))
    with pytest.raises(CheckpointError, match=r"an array's data is 131072 bytes, not those of shape \(32769,\)"):
        checkpoint._read_tensor(file, digest=False, mapped=True)
    file.write_bytes(data[:-8])  # the payload runs past the end
    with pytest.raises(CheckpointError, match=r"tensor00000_000: truncated"):
        checkpoint._read_tensor(file, digest=True, mapped=True)


def test_reading_bfloat16_does_not_disturb_the_dtype(fixture_dir):
    read_tensor(fixture_dir / "ckpt-0" / "tensor00005_000")
    assert jax.device_put(np.zeros(2, ml_dtypes.bfloat16)).dtype == ml_dtypes.bfloat16


class _Exploit:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _copy_checkpoint(src, dst):
    shutil.copytree(src / "ckpt-0", dst / "ckpt-0")
    for f in (dst / "ckpt-0").iterdir():
        f.chmod(0o644)
    return dst


def test_malicious_pickle_is_refused_without_executing(tmp_path, fixture_dir, fixture_config):
    ckpt = _copy_checkpoint(fixture_dir, tmp_path / "ckpt")
    sentinel = tmp_path / "pwned"
    victim = tensor_path(ckpt, 3)
    victim.write_bytes(pickle.dumps(_Exploit(f"touch {sentinel}"), protocol=4))
    with pytest.raises(CheckpointError, match=r"tensor00003_000: refusing to unpickle global posix\.system"):
        load_params(ckpt, fixture_config)
    # an old-protocol GLOBAL opcode and a nested payload inside a QuantizedWeight8bit
    victim.write_bytes(b"cbuiltins\neval\n(V__import__('os').system('touch " + str(sentinel).encode() + b"')\ntR.")
    with pytest.raises(CheckpointError, match=r"builtins\.eval"):
        read_tensor(victim)
    nested = QuantizedWeight8bit(weight=_Exploit(f"touch {sentinel}"), scales=np.ones((1, 2)))
    buffer = io.BytesIO()
    _CheckpointPickler(buffer, protocol=4).dump(nested)
    victim.write_bytes(buffer.getvalue())
    with pytest.raises(CheckpointError, match="refusing to unpickle global posix.system"):
        read_tensor(victim)
    assert not sentinel.exists()


def test_object_arrays_are_refused(tmp_path):
    file = tmp_path / "tensor00000_000"
    file.write_bytes(pickle.dumps(np.array([1, "a"], dtype=object), protocol=4))
    with pytest.raises(CheckpointError, match="expected a numeric array, got dtype object"):
        read_tensor(file)


def test_truncated_missing_and_extra_files_are_named(tmp_path, fixture_dir, fixture_config):
    ckpt = _copy_checkpoint(fixture_dir, tmp_path / "ckpt")
    victim = tensor_path(ckpt, 7)
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"tensor00007_000: truncated or corrupt pickle"):
        load_params(ckpt, fixture_config)
    victim.write_bytes(data)
    tensor_path(ckpt, 26).write_bytes(data)
    with pytest.raises(CheckpointError, match=r"unexpected tensor files .* first tensor00026_000"):
        load_params(ckpt, fixture_config)
    tensor_path(ckpt, 26).unlink()
    tensor_path(ckpt, 12).unlink()
    with pytest.raises(CheckpointError, match=r"1 of 26 tensor files missing, first tensor00012_000"):
        load_params(ckpt, fixture_config)
    with pytest.raises(CheckpointError, match=r"no ckpt-0/ directory"):
        load_params(tmp_path, fixture_config)


def test_wrong_shape_and_dtype_name_the_file_and_parameter(tmp_path, fixture_dir, fixture_config):
    ckpt = _copy_checkpoint(fixture_dir, tmp_path / "ckpt")
    victim = tensor_path(ckpt, 12)  # transformer/decoder_layer_0/rms_norm_3/scale
    victim.write_bytes(pickle.dumps(np.ones(65, np.float32), protocol=4))
    with pytest.raises(CheckpointError, match=r"tensor00012_000 \(transformer/decoder_layer_0/rms_norm_3/scale\): "
                                              r"expected shape \(64,\), got \(65,\)"):
        load_params(ckpt, fixture_config)
    victim.write_bytes(pickle.dumps(np.ones(64, np.int32), protocol=4))
    with pytest.raises(CheckpointError, match=r"tensor00012_000 .*expected float32/bfloat16, got int32"):
        load_params(ckpt, fixture_config)
    victim.write_bytes((fixture_dir / "ckpt-0" / "tensor00012_000").read_bytes())
    q = read_tensor(tensor_path(ckpt, 5))  # multi_head_attention/key/w, weight [64, 32]
    buffer = io.BytesIO()
    _CheckpointPickler(buffer, protocol=4).dump(QuantizedWeight8bit(q.weight.astype(np.int16), q.scales))
    tensor_path(ckpt, 5).write_bytes(buffer.getvalue())
    with pytest.raises(CheckpointError, match=r"tensor00005_000 \(.*key/w\): weight: expected int8, got int16"):
        load_params(ckpt, fixture_config)
    buffer = io.BytesIO()
    _CheckpointPickler(buffer, protocol=4).dump(QuantizedWeight8bit(q.weight, np.ones((3, 32), ml_dtypes.bfloat16)))
    tensor_path(ckpt, 5).write_bytes(buffer.getvalue())
    with pytest.raises(CheckpointError, match=r"scales: expected shape \('n_blocks', 32\) with n_blocks dividing 64, got \(3, 32\)"):
        load_params(ckpt, fixture_config)


def test_any_scale_block_count_loads_and_runs(tmp_path):
    from grokscope import forward, init_params
    from grokscope.forward import is_quantizable
    from grokscope.quant import dequantize, quantize

    params = init_params(TINY, seed=2, quantized=False)
    requant = {m: {n: (quantize(v, 4) if is_quantizable(f"{m}/{n}") else v) for n, v in vs.items()}
               for m, vs in params.items()}
    save_params(requant, tmp_path, TINY)
    loaded = load_params(tmp_path, TINY)
    assert loaded["transformer/decoder_layer_0/moe/linear"]["w"].scales.shape == (8, 4, 344)
    tokens = np.arange(1, 17, dtype=np.int32).reshape(2, 8)
    out = forward(loaded, TINY, tokens)
    deq = {m: {n: (np.asarray(dequantize(v, np.float32)) if isinstance(v, QuantizedWeight8bit) else v)
               for n, v in vs.items()} for m, vs in loaded.items()}
    np.testing.assert_array_equal(np.asarray(out.logits), np.asarray(forward(deq, TINY, tokens).logits))
