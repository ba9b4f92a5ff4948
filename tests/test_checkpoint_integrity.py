"""Checkpoint integrity: content digests taken while loading, BUILD confined to the
unpickler's own objects, and special files (directories, FIFOs, sockets, devices, symlink
loops) refused with one line naming the file."""

import contextlib
import io
import os
import pickle
import pickletools
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
import xxhash

from grokscope import CheckpointError, load_params, param_shapes
from grokscope import checkpoint
from grokscope.checkpoint import (DIGEST_ALGORITHM, _CheckpointPickler, checkpoint_identity, combine_digests,
                                  first_difference, read_tensor, tensor_path)
from grokscope.quant import QuantizedWeight8bit


def _copy(src, dst):
    shutil.copytree(src / "ckpt-0", dst / "ckpt-0")
    shutil.copy(src / "config.json", dst / "config.json")
    for f in (dst / "ckpt-0").iterdir():
        f.chmod(0o644)
    return dst


def _file_hash(path) -> str:
    return xxhash.xxh3_128(path.read_bytes()).hexdigest()


def _dump(value) -> bytes:
    buffer = io.BytesIO()
    _CheckpointPickler(buffer, protocol=4).dump(value)
    return buffer.getvalue()


@contextlib.contextmanager
def _no_hang(seconds=60):
    """Turns a call that blocks (e.g. opening a FIFO with no writer) into a failure."""
    def expire(signum, frame):
        raise TimeoutError("blocked")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# --- A. content digests -----------------------------------------------------------------


def test_digests_taken_while_loading_equal_a_hash_of_each_whole_file(fixture_dir, fixture_config):
    digests = {}
    params = load_params(fixture_dir, fixture_config, digests=digests)
    shapes = param_shapes(fixture_config)
    assert list(digests) == list(shapes)
    for index, path in enumerate(shapes):
        assert digests[path] == _file_hash(tensor_path(fixture_dir, index)), path
    assert DIGEST_ALGORITHM == "xxh3_128"
    assert all(re.fullmatch(r"[0-9a-f]{32}", d) for d in digests.values())
    plain = load_params(fixture_dir, fixture_config)
    for module, values in plain.items():
        for name, v in values.items():
            got = params[module][name]
            if isinstance(v, QuantizedWeight8bit):
                np.testing.assert_array_equal(np.asarray(got.weight), np.asarray(v.weight))
                np.testing.assert_array_equal(np.asarray(got.scales), np.asarray(v.scales))
            else:
                np.testing.assert_array_equal(np.asarray(got), np.asarray(v))


def test_digest_covers_bytes_after_the_pickle_and_old_protocol_files(tmp_path, fixture_dir, fixture_config):
    ckpt = _copy(fixture_dir, tmp_path / "ckpt")
    before = {}
    load_params(ckpt, fixture_config, digests=before)
    shapes = list(param_shapes(fixture_config))
    trailing = tensor_path(ckpt, 4)
    trailing.write_bytes(trailing.read_bytes() + b"not part of the pickle" * 1000)
    # protocol 3: globals by GLOBAL opcodes (read line by line), no frames
    router = tensor_path(ckpt, 13)
    router.write_bytes(pickle.dumps(np.asarray(read_tensor(router)), protocol=3))
    after = {}
    load_params(ckpt, fixture_config, digests=after)
    assert after[shapes[4]] == _file_hash(trailing) != before[shapes[4]]
    assert after[shapes[13]] == _file_hash(router) != before[shapes[13]]
    assert {p for p in shapes if after[p] != before[p]} == {shapes[4], shapes[13]}
    assert first_difference(before, after, shapes) == shapes[4]


def test_hashing_reader_sees_every_byte_however_it_is_read():
    data = bytes(range(256)) * 300 + b"line one\nline two\n" + os.urandom(70_000)
    reader = checkpoint._HashingReader(io.BufferedReader(io.BytesIO(data)), xxhash.xxh3_128())
    assert reader.read(5) == data[:5]
    buffer = bytearray(1000)
    assert reader.readinto(buffer) == 1000 and bytes(buffer) == data[5:1005]
    reader.read(76_800 - 1005)
    assert reader.readline() == b"line one\n"
    assert reader.readline(4) == b"line"
    assert reader.finish() == xxhash.xxh3_128(data).hexdigest()


