"""Reading and writing checkpoints in the Grok-1 release's layout.

Layout: `DIR/ckpt-0/tensor{i:05d}_{shard:03d}`, one file per parameter, `i` running over the
parameters in the params tree's flatten order (module paths sorted as strings, so
`decoder_layer_10` precedes `decoder_layer_2`), `shard` the host index (`000` on one host).
Each file is a pickle (protocol 4) of a numpy array, or of a `QuantizedWeight8bit` whose
class the file names `__main__.QuantizedWeight8bit`.

Files are read with an unpickler that admits only numpy arrays and dtypes (bfloat16 included)
and that one class; nothing else in a file is looked up, let alone executed, and pickled state
is applied only to the objects the unpickler itself created. Only regular files are opened
(a directory, FIFO, socket or device in a tensor's place is refused, without blocking). Every
tensor is checked against `param_shapes(config)` and placed on the mesh as soon as it is read,
in parallel, so host memory holds only the tensors in flight. `load_params` leaves a tensor's
large arrays (from 1 MiB, outside the pickle's frames) in the file, mapped read-only, and
places them one device's shard at a time: the shard is copied out of the mapping, placed, and
the mapping's pages dropped from the process before the next, so besides the placed parameters
host memory holds about one shard per tensor in flight, not the whole tensor twice.

Content digests: `load_params(..., digests={})` also hashes each file's bytes (xxh3_128,
`DIGEST_ALGORITHM`) as they are read, whole file included, in the same pass; the digest equals
`xxhash.xxh3_128(file.read_bytes()).hexdigest()`. `combine_digests` folds them into one, and
`first_difference` names the first parameter whose digest differs. `checkpoint_identity`
(names and sizes only) stays the cheap check that needs no reading.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import io
import math
import mmap
import os
import pickle
import stat
import struct
import sys
import threading
from pathlib import Path
from typing import Any, Mapping

import jax
import ml_dtypes
import numpy as np
import xxhash
from jax.sharding import Mesh

from grokscope.config import ModelConfig
from grokscope.layout import ParamShape, is_quantizable, param_shapes, release_scale_blocks
from grokscope.quant import QuantizedWeight8bit, quantize
from grokscope.sharding import param_sharding, place

__all__ = ["CheckpointError", "read_tensor", "load_params", "save_params", "tensor_path",
           "checkpoint_identity", "check_tensor", "check_file_set", "combine_digests",
           "first_difference", "DIGEST_ALGORITHM"]

DIGEST_ALGORITHM = "xxh3_128"
"""The hash of each tensor file's bytes (`load_params(digests=...)`), as hex (32 digits)."""

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
    """Resolves only `_ALLOWED_GLOBALS`, calls only what numpy's pickles call, and applies
    pickled state (BUILD) only to objects it created itself.

    - REDUCE may call numpy's array reconstructor (as `_reconstruct(numpy.ndarray, (0,), b"b")`,
      the way numpy pickles an array) and `numpy.dtype(typestr or bfloat16, align, copy)`;
      NEWOBJ / NEWOBJ_EX may create a bare `QuantizedWeight8bit`. Nothing else is called:
      any other REDUCE, NEWOBJ, NEWOBJ_EX, and INST / OBJ (which call a class) are refused.
    - BUILD is applied once to each object so created, and only with the state its kind
      has: an array takes numpy's `(version, shape, dtype, is_fortran, data)` tuple; a
      QuantizedWeight8bit a dict with exactly `weight` and `scales` (no slot state); a dtype
      numpy's 8-item dtype state. BUILD on anything else (a class or other global, a dtype
      or array the file did not create, an object already given its state) is refused, so a
      file cannot set attributes on `QuantizedWeight8bit` or any other global.
    - A dtype's state is never applied: numpy returns its shared dtype singletons from
      `np.dtype(...)`, and applying a file's state to one would mutate it for the whole
      process (for bfloat16 this changes its hash, after which JAX no longer recognizes the
      dtype). Only the byte order is taken from it.
    - SETITEM(S), APPEND(S) and ADDITEMS add only to the dicts, lists and sets of the file.

    Every refusal is a CheckpointError naming the file.
    """

    def __init__(self, file, name: str, mapped: "_MappedFile | None" = None):
        super().__init__(file)
        self._name = name
        # id -> [object, BUILDs still allowed]; holding the object keeps its id unique.
        self._unbuilt: dict[int, list] = {}
        self._mapped = mapped

    def _load_binbytes(self):
        (n,) = struct.unpack("<I", self.read(4))
        self._push_bytes(n)

    def _load_binbytes8(self):
        (n,) = struct.unpack("<Q", self.read(8))
        if n > sys.maxsize:
            raise self._refuse("BINBYTES8 exceeds the system's maximum size")
        self._push_bytes(n)

    def _push_bytes(self, n: int):
        """A bytes payload; a large one outside a pickle frame, when the file is mapped, is left
        in the file (`_Payload`) and an array built from it is a view of the mapping."""
        if self._mapped is None or n < _MAPPED_MIN_BYTES or self._unframer.current_frame is not None:
            self.append(self.read(n))
        else:
            self.append(self._mapped.skip(n))

    def _refuse(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self._name}: {what}")

    def _created(self, obj: Any) -> Any:
        entry = self._unbuilt.setdefault(id(obj), [obj, 0])
        entry[1] += 1
        return obj

    def _load_reduce(self):
        args = self.stack.pop()
        func = self.stack[-1]
        if func is _RECONSTRUCT:
            if not (type(args) is tuple and len(args) == 3 and args[0] is np.ndarray
                    and type(args[1]) is tuple and args[1] == (0,)
                    and type(args[2]) in (bytes, str) and args[2] in (b"b", "b")):
                raise self._refuse("numpy's array reconstructor called with unexpected arguments")
        elif func is np.dtype:
            if not (type(args) is tuple and len(args) == 3
                    and (type(args[0]) is str or args[0] is ml_dtypes.bfloat16)
                    and type(args[1]) is bool and type(args[2]) is bool):
                raise self._refuse("numpy.dtype called with unexpected arguments")
        else:
            raise self._refuse(f"refusing to call {_describe(func)}")
        self.stack[-1] = self._created(func(*args))

    def _new_quantized(self, cls, args, kwargs):
        if cls is not QuantizedWeight8bit or type(args) is not tuple or args \
                or type(kwargs) is not dict or kwargs:
            raise self._refuse(f"refusing to create an instance of {_describe(cls)} "
                               f"(only a bare QuantizedWeight8bit may be created so)")
        self.append(self._created(QuantizedWeight8bit.__new__(QuantizedWeight8bit)))

    def _load_newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        self._new_quantized(cls, args, {})

    def _load_newobj_ex(self):
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self._new_quantized(cls, args, kwargs)

    def _instantiate(self, klass, args):
        raise self._refuse(f"refusing to call {_describe(klass)} (INST/OBJ opcodes)")

    def _load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        entry = self._unbuilt.get(id(inst))
        if entry is None or entry[0] is not inst:
            raise self._refuse(f"refusing to apply pickled state to {_describe(inst)}, "
                               f"which is not an object this file created and has not yet set up")
        entry[1] -= 1
        if entry[1] == 0:
            del self._unbuilt[id(inst)]
        if type(inst) is np.ndarray:
            if not _is_array_state(state):
                raise self._refuse("an array's pickled state is not numpy's (version, shape, dtype, "
                                   "is_fortran, data)")
            if type(state[4]) is _Payload:
                self.stack[-1] = self._mapped_array(state)
            else:
                inst.__setstate__(state)
        elif type(inst) is QuantizedWeight8bit:
            if type(state) is not dict or set(state) != {"weight", "scales"}:
                raise self._refuse("a QuantizedWeight8bit's pickled state must be a dict of exactly "
                                   "weight and scales")
            inst.weight, inst.scales = state["weight"], state["scales"]
        elif isinstance(inst, np.dtype):
            if not _is_dtype_state(state):
                raise self._refuse(f"the pickled state of dtype {inst} is not numpy's state of a "
                                   f"numeric dtype")
            if state[1] == ">":
                self.stack[-1] = inst.newbyteorder(">")
        else:  # nothing else is ever recorded as created
            raise self._refuse(f"refusing to apply pickled state to {_describe(inst)}")

    def _mapped_array(self, state) -> np.ndarray:
        """A read-only array over the file's own bytes (`_Payload`), checked as numpy's
        __setstate__ checks its data: exactly the bytes of the shape and dtype."""
        _, shape, dtype, fortran, payload = state
        if dtype.hasobject or any(n < 0 for n in shape) \
                or payload.length != math.prod(shape) * dtype.itemsize:
            raise self._refuse(f"an array's data is {payload.length} bytes, not those of shape "
                               f"{shape} and dtype {dtype}")
        return np.ndarray(shape, dtype, buffer=self._mapped.mapping(), offset=payload.offset,
                          order="F" if fortran else "C")

    def _target(self, kind: type, opcode: str):
        target = self.stack[-1]
        if type(target) is not kind:
            raise self._refuse(f"{opcode} into {_describe(target)}; only into a {kind.__name__}")
        return target

    def _load_setitem(self):
        value, key = self.stack.pop(), self.stack.pop()
        self._target(dict, "SETITEM")[key] = value

    def _load_setitems(self):
        items = self.pop_mark()
        target = self._target(dict, "SETITEMS")
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]

    def _load_append(self):
        value = self.stack.pop()
        self._target(list, "APPEND").append(value)

    def _load_appends(self):
        items = self.pop_mark()
        self._target(list, "APPENDS").extend(items)

    def _load_additems(self):
        items = self.pop_mark()
        self._target(set, "ADDITEMS").update(items)

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.REDUCE[0]] = _load_reduce
    dispatch[pickle.NEWOBJ[0]] = _load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = _load_newobj_ex
    dispatch[pickle.BUILD[0]] = _load_build
    dispatch[pickle.SETITEM[0]] = _load_setitem
    dispatch[pickle.SETITEMS[0]] = _load_setitems
    dispatch[pickle.APPEND[0]] = _load_append
    dispatch[pickle.APPENDS[0]] = _load_appends
    dispatch[pickle.ADDITEMS[0]] = _load_additems
    dispatch[pickle.BINBYTES[0]] = _load_binbytes
    dispatch[pickle.BINBYTES8[0]] = _load_binbytes8

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise CheckpointError(
                f"{self._name}: refusing to unpickle global {module}.{name}; a checkpoint file may "
                f"only hold numpy arrays and __main__.QuantizedWeight8bit") from None

    def persistent_load(self, pid):
        raise CheckpointError(f"{self._name}: persistent ids are not allowed in a checkpoint file")


