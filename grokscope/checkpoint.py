"""Reading and writing checkpoints in the Grok-1 release's layout.

Layout: `DIR/ckpt-0/tensor{i:05d}_{shard:03d}`, one file per parameter, `i` running over the
parameters in the params tree's flatten order (module paths sorted as strings, so
`decoder_layer_10` precedes `decoder_layer_2`), `shard` the host index (`000` on one host).
Each file is a pickle (protocol 4) of a numpy array, or of a `QuantizedWeight8bit` whose
class the file names `__main__.QuantizedWeight8bit`.

Files are read with an unpickler that admits only numpy arrays and dtypes (bfloat16 included)
and that one class; nothing else in a file is looked up, let alone executed. Every tensor is
checked against `param_shapes(config)` and placed on the mesh as soon as it is read, in
parallel, so host memory holds only the tensors in flight.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import io
import os
import pickle
import threading
from pathlib import Path
from typing import Any, Mapping

import jax
import ml_dtypes
import numpy as np
from jax.sharding import Mesh

from grokscope.config import ModelConfig
from grokscope.forward import ParamShape, is_quantizable, param_shapes, release_scale_blocks
from grokscope.quant import QuantizedWeight8bit, quantize
from grokscope.sharding import param_sharding, place

__all__ = ["CheckpointError", "read_tensor", "load_params", "save_params", "tensor_path",
           "checkpoint_identity", "check_tensor", "check_file_set"]

_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]

_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("ml_dtypes", "bfloat16"): ml_dtypes.bfloat16,
    ("__main__", "QuantizedWeight8bit"): QuantizedWeight8bit,
}

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16))


class CheckpointError(ValueError):
    """A checkpoint file is missing, extra, unreadable, unsafe or of the wrong shape/dtype."""


class _SafeUnpickler(pickle._Unpickler):
    """Resolves only `_ALLOWED_GLOBALS`; never applies pickled state to a dtype.

    numpy returns its shared dtype singletons from `np.dtype(...)`, and applying a file's
    dtype state to one (pickle's BUILD) would mutate it for the whole process (for
    bfloat16 this changes its hash, after which JAX no longer recognises the dtype).
    Only the byte order is taken from that state.
    """

    def __init__(self, file, name: str):
        super().__init__(file)
        self._name = name

    def _load_build(self):
        if isinstance(self.stack[-2], np.dtype):
            state = self.stack.pop()
            if isinstance(state, tuple) and len(state) > 1 and state[1] == ">":
                self.stack[-1] = self.stack[-1].newbyteorder(">")
            return
        super().load_build()

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.BUILD[0]] = _load_build

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise CheckpointError(
                f"{self._name}: refusing to unpickle global {module}.{name}; a checkpoint file may "
                f"only hold numpy arrays and __main__.QuantizedWeight8bit") from None

    def persistent_load(self, pid):
        raise CheckpointError(f"{self._name}: persistent ids are not allowed in a checkpoint file")


def _check_array(x: Any, what: str) -> np.ndarray:
    if type(x) is not np.ndarray:
        raise CheckpointError(f"{what}: expected a numpy array, got {type(x).__name__}")
    if x.dtype.hasobject or x.dtype.fields is not None:
        raise CheckpointError(f"{what}: expected a numeric array, got dtype {x.dtype}")
    return x


def read_tensor(file: str | os.PathLike) -> np.ndarray | QuantizedWeight8bit:
    """Safely unpickles one checkpoint file into a numpy array or a QuantizedWeight8bit."""
    file = Path(file)
    try:
        handle = open(file, "rb")
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing") from None
    with handle:
        if os.fstat(handle.fileno()).st_size == 0:
            raise CheckpointError(f"{file}: empty file")
        try:
            # Streamed from the file: a tensor's bytes are held once as read, once as the array.
            value = _SafeUnpickler(handle, str(file)).load()
        except CheckpointError:
            raise
        except Exception as e:  # truncated or malformed pickles raise a variety of errors
            raise CheckpointError(f"{file}: truncated or corrupt pickle ({type(e).__name__}: {e})") from None
    if isinstance(value, QuantizedWeight8bit):
        extra = sorted(set(vars(value)) - {"weight", "scales"})
        if extra or not {"weight", "scales"} <= set(vars(value)):
            raise CheckpointError(f"{file}: QuantizedWeight8bit must have exactly weight and scales, "
                                  f"got {sorted(vars(value))}")
        return QuantizedWeight8bit(weight=_check_array(value.weight, f"{file}: weight"),
                                   scales=_check_array(value.scales, f"{file}: scales"))
    return _check_array(value, str(file))


def check_tensor(value: Any, path: str, expected: ParamShape, file: str) -> None:
    """Raises CheckpointError unless `value` fits the parameter `path`."""
    where = f"{file} ({path})"
    if isinstance(value, QuantizedWeight8bit):
        if not is_quantizable(path):
            raise CheckpointError(f"{where}: expected a plain {expected.dtype} array, got QuantizedWeight8bit")
        w, s = value.weight, value.scales
        if w.dtype != np.int8:
            raise CheckpointError(f"{where}: weight: expected int8, got {w.dtype}")
        if tuple(w.shape) != expected.shape:
            raise CheckpointError(f"{where}: weight: expected shape {expected.shape}, got {tuple(w.shape)}")
        n_in, n_out = w.shape[-2], w.shape[-1]
        if s.dtype not in _FLOAT_DTYPES:
            raise CheckpointError(f"{where}: scales: expected bfloat16/float32, got {s.dtype}")
        if s.ndim != w.ndim or s.shape[:-2] != w.shape[:-2] or s.shape[-1] != n_out \
                or s.shape[-2] < 1 or n_in % s.shape[-2]:
            raise CheckpointError(
                f"{where}: scales: expected shape {w.shape[:-2] + ('n_blocks', n_out)} with n_blocks "
                f"dividing {n_in}, got {tuple(s.shape)}")
        return
    if tuple(value.shape) != expected.shape:
        raise CheckpointError(f"{where}: expected shape {expected.shape}, got {tuple(value.shape)}")
    if value.dtype not in _FLOAT_DTYPES:
        wanted = "int8 QuantizedWeight8bit or a float array" if is_quantizable(path) else "float32/bfloat16"
        raise CheckpointError(f"{where}: expected {wanted}, got {value.dtype}")


def tensor_path(checkpoint_dir: str | os.PathLike, index: int, shard: int = 0) -> Path:
    return Path(checkpoint_dir) / "ckpt-0" / f"tensor{index:05d}_{shard:03d}"


def check_file_set(checkpoint_dir: str | os.PathLike, n: int, shard: int = 0) -> None:
    """Raises CheckpointError unless ckpt-0/ holds exactly tensor files 0..n-1 for `shard`."""
    checkpoint_dir = Path(checkpoint_dir)
    ckpt = checkpoint_dir / "ckpt-0"
    if not ckpt.is_dir():
        raise CheckpointError(f"{checkpoint_dir}: no ckpt-0/ directory (expected {ckpt}/tensor00000_{shard:03d} ...)")
    present = sorted(p.name for p in ckpt.iterdir() if p.name.startswith("tensor"))
    expected = {f"tensor{i:05d}_{shard:03d}" for i in range(n)}
    missing = sorted(expected - set(present))
    if missing:
        raise CheckpointError(f"{ckpt}: {len(missing)} of {n} tensor files missing, first {missing[0]}")
    extra = [p for p in present if p.endswith(f"_{shard:03d}") and p not in expected]
    if extra:
        raise CheckpointError(f"{ckpt}: {len(extra)} unexpected tensor files for a {n}-parameter model, "
                              f"first {extra[0]}; is the config right?")


class _ByteBudget:
    """Blocks readers while more than `limit` bytes are in flight (one tensor always may go)."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def reserve(self, n: int):
        with self._cond:
            self._cond.wait_for(lambda: self.used == 0 or self.used + n <= self.limit)
            self.used += n
        try:
            yield
        finally:
            with self._cond:
                self.used -= n
                self._cond.notify_all()