def test_a_changed_tensor_of_the_same_size_is_found_by_digest_not_identity(tmp_path, fixture_dir, fixture_config):
    ckpt = _copy(fixture_dir, tmp_path / "ckpt")
    shapes = list(param_shapes(fixture_config))
    stored = {}
    load_params(ckpt, fixture_config, digests=stored)
    identity = checkpoint_identity(ckpt)
    victim = tensor_path(ckpt, 12)  # transformer/decoder_layer_0/rms_norm_3/scale
    original = read_tensor(victim)
    replacement = _dump(original + np.float32(1))
    assert len(replacement) == victim.stat().st_size
    victim.write_bytes(replacement)
    current = {}
    load_params(ckpt, fixture_config, digests=current)
    assert checkpoint_identity(ckpt)["index_sha256"] == identity["index_sha256"]
    assert first_difference(stored, current, shapes) == shapes[12] == "transformer/decoder_layer_0/rms_norm_3/scale"
    assert combine_digests(stored) != combine_digests(current)
    assert first_difference(stored, dict(stored), shapes) is None


def test_combine_digests_follows_its_documented_algorithm():
    digests = {"b/w": "22" * 16, "a/w": "11" * 16, "a/scale": "33" * 16}
    text = "a/scale\t" + "33" * 16 + "\n" + "a/w\t" + "11" * 16 + "\n" + "b/w\t" + "22" * 16 + "\n"
    expected = xxhash.xxh3_128(text.encode()).hexdigest()
    assert combine_digests(digests) == expected
    assert combine_digests(dict(reversed(list(digests.items())))) == expected
    assert combine_digests({**digests, "b/w": "23" * 16}) != expected
    assert combine_digests({"b/v": digests["b/w"], "a/w": digests["a/w"], "a/scale": digests["a/scale"]}) != expected
    assert combine_digests({k: v for k, v in digests.items() if k != "b/w"}) != expected


def test_first_difference_follows_the_given_order():
    order = ["z", "b", "a"]
    stored = {"z": "1", "b": "2", "a": "3"}
    assert first_difference(stored, dict(stored), order) is None
    assert first_difference(stored, {**stored, "a": "x", "b": "y"}, order) == "b"
    assert first_difference(stored, {"z": "1", "a": "3"}, order) == "b"  # missing from current
    assert first_difference({"z": "1", "b": "2"}, stored, order) == "a"  # missing from stored
    assert first_difference(stored, {**stored, "extra": "9"}, order) == "extra"  # outside `order`
    assert first_difference(stored, {**stored, "z": "0"}, iter(order)) == "z"


def test_load_model_records_the_tensor_digests():
    from grokscope.session import default_model_dir, load_model, resolve_model

    assert resolve_model().tensor_digests == {}
    model = load_model()
    shapes = param_shapes(model.config)
    assert list(model.tensor_digests) == list(shapes)
    for index, path in enumerate(shapes):
        assert model.tensor_digests[path] == _file_hash(tensor_path(default_model_dir(), index)), path


# --- B. pickled state only for the unpickler's own objects ------------------------------

P = pickle


def _u(text: str) -> bytes:
    raw = text.encode()
    return P.SHORT_BINUNICODE + bytes([len(raw)]) + raw


def _global(module: str, name: str) -> bytes:
    return _u(module) + _u(name) + P.STACK_GLOBAL


def _int(n: int) -> bytes:
    return P.BININT + struct.pack("<i", n)


def _pickle(*parts: bytes) -> bytes:
    return P.PROTO + b"\x04" + b"".join(parts) + P.STOP


def _array_ops(a: np.ndarray) -> bytes:
    """The opcodes that push array `a` (numpy's own pickle of it, without memo)."""
    ops = pickletools.optimize(pickle.dumps(a, protocol=3))
    assert not any(op.name.endswith("GET") or op.name.endswith("PUT") for op, _, _ in pickletools.genops(ops))
    return ops[2:-1]


def _dtype_state(*items: bytes) -> bytes:
    return P.MARK + b"".join(items) + P.TUPLE