def _describe(obj: Any) -> str:
    """Names an object by its type only (a file's objects' reprs may be huge or misleading)."""
    if isinstance(obj, type):
        return f"the class {obj.__module__}.{obj.__qualname__}"
    if callable(obj) and hasattr(obj, "__qualname__"):
        return f"{getattr(obj, '__module__', None) or '?'}.{obj.__qualname__}"
    return f"an object of type {type(obj).__qualname__}"


def _is_array_state(state: Any) -> bool:
    """numpy's ndarray state: (1, shape, dtype, is_fortran, bytes, or a list for object arrays)."""
    if type(state) is not tuple or len(state) != 5:
        return False
    version, shape, dtype, fortran, data = state
    return (type(version) is int and type(shape) is tuple and all(type(n) is int for n in shape)
            and isinstance(dtype, np.dtype) and type(fortran) is bool and type(data) in (bytes, list, _Payload))


def _is_dtype_state(state: Any) -> bool:
    """numpy's state of a dtype with no fields, subarray or metadata:
    (3, byteorder, None, None, None, elsize, alignment, flags)."""
    return (type(state) is tuple and len(state) == 8 and type(state[0]) is int and state[0] == 3
            and type(state[1]) is str and state[1] in ("<", ">", "|", "=")
            and all(x is None for x in state[2:5])
            and all(type(x) is int for x in state[5:]))