def load_params(checkpoint_dir: str | os.PathLike, config: ModelConfig, mesh: Mesh | None = None,
                max_workers: int = 8, max_inflight_bytes: int | None = None, shard: int = 0) -> dict:
    """Loads `checkpoint_dir/ckpt-0` into a haiku params dict, validated, placed on `mesh`.

    Args:
      checkpoint_dir: the directory that holds `ckpt-0/`.
      config: the model the checkpoint is for.
      mesh: place each tensor on this mesh by the release's partition rules; default one device.
      max_workers: tensors read and placed concurrently.
      max_inflight_bytes: host memory that tensors being read may take at once (a tensor
        is counted twice: as read and as placed); one larger tensor still goes alone.
        Default: twice the largest tensor file, so that host memory peaks below what the
        placed parameters take + 2 x the largest tensor.
      shard: the host index in the file names.

    Raises:
      CheckpointError: naming the file and parameter of the first problem.
    """
    checkpoint_dir = Path(checkpoint_dir)
    shapes = param_shapes(config)
    check_file_set(checkpoint_dir, len(shapes), shard)
    device = None if mesh is not None else jax.devices()[0]

    if max_inflight_bytes is None:
        max_inflight_bytes = 2 * max(tensor_path(checkpoint_dir, i, shard).stat().st_size for i in range(len(shapes)))
    budget = _ByteBudget(max_inflight_bytes)

    def load_one(index_path):
        index, path = index_path
        file = tensor_path(checkpoint_dir, index, shard)
        with budget.reserve(2 * file.stat().st_size):
            value = read_tensor(file)
            check_tensor(value, path, shapes[path], str(file))
            target = param_sharding(path, value, mesh) if mesh is not None else device
            placed = place(value, target) if mesh is not None else jax.device_put(value, target)
            jax.block_until_ready(placed)
            del value
        return path, placed

    params: dict[str, dict[str, Any]] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=max_workers) as pool:
        for path, value in pool.map(load_one, enumerate(shapes)):
            module, name = path.rsplit("/", 1)
            params.setdefault(module, {})[name] = value
    return params