_BF16_STATE = (_int(3), _u("<"), P.NONE, P.NONE, P.NONE, _int(2), _int(2), _int(80))
_BF16 = _global("numpy", "dtype") + _global("ml_dtypes", "bfloat16") + P.NEWFALSE + P.NEWTRUE + P.TUPLE3 + P.REDUCE

_F4 = (_global("numpy", "dtype") + _u("f4") + P.NEWFALSE + P.NEWTRUE + P.TUPLE3 + P.REDUCE
       + _dtype_state(_int(3), _u("<"), P.NONE, P.NONE, P.NONE, _int(-1), _int(-1), _int(0)) + P.BUILD)
_NEW_ARRAY = (_global("numpy.core.multiarray", "_reconstruct") + _global("numpy", "ndarray") + _int(0) + P.TUPLE1
              + P.SHORT_BINBYTES + b"\x01b" + P.TUPLE3 + P.REDUCE)


def _array_state(dtype: bytes, data: bytes, n: int) -> bytes:
    return (P.MARK + _int(1) + _int(n) + P.TUPLE1 + dtype + P.NEWFALSE
            + P.SHORT_BINBYTES + bytes([len(data)]) + data + P.TUPLE)


_W = np.arange(-8, 8, dtype=np.int8).reshape(4, 4)
_S = np.ones((2, 4), ml_dtypes.bfloat16)


def _quantized(state: bytes) -> bytes:
    return _global("__main__", "QuantizedWeight8bit") + P.EMPTY_TUPLE + P.NEWOBJ + state + P.BUILD


def _weight_and_scales(*extra: bytes) -> bytes:
    return (P.EMPTY_DICT + P.MARK + _u("weight") + _array_ops(_W) + _u("scales") + _array_ops(_S)
            + b"".join(extra) + P.SETITEMS)


def _class_snapshot():
    return {k: v for k, v in vars(QuantizedWeight8bit).items()}


def _assert_class_untouched(snapshot):
    assert _class_snapshot().keys() == snapshot.keys()
    for k, v in snapshot.items():
        assert vars(QuantizedWeight8bit)[k] is v, k
    for name in ("n_blocks", "nbytes", "shape"):
        assert isinstance(vars(QuantizedWeight8bit)[name], property), name
    q = QuantizedWeight8bit(weight=_W, scales=_S)
    assert (q.n_blocks, q.nbytes, q.shape) == (2, 16 + 16, (4, 4))


def test_hand_assembled_pickles_of_arrays_and_quantized_weights_load(tmp_path):
    file = tmp_path / "tensor00000_000"
    file.write_bytes(_pickle(_quantized(_weight_and_scales())))
    q = read_tensor(file)
    assert type(q) is QuantizedWeight8bit
    np.testing.assert_array_equal(q.weight, _W)
    assert q.scales.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(q.scales, _S)
    # arrays spelled out opcode by opcode, bfloat16 with the release's dtype state
    data = np.full(3, 1.5, ml_dtypes.bfloat16).tobytes()
    file.write_bytes(_pickle(_NEW_ARRAY, _array_state(_BF16 + _dtype_state(*_BF16_STATE) + P.BUILD, data, 3),
                             P.BUILD))
    a = read_tensor(file)
    assert a.dtype == ml_dtypes.bfloat16 and a.tolist() == [1.5, 1.5, 1.5]
    file.write_bytes(_pickle(_NEW_ARRAY, _array_state(_F4, np.arange(3, dtype="<f4").tobytes(), 3), P.BUILD))
    a = read_tensor(file)
    assert a.dtype == np.float32 and a.tolist() == [0.0, 1.0, 2.0]


_SLOTS = P.EMPTY_DICT + P.MARK + _u("n_blocks") + _int(99) + _u("nbytes") + _int(7) + P.SETITEMS