_MAPPED_MIN_BYTES = 1 << 20
"""Payloads from this size on stay in the file when it is read mapped (`_read_tensor(mapped=True)`)."""


class _Payload(tuple):
    """(offset, length) of a bytes payload left in the file."""

    offset = property(lambda self: self[0])
    length = property(lambda self: self[1])


class _MappedFile:
    """The open tensor file, for payloads left in it: `skip` steps the reader over one (hashing
    it when digesting, in chunks) and `mapping` is the file mapped read-only, made on first use."""

    def __init__(self, handle, reader, size: int, name: str):
        self._handle, self._reader, self._size, self._name = handle, reader, size, name
        self._mapping = None

    def skip(self, n: int) -> _Payload:
        offset = self._handle.tell()
        if offset + n > self._size:
            raise CheckpointError(f"{self._name}: truncated (a {n}-byte array runs past the end of the file)")
        if isinstance(self._reader, _HashingReader):
            left = n
            while left:
                chunk = self._reader.read(min(left, 1 << 22))
                if not chunk:
                    raise CheckpointError(f"{self._name}: truncated while reading")
                left -= len(chunk)
        else:
            self._handle.seek(n, os.SEEK_CUR)
        return _Payload((offset, n))

    def mapping(self) -> mmap.mmap:
        if self._mapping is None:
            self._mapping = mmap.mmap(self._handle.fileno(), 0, access=mmap.ACCESS_READ)
        return self._mapping