class _CheckpointPickler(pickle._Pickler):
    """Writes the release's pickles: class names as the official code's files have them."""

    _NAMES = {
        id(_RECONSTRUCT): ("numpy.core.multiarray", "_reconstruct"),
        id(QuantizedWeight8bit): ("__main__", "QuantizedWeight8bit"),
        id(ml_dtypes.bfloat16): ("ml_dtypes", "bfloat16"),
    }

    # The dtype state the release's files carry for bfloat16 (written by ml_dtypes 0.3);
    # readers that apply it to their bfloat16 singleton (numpy's default unpickler does)
    # get back exactly the flags they already have.
    _BFLOAT16_STATE = (3, "<", None, None, None, 2, 2, 80)

    def reducer_override(self, obj):
        if type(obj) is type(np.dtype(ml_dtypes.bfloat16)) and obj == np.dtype(ml_dtypes.bfloat16):
            return np.dtype, (ml_dtypes.bfloat16, False, True), self._BFLOAT16_STATE
        return NotImplemented

    def save_global(self, obj, name=None):
        names = self._NAMES.get(id(obj))
        if names is None:
            return super().save_global(obj, name)
        module, qualname = names
        self.save(module)
        self.save(qualname)
        self.write(pickle.STACK_GLOBAL)
        self.memoize(obj)


def _dump(value: Any, file: Path) -> None:
    if isinstance(value, QuantizedWeight8bit):
        value = QuantizedWeight8bit(weight=np.asarray(value.weight), scales=np.asarray(value.scales))
    else:
        value = np.asarray(value)
    buffer = io.BytesIO()
    _CheckpointPickler(buffer, protocol=4).dump(value)
    tmp = file.with_name(file.name + ".partial")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, file)


def save_params(params: Mapping[str, Mapping[str, Any]], checkpoint_dir: str | os.PathLike,
                config: ModelConfig, quantize_weights: bool = True, shard: int = 0) -> Path:
    """Writes `params` as `checkpoint_dir/ckpt-0/tensor{i:05d}_{shard:03d}`.

    Float weights the release stores as int8 are quantised (per-block symmetric int8 with the
    release's block counts) unless `quantize_weights` is False. Returns `checkpoint_dir`.
    """
    checkpoint_dir = Path(checkpoint_dir)
    shapes = param_shapes(config)
    flat = {f"{m}/{n}": v for m, values in params.items() for n, v in values.items()}
    if set(flat) != set(shapes):
        missing, extra = sorted(set(shapes) - set(flat)), sorted(set(flat) - set(shapes))
        raise ValueError(f"save_params: params do not match the config: missing {missing[:3]}, extra {extra[:3]}")
    (checkpoint_dir / "ckpt-0").mkdir(parents=True, exist_ok=True)
    for index, path in enumerate(shapes):
        value = jax.device_get(flat[path])
        if quantize_weights and is_quantizable(path) and not isinstance(value, QuantizedWeight8bit):
            value = quantize(value, release_scale_blocks(path, value.shape))
        check_tensor(value if isinstance(value, QuantizedWeight8bit) else np.asarray(value),
                     path, shapes[path], path)
        _dump(value, tensor_path(checkpoint_dir, index, shard))
    return checkpoint_dir


def checkpoint_identity(checkpoint_dir: str | os.PathLike) -> dict[str, Any]:
    """Path and a hash of the tensor index (file names and sizes): cheap, changes with the files."""
    ckpt = Path(checkpoint_dir) / "ckpt-0"
    entries = sorted((p.name, p.stat().st_size) for p in ckpt.iterdir() if p.name.startswith("tensor"))
    digest = hashlib.sha256(repr(entries).encode()).hexdigest()
    return {"path": str(Path(checkpoint_dir).resolve()), "num_files": len(entries),
            "total_bytes": sum(size for _, size in entries), "index_sha256": digest}