_MALICIOUS = {
    # (state, slotstate) on the class object: setattr(QuantizedWeight8bit, "n_blocks", 99)
    "class slotstate": (_pickle(_global("__main__", "QuantizedWeight8bit"), P.NONE, _SLOTS, P.TUPLE2, P.BUILD),
                        "refusing to apply pickled state to the class"),
    "class dict state": (_pickle(_global("__main__", "QuantizedWeight8bit"), _SLOTS, P.BUILD),
                         "refusing to apply pickled state to the class"),
    "class by GLOBAL": (_pickle(b"c__main__\nQuantizedWeight8bit\n", P.NONE, _SLOTS, P.TUPLE2, P.BUILD),
                        "refusing to apply pickled state to the class"),
    "instance then class": (_pickle(_global("__main__", "QuantizedWeight8bit"), P.MEMOIZE, P.EMPTY_TUPLE,
                                    P.NEWOBJ, P.POP, P.BINGET + b"\x00", P.NONE, _SLOTS, P.TUPLE2, P.BUILD),
                            "refusing to apply pickled state to the class"),
    "instance slotstate": (_pickle(_quantized(_weight_and_scales() + _SLOTS + P.TUPLE2)),
                           "must be a dict of exactly weight and scales"),
    "instance extra key": (_pickle(_quantized(_weight_and_scales(_u("n_blocks"), _int(99)))),
                           "must be a dict of exactly weight and scales"),
    "instance built twice": (_pickle(_quantized(_weight_and_scales()), _weight_and_scales(), P.BUILD),
                             "not an object this file created and has not yet set up"),
    "dtype state with extra item": (_pickle(_BF16, _dtype_state(*_BF16_STATE, _SLOTS), P.BUILD),
                                    "is not numpy's state of a numeric dtype"),
    "dtype state and slotstate": (_pickle(_BF16, _dtype_state(*_BF16_STATE), _SLOTS, P.TUPLE2, P.BUILD),
                                  "is not numpy's state of a numeric dtype"),
    "dtype dict state": (_pickle(_BF16, _SLOTS, P.BUILD), "is not numpy's state of a numeric dtype"),
    "dtype fields": (_pickle(_BF16, _dtype_state(*_BF16_STATE[:4], _SLOTS, *_BF16_STATE[5:]), P.BUILD),
                     "is not numpy's state of a numeric dtype"),
    "dtype class": (_pickle(_global("numpy", "dtype"), _dtype_state(*_BF16_STATE), P.BUILD),
                    "refusing to apply pickled state to the class numpy.dtype"),
    "bfloat16 class": (_pickle(_global("ml_dtypes", "bfloat16"), P.NONE, _SLOTS, P.TUPLE2, P.BUILD),
                       "refusing to apply pickled state to the class"),
    "ndarray class": (_pickle(_global("numpy", "ndarray"), P.NONE, _SLOTS, P.TUPLE2, P.BUILD),
                      "refusing to apply pickled state to the class numpy.ndarray"),
    "reconstructor": (_pickle(_global("numpy.core.multiarray", "_reconstruct"), _SLOTS, P.BUILD),
                      "refusing to apply pickled state to numpy"),
    "array built twice": (_pickle(_NEW_ARRAY, _array_state(_F4, bytes(12), 3), P.BUILD,
                                  _array_state(_F4, bytes(8), 2), P.BUILD),
                          "not an object this file created and has not yet set up"),
    "array with non-numpy state": (_pickle(_NEW_ARRAY, P.NONE, _SLOTS, P.TUPLE2, P.BUILD),
                                   "an array's pickled state is not numpy's"),
    "array state with an extra item": (_pickle(_NEW_ARRAY, _array_state(_F4, bytes(12), 3)[:-1], _SLOTS,
                                               P.TUPLE, P.BUILD),
                                       "an array's pickled state is not numpy's"),
    "ndarray called": (_pickle(_global("numpy", "ndarray"), _int(2), P.TUPLE1, P.REDUCE),
                       "refusing to call the class numpy.ndarray"),
    "ndarray by NEWOBJ": (_pickle(_global("numpy", "ndarray"), _int(2), P.TUPLE1, P.NEWOBJ),
                          "refusing to create an instance of the class numpy.ndarray"),
    "QuantizedWeight8bit called": (_pickle(_global("__main__", "QuantizedWeight8bit"), _array_ops(_W),
                                           _array_ops(_S), P.TUPLE2, P.REDUCE),
                                   "refusing to call the class"),
    "QuantizedWeight8bit NEWOBJ_EX kwargs": (_pickle(_global("__main__", "QuantizedWeight8bit"), P.EMPTY_TUPLE,
                                                     _SLOTS, P.NEWOBJ_EX),
                                             "refusing to create an instance of the class"),
    "OBJ": (_pickle(P.MARK, _global("numpy", "ndarray"), _int(2), P.OBJ), "INST/OBJ"),
    "INST": (_pickle(P.MARK, _int(2), b"inumpy\nndarray\n"), "INST/OBJ"),
    "reconstructor odd arguments": (_pickle(_global("numpy.core.multiarray", "_reconstruct"),
                                            _global("numpy", "ndarray"), _int(10 ** 9), P.TUPLE1,
                                            P.SHORT_BINBYTES + b"\x01b", P.TUPLE3, P.REDUCE),
                                    "array reconstructor called with unexpected arguments"),
    "SETITEM into the class": (_pickle(_global("__main__", "QuantizedWeight8bit"), _u("n_blocks"), _int(1),
                                       P.SETITEM), "SETITEM into the class"),
    "APPENDS into an array": (_pickle(_array_ops(np.zeros(3, np.float32)), P.MARK, _int(1), P.APPENDS),
                              "APPENDS into an object of type ndarray"),
}