class _HashingReader:
    """A binary file that passes every byte read from it to `hasher`, in order.

    The unpickler reads the file sequentially through this object; `finish` hashes what
    follows the pickle, so the digest covers the whole file, read once.
    """

    def __init__(self, file, hasher):
        self._file, self._hasher = file, hasher

    def read(self, n: int = -1) -> bytes:
        data = self._file.read(n)
        self._hasher.update(data)
        return data

    def readline(self, limit: int = -1) -> bytes:
        data = self._file.readline(limit)
        self._hasher.update(data)
        return data

    def readinto(self, buffer) -> int:
        n = self._file.readinto(buffer)
        with memoryview(buffer) as view:
            self._hasher.update(view[:n])
        return n

    def finish(self) -> str:
        while chunk := self._file.read(1 << 22):
            self._hasher.update(chunk)
        return self._hasher.hexdigest()


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _not_regular(file: Path, mode: int) -> CheckpointError:
    kind = next((name for test, name in _FILE_KINDS if test(mode)), f"mode {stat.S_IFMT(mode):o}")
    return CheckpointError(f"{file}: not a regular file ({kind})")


def _os_error(file: Path, action: str, e: OSError) -> CheckpointError:
    if isinstance(e, FileNotFoundError):
        return CheckpointError(f"{file}: missing")
    return CheckpointError(f"{file}: cannot {action} ({e.strerror or type(e).__name__})")


def _regular_size(file: Path) -> int:
    """The size of `file` (symlinks followed); CheckpointError unless it is a regular file."""
    try:
        st = os.stat(file)
    except OSError as e:
        raise _os_error(file, "stat", e) from None
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(file, st.st_mode)
    return st.st_size


def _open_regular(file: Path):
    """Opens a regular file for reading; anything else is refused without blocking.

    Checked before opening (a device is never opened), opened non-blocking (a FIFO put in
    its place meanwhile cannot stall the open) and checked again on the open descriptor.
    """
    _regular_size(file)
    try:
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise _os_error(file, "open", e) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(file, st.st_mode)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb"), st.st_size
    except BaseException:
        os.close(fd)
        raise


def _check_array(x: Any, what: str) -> np.ndarray:
    if type(x) is not np.ndarray:
        raise CheckpointError(f"{what}: expected a numpy array, got {type(x).__name__}")
    if x.dtype.hasobject or x.dtype.fields is not None:
        raise CheckpointError(f"{what}: expected a numeric array, got dtype {x.dtype}")
    return x


def read_tensor(file: str | os.PathLike) -> np.ndarray | QuantizedWeight8bit:
    """Safely unpickles one checkpoint file into a numpy array or a QuantizedWeight8bit.

    Raises CheckpointError, one line naming the file, for anything but a regular file
    holding such a pickle (a directory, FIFO, socket or device is refused without blocking).
    """
    return _read_tensor(Path(file), digest=False)[0]


