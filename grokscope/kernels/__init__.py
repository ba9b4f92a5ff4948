"""Native CPU kernels for decode-sized products with int8 and bfloat16 weights (XLA FFI).

A decode step multiplies a few rows of activations by weights that are read once, so it is
bound by memory reads; XLA's CPU backend widens an int8 or bfloat16 operand before its dot and
reads well below the machine's bandwidth. `cpu.cc` reads the narrow values and widens them in
registers:

  int8_rows(x, w, scales, expert, valid)  rows of x [R, K] times expert `expert` of an int8
      weight w [E, K, N] with float32 scale blocks [E, B, N]; rows from `valid` on are zero.
  bf16_rows(x, table)  x [R, D] float32 times a bfloat16 table [V, D], transposed: [R, V].

Products are exact in float32, as XLA's are; only the order of the float32 sums differs.

The kernels are compiled on first use with the machine's C++ compiler (`$CXX`, else `c++`,
`-O3 -march=native`) against the XLA FFI headers jaxlib ships, into
`$GROKSCOPE_CACHE_DIR/kernels` (default `~/.cache/grokscope/kernels`), under a name that
hashes the source, the flags, jaxlib's version and the CPU, so a change of any of them builds
anew; concurrent builds each write their own file and rename it into place. Where there is no
compiler, the build fails, the backend is not the CPU, or `GROKSCOPE_NATIVE_KERNELS=0` is set,
`available()` is False (`why_unavailable()` says why) and callers keep XLA's own path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib

SOURCE = Path(__file__).with_name("cpu.cc")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno")
TARGETS = {"grokscope_int8_rows": "GrokscopeInt8Rows", "grokscope_bf16_rows": "GrokscopeBf16Rows"}


def cache_dir() -> Path:
    root = os.environ.get("GROKSCOPE_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "grokscope") / "kernels"


def _cpu_identity() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build() -> Path:
    """The compiled library, built now unless a build of this source and machine exists."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not compiler:
        raise RuntimeError("no C++ compiler (set CXX, or install g++)")
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(FLAGS), compiler, jaxlib.__version__,
                                    _cpu_identity()]).encode()).hexdigest()[:16]
    library = cache_dir() / f"cpu-{key}.so"
    if library.is_file():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=library.stem + ".", suffix=".so.partial", dir=library.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *FLAGS, "-I", jax.ffi.include_dir(), str(SOURCE), "-o", partial],
                              capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise RuntimeError(f"{Path(compiler).name} failed on {SOURCE.name}: {last}")
        os.replace(partial, library)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return library


@functools.cache
def _load() -> str | None:
    """Builds and registers the kernels once; the reason they are unavailable, or None."""
    try:
        library = ctypes.CDLL(str(_build()))
        for target, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    except (RuntimeError, OSError, AttributeError) as e:
        return str(e)
    return None


def why_unavailable() -> str | None:
    """None when the kernels can run here, else why not."""
    if os.environ.get("GROKSCOPE_NATIVE_KERNELS", "1") == "0":
        return "GROKSCOPE_NATIVE_KERNELS=0"
    if jax.default_backend() != "cpu":
        return f"the default backend is {jax.default_backend()}, not cpu"
    return _load()


def available() -> bool:
    """Whether the native kernels run here (the default backend is the CPU and they built)."""
    return why_unavailable() is None


NATIVE_ROWS = 16
"""Products of up to this many rows of activations (a decode step's) go through the kernels."""

NATIVE_MIN_BYTES = 8 * 1024 * 1024
"""...with a weight that would take more than this widened to float32 on one device (every
weight of Grok-1 and Grok-2; none of the bundled and test models')."""


def use_int8_rows(x: jax.Array, w) -> bool:
    """Whether `x @ w` (a `Linear`) goes through `int8_rows`: an int8 weight, few float32 rows,
    a large weight, and the kernels available."""
    from grokscope.quant import QuantizedWeight8bit
    from grokscope.sharding import model_shards

    if not isinstance(w, QuantizedWeight8bit) or x.dtype != jnp.float32:
        return False
    rows = x.size // x.shape[-1]
    return (rows <= NATIVE_ROWS and w.weight.size * 4 // model_shards() > NATIVE_MIN_BYTES and available())


def _require() -> None:
    why = _load()
    if why is not None:
        raise RuntimeError(f"grokscope's native kernels are unavailable: {why}")


def int8_rows(x: jax.Array, w: jax.Array, scales: jax.Array, expert, valid) -> jax.Array:
    """x [R, K] float32 times expert `expert` of w [E, K, N] int8 with scale blocks [E, B, N]
    (rows k of block k // (K / B)): [R, N] float32, rows from `valid` on zero."""
    _require()
    R, N = x.shape[0], w.shape[2]
    call = jax.ffi.ffi_call("grokscope_int8_rows", jax.ShapeDtypeStruct((R, N), jnp.float32),
                            vmap_method="sequential")
    return call(x.astype(jnp.float32), w, scales.astype(jnp.float32), jnp.asarray(expert, jnp.int32),
                jnp.asarray(valid, jnp.int32))


def bf16_rows(x: jax.Array, table: jax.Array) -> jax.Array:
    """x [R, D] float32 times table [V, D] bfloat16, transposed: [R, V] float32."""
    _require()
    call = jax.ffi.ffi_call("grokscope_bf16_rows", jax.ShapeDtypeStruct((x.shape[0], table.shape[0]), jnp.float32),
                            vmap_method="sequential")
    return call(x.astype(jnp.float32), table)