@pytest.mark.parametrize("case", list(_MALICIOUS))
def test_pickled_state_goes_only_to_objects_the_file_created(tmp_path, case):
    payload, message = _MALICIOUS[case]
    file = tmp_path / "tensor00000_000"
    file.write_bytes(payload)
    snapshot = _class_snapshot()
    bf16 = np.dtype(ml_dtypes.bfloat16)
    bf16_state = (hash(bf16), bf16.byteorder, bf16.itemsize, bf16.alignment, bf16.flags, bf16.names)
    with pytest.raises(CheckpointError) as err:
        read_tensor(file)
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith(f"{file}: "), text
    assert message in text, text
    _assert_class_untouched(snapshot)
    bf16 = np.dtype(ml_dtypes.bfloat16)
    assert (hash(bf16), bf16.byteorder, bf16.itemsize, bf16.alignment, bf16.flags, bf16.names) == bf16_state
    assert jax.device_put(np.zeros(2, ml_dtypes.bfloat16)).dtype == ml_dtypes.bfloat16


def test_the_class_payload_would_work_on_a_plain_unpickler(tmp_path):
    """The "class slotstate" payload is a real attack: a plain unpickler, admitting the same
    globals, sets the class's attributes (checked in a child process, which it ruins)."""
    payload = _MALICIOUS["class slotstate"][0]
    code = (
        "import pickle, sys\n"
        "from grokscope.checkpoint import _ALLOWED_GLOBALS\n"
        "from grokscope.quant import QuantizedWeight8bit\n"
        "class U(pickle._Unpickler):\n"
        "    def find_class(self, m, n): return _ALLOWED_GLOBALS[(m, n)]\n"
        "U(open(sys.argv[1], 'rb')).load()\n"
        "print(QuantizedWeight8bit.n_blocks, QuantizedWeight8bit.nbytes)\n")
    file = tmp_path / "payload"
    file.write_bytes(payload)
    out = subprocess.run([sys.executable, "-c", code, str(file)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["99", "7"]


def test_a_malicious_file_in_a_checkpoint_names_the_file(tmp_path, fixture_dir, fixture_config):
    ckpt = _copy(fixture_dir, tmp_path / "ckpt")
    victim = tensor_path(ckpt, 5)
    victim.write_bytes(_MALICIOUS["class slotstate"][0])
    snapshot = _class_snapshot()
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(victim))}: refusing to apply pickled state"):
        load_params(ckpt, fixture_config)
    _assert_class_untouched(snapshot)


# --- C. special files -------------------------------------------------------------------


def _make_special(kind: str, file, monkeypatch) -> str:
    """Puts a `kind` special file at `file`; returns what the error should say about it."""
    file.unlink()
    if kind == "fifo":
        os.mkfifo(file)
        return r"not a regular file \(a FIFO\)"
    if kind == "directory":
        file.mkdir()
        return r"not a regular file \(a directory\)"
    if kind == "symlink loop":
        os.symlink(file.name, file)
        return r"cannot (stat|open) \(Too many levels of symbolic links\)"
    if kind == "device":
        os.symlink("/dev/null", file)
        return r"not a regular file \(a character device\)"
    if kind == "socket":
        monkeypatch.chdir(file.parent)  # a socket's path has a length limit
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.bind(file.name)  # the socket file stays after the socket is closed
        return r"not a regular file \(a socket\)"
    if kind == "dangling symlink":
        os.symlink(file.name + ".gone", file)
        return r"missing"
    raise AssertionError(kind)