def _read_tensor(file: Path, digest: bool, mapped: bool = False) -> tuple[np.ndarray | QuantizedWeight8bit, str | None]:
    """`read_tensor`, and with `digest` the xxh3_128 hex digest of the file's bytes, all of them.

    With `mapped`, the large arrays are read-only views of the file mapped into memory (its
    pages are read when used, and the mapping lives as long as the arrays); else they are read
    into memory."""
    handle, size = _open_regular(file)
    with handle:
        if size == 0:
            raise CheckpointError(f"{file}: empty file")
        reader = _HashingReader(handle, xxhash.xxh3_128()) if digest else handle
        try:
            payloads = _MappedFile(handle, reader, size, str(file)) if mapped else None
            value = _SafeUnpickler(reader, str(file), payloads).load()
            hexdigest = reader.finish() if digest else None
        except CheckpointError:
            raise
        except OSError as e:
            raise _os_error(file, "read", e) from None
        except Exception as e:  # truncated or malformed pickles raise a variety of errors
            detail = " ".join(f"{type(e).__name__}: {e}".split())
            raise CheckpointError(f"{file}: truncated or corrupt pickle ({detail})") from None
    if isinstance(value, QuantizedWeight8bit):
        extra = sorted(set(vars(value)) - {"weight", "scales"})
        if extra or not {"weight", "scales"} <= set(vars(value)):
            raise CheckpointError(f"{file}: QuantizedWeight8bit must have exactly weight and scales, "
                                  f"got {sorted(vars(value))}")
        return QuantizedWeight8bit(weight=_check_array(value.weight, f"{file}: weight"),
                                   scales=_check_array(value.scales, f"{file}: scales")), hexdigest
    return _check_array(value, str(file)), hexdigest


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
    """Raises CheckpointError unless ckpt-0/ holds exactly tensor files 0..n-1 for `shard`.

    Checks the names only; `read_tensor` and `load_params` refuse entries that are not
    regular files.
    """
    checkpoint_dir = Path(checkpoint_dir)
    ckpt = checkpoint_dir / "ckpt-0"
    try:
        if not ckpt.is_dir():
            raise CheckpointError(f"{checkpoint_dir}: no ckpt-0/ directory "
                                  f"(expected {ckpt}/tensor00000_{shard:03d} ...)")
        present = sorted(p.name for p in ckpt.iterdir() if p.name.startswith("tensor"))
    except OSError as e:
        raise _os_error(ckpt, "list", e) from None
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
                max_workers: int = 8, max_inflight_bytes: int | None = None, shard: int = 0,
                digests: dict | None = None) -> dict:
    """Loads `checkpoint_dir/ckpt-0` into a haiku params dict, validated, placed on `mesh`.

    Args:
      checkpoint_dir: the directory that holds `ckpt-0/`.
      config: the model the checkpoint is for.
      mesh: place each tensor on this mesh by the release's partition rules; default one device.
      max_workers: tensors read and placed concurrently.
      max_inflight_bytes: host memory that tensors being placed may take at once besides
        what they place (a tensor counts twice its largest device shard, or its whole file
        without a mesh); one larger tensor still goes alone. Default: twice the largest such
        count, so that host memory peaks about 4 shards above the placed parameters.
      shard: the host index in the file names.
      digests: if a dict, it is filled with `{param path: hex digest}` for every tensor, the
        `DIGEST_ALGORITHM` (xxh3_128) of its file's bytes, whole file, hashed as they are read
        (no second pass); equal to `xxhash.xxh3_128(file.read_bytes()).hexdigest()`.

    Raises:
      CheckpointError: naming the file and parameter of the first problem (also for a tensor
        path that is not a regular file: a directory, FIFO, socket, device or symlink loop).
    """
    checkpoint_dir = Path(checkpoint_dir)
    shapes = param_shapes(config)
    check_file_set(checkpoint_dir, len(shapes), shard)
    device = None if mesh is not None else jax.devices()[0]

    sizes = [_regular_size(tensor_path(checkpoint_dir, i, shard)) for i in range(len(shapes))]
    # What placing a tensor holds besides what it places: one device's shard as copied out of the
    # mapped file and the file's pages it read (a whole tensor without a mesh).
    in_flight = [size if mesh is None else _shard_bytes(path, shapes[path], mesh, size)
                 for size, path in zip(sizes, shapes)]
    if max_inflight_bytes is None:
        max_inflight_bytes = 2 * max(in_flight)
    budget = _ByteBudget(max_inflight_bytes)
    hashing = digests is not None

    def load_one(index_path):
        index, path = index_path
        file = tensor_path(checkpoint_dir, index, shard)
        with budget.reserve(2 * in_flight[index]):
            value, digest = _read_tensor(file, hashing, mapped=True)
            check_tensor(value, path, shapes[path], str(file))
            if mesh is None:
                placed = jax.device_put(value, device)
            elif jax.process_count() == 1:
                placed = jax.tree.map(_place_mapped, value, param_sharding(path, value, mesh))
            else:
                placed = place(value, param_sharding(path, value, mesh))
            jax.block_until_ready(placed)
            del value
        return path, placed, digest

    params: dict[str, dict[str, Any]] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=max_workers) as pool:
        for path, value, digest in pool.map(load_one, enumerate(shapes)):
            module, name = path.rsplit("/", 1)
            params.setdefault(module, {})[name] = value
            if hashing:
                digests[path] = digest
    return params


def _shard_bytes(path: str, expected: ParamShape, mesh: Mesh, file_size: int) -> int:
    """About the bytes of one device's shard of a tensor file of `file_size` (the largest of its
    weight's and its scales' shards, as a fraction of the file)."""
    from grokscope.layout import fit_spec, partition_spec, split_count

    sizes = dict(mesh.shape)
    return -(-file_size // split_count(fit_spec(partition_spec(path, expected.shape), expected.shape, sizes), sizes))


def _release(array: np.ndarray) -> None:
    """Drops the pages of the file mapping under `array` (if any) from this process's memory:
    they stay in the page cache, and are read again (without disk reads) if used again."""
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, mmap.mmap):
        base.madvise(getattr(mmap, "MADV_DONTNEED", 0) or mmap.MADV_NORMAL)