_KINDS = ["fifo", "directory", "symlink loop", "device", "socket", "dangling symlink"]


@pytest.mark.parametrize("kind", _KINDS)
def test_special_files_are_refused_by_every_reader(tmp_path, fixture_dir, fixture_config, monkeypatch, kind):
    ckpt = _copy(fixture_dir, tmp_path / "ckpt")
    victim = tensor_path(ckpt, 3)
    said = _make_special(kind, victim, monkeypatch)
    one_line = rf"^{re.escape(str(victim))}: {said}$"
    with _no_hang():
        with pytest.raises(CheckpointError, match=one_line):
            read_tensor(victim)
        with pytest.raises(CheckpointError, match=one_line):
            load_params(ckpt, fixture_config, max_inflight_bytes=1 << 30)
        with pytest.raises(CheckpointError, match=one_line):
            load_params(ckpt, fixture_config, digests={})
        with pytest.raises(CheckpointError, match=rf"^{re.escape(str(victim))}: {said}$"):
            checkpoint_identity(ckpt)


def test_a_fifo_that_appears_after_the_check_does_not_block(tmp_path, monkeypatch):
    fifo = tmp_path / "tensor00000_000"
    os.mkfifo(fifo)
    monkeypatch.setattr(checkpoint, "_regular_size", lambda file: 0)  # as if it were swapped in after the stat
    with _no_hang(), pytest.raises(CheckpointError, match=rf"^{re.escape(str(fifo))}: not a regular file \(a FIFO\)$"):
        read_tensor(fifo)


def _inspect(*args):
    return subprocess.run([sys.executable, "-m", "grokscope.cli", "inspect", *map(str, args)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.mark.parametrize("kind", _KINDS)
def test_inspect_reports_special_files_in_one_line(tmp_path, fixture_dir, monkeypatch, kind):
    ckpt = _copy(fixture_dir, tmp_path / "ckpt")
    victim = tensor_path(ckpt, 3)
    said = _make_special(kind, victim, monkeypatch)
    result = _inspect(ckpt)
    assert result.returncode == 1, result.stderr
    assert re.fullmatch(rf"error: {re.escape(str(victim))}: {said}\n", result.stderr), result.stderr


def test_inspect_reports_an_unlistable_checkpoint_and_os_errors(tmp_path, fixture_dir, monkeypatch, capsys):
    import argparse

    from grokscope import cli

    ckpt = _copy(fixture_dir, tmp_path / "ckpt")
    assert _inspect(ckpt).returncode == 0
    (ckpt / "ckpt-0").rename(ckpt / "elsewhere")
    os.symlink("ckpt-0", ckpt / "ckpt-0")  # a loop where the directory was
    result = _inspect(ckpt)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    (ckpt / "ckpt-0").unlink()
    (ckpt / "elsewhere").rename(ckpt / "ckpt-0")

    def denied(file):
        raise PermissionError(13, "Permission denied", str(file))

    monkeypatch.setattr(checkpoint, "read_tensor", denied)
    assert cli.cmd_inspect(argparse.Namespace(checkpoint_dir=str(ckpt), config=None)) == 1
    err = capsys.readouterr().err
    assert err == f"error: [Errno 13] Permission denied: '{tensor_path(ckpt, 0)}'\n"


@pytest.mark.skipif(os.geteuid() == 0, reason="permissions do not bind root")
def test_an_unreadable_tensor_is_named(tmp_path, fixture_dir, fixture_config):
    ckpt = _copy(fixture_dir, tmp_path / "ckpt")
    victim = tensor_path(ckpt, 3)
    victim.chmod(0)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(victim))}: cannot open \(Permission denied\)$"):
        load_params(ckpt, fixture_config)
    result = _inspect(ckpt)
    assert result.returncode == 1
    assert result.stderr == f"error: {victim}: cannot open (Permission denied)\n"