_COPY_SPAN_BYTES = 32 << 20


def _copy_out(part: np.ndarray) -> np.ndarray:
    """A contiguous copy of `part` (a view of a mapped file, or an array), made in blocks that span
    at most `_COPY_SPAN_BYTES` of the file, the mapping's pages dropped after each: a shard strided
    through the whole file (a split of the last dim) never has the whole file mapped at once (the
    kernel maps the cached pages around each one read, which would be all of them)."""
    base = part
    while isinstance(base, np.ndarray):
        base = base.base
    if not isinstance(base, mmap.mmap) or part.ndim == 0:
        return np.ascontiguousarray(part)
    out = np.empty(part.shape, part.dtype)
    # cut along the first axis whose one step spans at most a block, in runs of `step` along it
    axis = next((a for a in range(part.ndim) if abs(part.strides[a]) <= _COPY_SPAN_BYTES), part.ndim - 1)
    step = max(1, _COPY_SPAN_BYTES // max(abs(part.strides[axis]), 1))
    for outer in np.ndindex(*part.shape[:axis]):
        for start in range(0, part.shape[axis], step):
            block = outer + (slice(start, start + step),)
            out[block] = part[block]
            _release(part)
    return out


def _place_mapped(leaf: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """Places `leaf` (a view of a mapped file, or an array) one device at a time: each device's
    shard is copied out of the file, placed, and its pages dropped before the next, so only one
    shard is ever in host memory besides the placed parameters."""
    shards, placed_key, copy = [], None, None
    for device, index in sharding.addressable_devices_indices_map(leaf.shape).items():
        key = tuple((i.start, i.stop, i.step) if isinstance(i, slice) else i for i in index)
        if key != placed_key:
            copy = None  # the previous shard is placed: let its host copy go first
            copy, placed_key = _copy_out(leaf[index]), key
        shards.append(jax.device_put(copy, device))
        jax.block_until_ready(shards[-1])
        _release(leaf)
    return jax.make_array_from_single_device_arrays(leaf.shape, sharding, shards)


def combine_digests(digests: Mapping[str, str]) -> str:
    """One hex digest over a whole checkpoint's tensor digests.

    xxh3_128 of the UTF-8 text made of one line `f"{path}\t{digest}\n"` per entry, the
    paths in sorted (code point) order; so it changes with any tensor's bytes, with a
    renamed parameter and with a tensor added or removed.
    """
    hasher = xxhash.xxh3_128()
    for path in sorted(digests):
        hasher.update(f"{path}\t{digests[path]}\n".encode())
    return hasher.hexdigest()


def first_difference(stored: Mapping[str, str], current: Mapping[str, str], order) -> str | None:
    """The first path, in `order` (e.g. `param_shapes(config)`), whose digest differs between
    `stored` and `current` or is missing from either; then, in sorted order, any other path
    the two do not agree on. None when they agree on every path."""
    def differs(path):
        return path not in stored or path not in current or stored[path] != current[path]

    order = list(order)
    for path in order:
        if differs(path):
            return path
    listed = set(order)
    return next((path for path in sorted(set(stored) | set(current)) if path not in listed and differs(path)), None)


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

    Float weights the release stores as int8 are quantized (per-block symmetric int8 with the
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
    """Path and a hash of the tensor index (file names and sizes): cheap, changes with the files.

    Reads no file's contents (see `load_params(digests=...)` for that). Raises
    CheckpointError, naming the entry, for a `tensor*` entry that is not a regular file or
    cannot be looked at (a symlink loop, a permission error).
    """
    ckpt = Path(checkpoint_dir) / "ckpt-0"
    try:
        files = [p for p in ckpt.iterdir() if p.name.startswith("tensor")]
    except OSError as e:
        raise _os_error(ckpt, "list", e) from None
    entries = sorted((p.name, _regular_size(p)) for p in files)
    digest = hashlib.sha256(repr(entries).encode()).hexdigest()
    return {"path": str(Path(checkpoint_dir).resolve()), "num_files": len(entries),
            "total_bytes": sum(size for _, size in entries), "index_sha256": digest}
