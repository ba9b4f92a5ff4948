"""Grok at its real width on this machine: load, prefill and decode, per MoE dispatch.

The other benchmarks run narrow models. This one writes a checkpoint with the real width of
Grok-1 (d 6144, 48 query / 8 key-value heads of 128, 8 experts of width 32768 with top-2
routing, vocab 131072) or Grok-2 (d 8192, 64 / 8 heads, 8 experts of 16384 beside a dense
MLP of 32768, vocab 131072, untied head), but only --layers decoder layers, and runs it on
the devices of this machine. It measures what the full width costs: load time, compile time,
throughput against this machine's own matmul and memory rooflines, and peak memory.

    python benchmarks/width.py [--arch grok1|grok2] [--layers 1] [--mesh 1x8]
                               [--dispatch grouped,ragged,dense] [--dir DIR]
    python benchmarks/width.py --compile-layers 1,8,64 [--arch grok1|grok2] [--mesh 1x8]

The checkpoint
  Written once and kept (default /tmp/grokscope-width/{arch}-{layers}L), in the release's
  layout: Grok-1's `ckpt-0/tensor*` pickles (`grokscope.save_params`), with int8
  `QuantizedWeight8bit` matmul weights and the release's scale blocks (8 where the input dim
  is sharded, else 1); Grok-2's safetensors (`grokscope.formats.grok2.save_release`). Every
  float tensor (embeddings, norms, routers, scales; all of Grok-2's weights) is bfloat16 to
  keep the checkpoint small. Values are random but of a sensible scale, so activations stay
  finite and routing is not degenerate: int8 weights uniform in [-127, 127] (std 73.6) with
  scales 1 / (73.6 sqrt(fan_in)), so each weight has std 1 / sqrt(fan_in); float matmul
  weights, routers and the embedding tables normal with std 1 / sqrt(fan_in) (the
  embedding's fan-in taken as d, which the embedding multiplier sqrt(d) brings back to 1);
  norm scales 1. It is written by a child process (the parent's memory stays small), and
  a marker file, written last, says it is complete; a directory without it is rewritten.

Per dispatch (--dispatch), a fresh child process
  with XLA_FLAGS=--xla_force_host_platform_device_count=<data x model> (8 simulated CPU
  devices for --mesh 1x8; one device and no mesh for 1x1):
  1. Rooflines, measured in that child on the same devices, before anything is loaded:
     matmul peak: a jitted [2048, 2048] x [2048, 2048] float32 matmul (precision HIGHEST),
       the right factor's columns split over all the mesh's devices; the best of 7 calls.
     memory bandwidth: the jitted sum of a 1 GB float32 array split over all the devices,
       bytes / seconds; the best of 7 calls.
  2. Load: `grokscope.formats.load_params(dir, config, mesh=mesh)`, timed (Grok-2 with
     --quantize int8 quantizes its matmul weights as they load).
  3. Prefill: the jitted forward (`grokscope.forward.jitted_forward`, float32, routing
     recorded: `RecordSpec(routing=True)`) on tokens [4, 128]. The program is traced and
     lowered, then compiled, ahead of time (each timed: the first call's cost beyond those
     two is reported as "first call"), then run --repeats more times; steady state is the
     median of those.
  4. Decode: a key/value cache of 128 positions for 8 sequences
     (`grokscope.forward.init_cache`), filled by one call of the decoder
     (`grokscope.forward.jitted_decoder`, routing recorded, the logits of each sequence's last
     token only, as `Session.generate` fills its cache) on [8, 128 - n] tokens, then n =
     1 + --repeats single-token steps [8, 1] (the first is the first call, the others give
     the steady-state median), each feeding the previous step's most likely token and
     leaving the cache full at the end.
     All three programs are traced, lowered and compiled before any of them runs, so their
     memory is known even for a run that is stopped.
  5. Compiled memory: for every program, `compiled.memory_analysis()` (per device, for an SPMD
     program on a mesh: argument, output, alias and temporary bytes; x devices for the host),
     XLA's own cost estimate, and the largest buffers the optimized HLO materializes outside
     fusions (shape, HLO op, and the JAX op it was traced from: an op XLA hoists out of a
     loop keeps the name of the loop it was written in).
  6. Memory and CPU: the resident set (VmRSS) after each stage, the peak during each stage
     (polled by the parent, exact where the kernel's high-water mark rose), and the peak
     (`ru_maxrss`), against the checkpoint's bytes on disk; and per timed call the process's
     user and system CPU seconds and minor page faults (system time here is mostly the
     kernel zeroing fresh pages for large temporaries). On a CPU the loaded parameters live
     in host memory, so the floor is about 1x the checkpoint.
  The parent polls each child's resident memory and stops it past --rss-limit-gb (default
  20) or --timeout-min (default 10); what the child reported until then is kept and the table
  says where it stopped ("killed at 20.0 GB during prefill: first call").

Reported per dispatch, side by side
  tok/s: tokens of the step / median seconds (prefill 4 x 128 = 512 tokens; decode 8).
  achieved FLOP/s: model FLOPs of the step / median seconds, where

      FLOPs = 2 x N_active x B x T  +  L x 4 x B x T x S x (H x K)

    N_active, the parameters one token multiplies by: per layer the attention projections
    D x H x K + 2 x D x G x K + H x K x D, the router D x E, k = 2 experts of 3 x D x F and,
    for Grok-2, the dense MLP 3 x D x Fd; and once the output head V x D (the embedding
    lookup is not a matmul). The second term is attention's scores and weighted values, with
    S the keys each query is scored against as computed: S = T for the prefill (the full
    masked T x T square, not the causal half), S = 128 (the cache) for a decode step. D
    width, H query heads, G key-value heads, K head width, E experts, F expert width, Fd dense
    MLP width, V vocabulary, L layers. These are what the model needs: the dense dispatch
    computes every expert (E / k times the expert FLOPs) and is charged the same.
    That rate is given against the matmul peak above.
  decode weight bytes: the bytes of parameters a decode step must read at least, as loaded:
    the attention weights (int8 + scales), the norms and routers, the experts the step's
    tokens chose (the distinct experts per layer, counted from the recorded expert_index,
    each expert's int8 weights + scales of its three matrices), the embedding rows of the
    step's tokens and the whole output head (V rows; bfloat16), plus the key/value cache
    (float32). Bytes / median step seconds is the achieved bandwidth, given against the
    measured bandwidth.
  peak RSS: the child's ru_maxrss, and its ratio to the checkpoint's bytes on disk.

--compile-layers 1,8,64
  A narrow config (`GROK_1` with d 256, 8 query / 2 key-value heads of 32, widening 1,
  vocab 1024; Grok-2's the same with experts of 256 and a dense MLP of 512) with random
  `init_params` (int8 for Grok-1) for each number of layers L, each in a fresh child on the
  same mesh: the prefill [4, 128] program's trace + lower seconds, compile seconds and
  first-call seconds, per dispatch, and the seconds per added layer between successive L,
  to show whether compile time grows linearly with depth (the decoder is a Python loop
  over layers, so XLA compiles L copies of a layer).

Every child prints one JSON line per stage; the parent prints progress to stderr and one
table at the end (a failing child's stderr tail is printed).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

GB = 1e9
SEQS, PREFILL_LEN = 4, 128  # the prefill batch
DECODE_SEQS, CACHE_LEN = 8, 128  # the decode batch and its key/value cache
INT8_STD = ((255 ** 2 - 1) / 12) ** 0.5  # std of integers uniform in [-127, 127]: 73.6
MARKER = "WIDTH_COMPLETE.json"


# --------------------------------------------------------------------------------------------
# configs and the analytic model


def real_config(arch: str, layers: int):
    from grokscope.config import GROK_1, GROK_2

    return dataclasses.replace(GROK_1 if arch == "grok1" else GROK_2, num_layers=layers)


def narrow_config(arch: str, layers: int):
    """The --compile-layers config: the architecture at d 256."""
    from grokscope.config import GROK_1, GROK_2

    narrow = dict(emb_size=256, key_size=32, num_q_heads=8, num_kv_heads=2, widening_factor=1, vocab_size=1024,
                  num_layers=layers, attn_output_multiplier=32 ** -0.5, embedding_multiplier_scale=16.0)
    if arch == "grok1":
        return dataclasses.replace(GROK_1, **narrow)
    return dataclasses.replace(GROK_2, **narrow, moe_ffn_size=256, dense_ffn_size=512, sequence_len=1024,
                               attn_temperature_len=64)


def active_params(config) -> int:
    """Parameters one token multiplies by (matmuls only): the layers' attention projections,
    router, k experts (and dense MLP), and the output head."""
    c = config
    D, H, G, K, E, F = c.emb_size, c.num_q_heads, c.num_kv_heads, c.key_size, c.num_experts, c.ffn_size
    per_layer = D * H * K + 2 * D * G * K + H * K * D + D * E + c.num_selected_experts * 3 * D * F
    if c.dense_ffn_size is not None:
        per_layer += 3 * D * c.dense_ffn_size
    return c.num_layers * per_layer + c.vocab_size * D


def step_flops(config, batch: int, length: int, keys: int) -> float:
    """FLOPs = 2 x N_active x B x T + L x 4 x B x T x S x (H x K) (see the module docstring)."""
    c = config
    tokens = batch * length
    return 2.0 * active_params(c) * tokens + c.num_layers * 4.0 * tokens * keys * c.num_q_heads * c.key_size


def _nbytes(value) -> int:
    import jax

    return int(sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(value)))


def decode_weight_bytes(params, config, distinct_experts: list[int], batch: int, cache_bytes: int) -> dict:
    """The bytes of parameters a decode step of `batch` tokens reads at least (as loaded), by
    kind: attention, norms + routers, the chosen experts (`distinct_experts[layer]` of them),
    embedding rows, output head, and the key/value cache."""
    out = collections.Counter()
    E = config.num_experts
    for module, values in params.items():
        for name, value in values.items():
            path = f"{module}/{name}"
            n = _nbytes(value)
            if "multi_head_attention/" in path:
                out["attention"] += n
            elif "/moe/" in path:
                layer = int(re.search(r"decoder_layer_(\d+)/", path).group(1))
                out["experts"] += int(n * distinct_experts[layer] / E)
            elif "/mlp/" in path:
                out["dense_mlp"] += n
            elif path.endswith("in_out_embed/embeddings"):
                rows = n // config.vocab_size
                out["embedding_rows"] += batch * rows
                if config.tied_embeddings:
                    out["output_head"] += n
            elif path.endswith("unembed/embeddings"):
                out["output_head"] += n
            else:
                out["norms_routers"] += n
    out["kv_cache"] += cache_bytes
    return dict(out)


# --------------------------------------------------------------------------------------------
# writing the checkpoint (in a child)


def _fill_normal(flat, std: float, rng, dtype) -> None:
    """Fills a 1-d array (or memmap) with normal values of `std`, in chunks of 16M floats."""
    import numpy as np

    for start in range(0, flat.size, 1 << 24):
        chunk = flat[start:start + (1 << 24)]
        chunk[...] = (rng.standard_normal(chunk.size, dtype=np.float32) * np.float32(std)).astype(dtype)


def write_grok1(config, directory: Path) -> None:
    """Random int8 QuantizedWeight8bit matmul weights with the release's scale blocks, bfloat16
    floats, written by `grokscope.save_params` in the release's layout."""
    import ml_dtypes
    import numpy as np

    from grokscope import save_params
    from grokscope.layout import param_layout
    from grokscope.quant import QuantizedWeight8bit

    rng = np.random.default_rng(0)
    params: dict = {}
    for path, spec in param_layout(config).items():
        module, name = path.rsplit("/", 1)
        fan_in = config.emb_size if path.endswith("/embeddings") or len(spec.shape) == 1 else spec.shape[-2]
        if spec.quantized:
            weight = np.empty(spec.shape, np.int8)
            flat = weight.reshape(-1)
            for start in range(0, flat.size, 1 << 26):
                chunk = flat[start:start + (1 << 26)]
                chunk[...] = rng.integers(-127, 128, size=chunk.size, dtype=np.int8)
            scales = np.full(spec.shape[:-2] + (spec.scale_blocks, spec.shape[-1]),
                             1.0 / (INT8_STD * fan_in ** 0.5), ml_dtypes.bfloat16)
            value = QuantizedWeight8bit(weight=weight, scales=scales)
        elif len(spec.shape) == 1:
            value = np.ones(spec.shape, ml_dtypes.bfloat16)
        else:
            value = np.empty(spec.shape, ml_dtypes.bfloat16)
            _fill_normal(value.reshape(-1), fan_in ** -0.5, rng, ml_dtypes.bfloat16)
        params.setdefault(module, {})[name] = value
    save_params(params, directory, config)


def write_grok2(config, directory: Path) -> None:
    """Random bfloat16 parameters written by `save_release`. The values are made in memory-mapped
    scratch files (removed after), so that only `save_release`'s own copies take anonymous memory
    (about 1x the checkpoint)."""
    import ml_dtypes
    import numpy as np

    from grokscope.formats.grok2 import save_release
    from grokscope.layout import param_layout

    rng = np.random.default_rng(0)
    scratch = directory / ".scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    params: dict = {}
    for i, (path, spec) in enumerate(param_layout(config).items()):
        module, name = path.rsplit("/", 1)
        value = np.lib.format.open_memmap(scratch / f"{i:05d}.npy", mode="w+", dtype=ml_dtypes.bfloat16,
                                          shape=spec.shape)
        if len(spec.shape) == 1:
            value[...] = 1
        else:
            fan_in = config.emb_size if path.endswith("/embeddings") else spec.shape[-2]
            _fill_normal(value.reshape(-1), fan_in ** -0.5, rng, ml_dtypes.bfloat16)
        value.flush()
        params.setdefault(module, {})[name] = value
    save_release(params, config, directory)
    del params
    shutil.rmtree(scratch)


def checkpoint_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file() and f.name != MARKER
               and ".scratch" not in f.parts)


def width_config(args):
    """The config of the checkpoint: the real width, or the narrow one with --narrow."""
    return (narrow_config if args.narrow else real_config)(args.arch, args.layers)


def ensure_checkpoint(args, directory: Path) -> None:
    marker = directory / MARKER
    if marker.is_file():
        print(f"checkpoint: {directory} (present: {checkpoint_bytes(directory) / GB:.2f} GB)", file=sys.stderr)
        return
    for stale in ("ckpt-0", ".scratch"):  # a partial write of ours
        shutil.rmtree(directory / stale, ignore_errors=True)
    for stale in directory.glob("*.safetensors"):
        stale.unlink()
    directory.mkdir(parents=True, exist_ok=True)
    print(f"writing the checkpoint to {directory} ...", file=sys.stderr)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--write-child", "--arch", args.arch, "--layers", str(args.layers),
                    "--dir", str(directory)] + (["--narrow"] if args.narrow else []), check=True)
    seconds = time.perf_counter() - t0
    size = checkpoint_bytes(directory)
    marker.write_text(json.dumps({"config": dataclasses.asdict(width_config(args)), "bytes": size,
                                  "write_seconds": seconds}))
    print(f"wrote {size / GB:.2f} GB in {seconds:.0f} s", file=sys.stderr)


# --------------------------------------------------------------------------------------------
# measurements (in a child)


def _emit(event: str, **fields) -> None:
    """One JSON line: the event, its fields, the resident set now, and the process's CPU
    seconds (user, system) and minor page faults so far (all threads)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"event": event, "rss": _rss_now(), "utime": usage.ru_utime, "stime": usage.ru_stime,
                      "minflt": usage.ru_minflt, **fields}), flush=True)


def _rss_now() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _ru_maxrss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _machine() -> dict:
    import jax
    import jaxlib

    import grokscope

    model = ""
    try:
        model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                     "")
    except OSError:
        pass
    return {"cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)), "cpu": model,
            "jax": jax.__version__, "jaxlib": jaxlib.__version__, "devices": jax.device_count(),
            "platform": jax.devices()[0].platform, "grokscope": os.path.dirname(grokscope.__file__)}


def _best_seconds(fn, calls: int = 7) -> float:
    fn()
    best = float("inf")
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def rooflines(mesh) -> dict:
    """Matmul FLOP/s and memory bandwidth on all the mesh's devices (see the module)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    n = 2048
    everything = P(("data", "model")) if mesh is not None else None

    def put(x, spec):
        return jax.device_put(x, NamedSharding(mesh, spec)) if mesh is not None else x

    a = put(jnp.ones((n, n), jnp.float32), P())
    b = put(jnp.ones((n, n), jnp.float32), P(None, ("data", "model")) if mesh is not None else None)
    matmul = jax.jit(lambda x, y: jnp.dot(x, y, precision=jax.lax.Precision.HIGHEST))
    matmul_s = _best_seconds(lambda: matmul(a, b).block_until_ready())
    del a, b
    size = 250_000_000  # 1 GB of float32
    make = jax.jit(lambda: jnp.ones((size,), jnp.float32),
                   **({"out_shardings": NamedSharding(mesh, everything)} if mesh is not None else {}))
    big = make()
    total = jax.jit(jnp.sum)
    read_s = _best_seconds(lambda: total(big).block_until_ready())
    del big
    return {"matmul_flops": 2 * n ** 3 / matmul_s, "bandwidth": 4 * size / read_s}


_HLO_COMPUTATION = re.compile(r"^(ENTRY )?%?([\w.\-]+) .*\{\s*$")
_HLO_INSTRUCTION = re.compile(r"^\s*(ROOT )?%?([\w.\-]+) = (\w+)\[([\d,]*)\]\{?[^ ]* ([\w\-]+)\(")
_DTYPE_BYTES = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s8": 1, "u8": 1, "pred": 1, "f64": 8, "s64": 8,
                "u64": 8}


def largest_buffers(hlo_text: str, top: int = 6) -> list[dict]:
    """The largest arrays the optimized HLO materializes (instructions outside fused
    computations; parameters and bitcasts left out), largest first, with the JAX op name."""
    found = []
    fused = False
    for line in hlo_text.splitlines():
        header = _HLO_COMPUTATION.match(line)
        if header:
            fused = "fused" in header.group(2) or "wrapped" in header.group(2)
            continue
        if fused:
            continue
        m = _HLO_INSTRUCTION.match(line)
        if not m or m.group(5) in ("parameter", "bitcast", "get-tuple-element", "tuple", "constant") \
                or m.group(3) not in _DTYPE_BYTES:
            continue
        dims = [int(d) for d in m.group(4).split(",") if d]
        elements = 1
        for d in dims:
            elements *= d
        nbytes = elements * _DTYPE_BYTES[m.group(3)]
        op_name = re.search(r'op_name="([^"]+)"', line)
        found.append({"bytes": nbytes, "shape": f"{m.group(3)}[{m.group(4)}]", "op": m.group(5),
                      "op_name": op_name.group(1)[-90:] if op_name else ""})
    found.sort(key=lambda r: -r["bytes"])
    out, seen = [], set()
    for r in found:  # one line per (shape, op, JAX op)
        key = (r["shape"], r["op"], r["op_name"])
        if key not in seen:
            seen.add(key)
            out.append(r)
        if len(out) == top:
            break
    return out


def compiled_stats(compiled) -> dict:
    stats = {}
    try:
        memory = compiled.memory_analysis()
        for name in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
                     "generated_code_size_in_bytes", "peak_memory_in_bytes"):
            value = getattr(memory, name, None)
            if value is not None:
                stats[name.replace("_size_in_bytes", "").replace("_in_bytes", "")] = int(value)
    except Exception as e:  # not every backend has it
        stats["memory_error"] = f"{type(e).__name__}: {e}"
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        stats["xla_flops"] = float(cost.get("flops", 0.0))
        stats["xla_bytes_accessed"] = float(cost.get("bytes accessed", 0.0))
    except Exception as e:
        stats["cost_error"] = f"{type(e).__name__}: {e}"
    try:
        stats["largest_buffers"] = largest_buffers(compiled.as_text())
    except Exception as e:
        stats["hlo_error"] = f"{type(e).__name__}: {e}"
    return stats


def _compile(fn, *args) -> tuple:
    """(compiled, trace + lower seconds, compile seconds)."""
    t0 = time.perf_counter()
    lowered = fn.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    return compiled, t1 - t0, time.perf_counter() - t1


def _timed(fn) -> tuple:
    import jax

    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - t0


def _mesh(spec: str):
    import jax

    from grokscope import make_mesh

    data, model = (int(x) for x in spec.split("x"))
    if jax.device_count() < data * model:
        raise SystemExit(f"--mesh {spec} needs {data * model} devices, found {jax.device_count()}")
    return make_mesh(data, model) if data * model > 1 else None


def _routing_summary(expert_index, config) -> dict:
    """Per layer: distinct experts chosen, and the busiest expert's share of the picks."""
    import numpy as np

    index = np.asarray(expert_index)  # [B, T, L, k]
    distinct, busiest = [], []
    for layer in range(index.shape[2]):
        picks = index[:, :, layer, :].reshape(-1)
        counts = np.bincount(picks, minlength=config.num_experts)
        distinct.append(int((counts > 0).sum()))
        busiest.append(float(counts.max() / picks.size))
    return {"distinct_experts": distinct, "busiest_share": busiest}


def run_child(opts: dict) -> None:
    import contextlib

    import jax
    import numpy as np

    jax.config.update("jax_enable_compilation_cache", False)
    from grokscope import RecordSpec
    from grokscope.config import ModelConfig
    from grokscope.forward import init_cache, jitted_decoder, jitted_forward
    from grokscope.formats import load_params
    from grokscope.sharding import batch_sharding, place

    config = ModelConfig.from_dict(opts["config"])
    dispatch, dtype, repeats = opts["dispatch"], opts["compute_dtype"], opts["repeats"]
    _emit("machine", **_machine())
    mesh = _mesh(opts["mesh"])
    on_mesh = (lambda: jax.set_mesh(mesh)) if mesh is not None else contextlib.nullcontext

    def put(*arrays):
        if mesh is None:
            return arrays if len(arrays) > 1 else arrays[0]
        placed = tuple(place(a, batch_sharding(mesh, a.shape)) for a in arrays)
        return placed if len(placed) > 1 else placed[0]

    _emit("rooflines", **rooflines(mesh))

    t0 = time.perf_counter()
    options = {"quantize": opts["quantize"]} if opts["quantize"] else {}
    params = load_params(opts["dir"], config, mesh=mesh, **options)
    jax.block_until_ready(params)
    _emit("load", seconds=time.perf_counter() - t0, param_bytes=_nbytes(params))

    record = RecordSpec(routing=True)
    rng = np.random.default_rng(1)
    vocab = config.vocab_size

    # The three programs, compiled ahead of time (so that their memory is known before any runs):
    # the prefill [4, 128]; the decoder filling a cache of 128 positions with [8, 128 - n]; the
    # decoder's single-token step [8, 1], n = 1 + repeats of them, which leave the cache full.
    steps = 1 + repeats
    fill = CACHE_LEN - steps
    tokens = rng.integers(3, vocab, (SEQS, PREFILL_LEN)).astype(np.int32)
    prefill_in = put(tokens, np.ascontiguousarray(np.broadcast_to(np.arange(PREFILL_LEN, dtype=np.int32),
                                                                  tokens.shape)))
    tokens = rng.integers(3, vocab, (DECODE_SEQS, fill)).astype(np.int32)
    fill_in = put(tokens, np.ascontiguousarray(np.broadcast_to(np.arange(fill, dtype=np.int32), tokens.shape)))
    fill_at = put(np.full(DECODE_SEQS, fill - 1, np.int32))  # the logits of each prompt's last token only
    decoder = jitted_decoder(config, record, dtype, dispatch)
    cache = init_cache(config, DECODE_SEQS, CACHE_LEN, dtype)  # uncommitted, as `grokscope.runner.new_cache`'s
    with on_mesh():
        prefill, lower_s, compile_s = _compile(jitted_forward(config, record, dtype, dispatch), params, *prefill_in)
    _emit("prefill_compiled", lower_s=lower_s, compile_s=compile_s, **compiled_stats(prefill))
    with on_mesh():
        filler, lower_s, compile_s = _compile(decoder, params, *fill_in, cache, fill_at)
    _emit("fill_compiled", lower_s=lower_s, compile_s=compile_s, **compiled_stats(filler))
    with on_mesh():
        step, lower_s, compile_s = _compile(decoder, params, *put(np.zeros((DECODE_SEQS, 1), np.int32),
                                                                  np.full((DECODE_SEQS, 1), fill, np.int32)), cache)
    _emit("decode_compiled", lower_s=lower_s, compile_s=compile_s, **compiled_stats(step))

    # prefill
    with on_mesh():
        (logits, rec), first_s = _timed(lambda: prefill(params, *prefill_in))
    finite = bool(np.isfinite(np.asarray(logits[:, -1])).all())
    _emit("prefill_first", seconds=first_s, finite=finite, **_routing_summary(rec["expert_index"], config))
    del logits, rec
    times = []
    for _ in range(repeats):
        with on_mesh():
            out, seconds = _timed(lambda: prefill(params, *prefill_in))
        del out  # one output alive at a time
        times.append(seconds)
    _emit("prefill_steady", seconds=float(np.median(times)), all_seconds=times,
          flops=step_flops(config, SEQS, PREFILL_LEN, PREFILL_LEN), tokens=SEQS * PREFILL_LEN)
    del prefill

    # decode: fill the cache, then single-token steps
    with on_mesh():
        (logits, rec, cache), seconds = _timed(lambda: filler(params, *fill_in, cache, fill_at))
    next_tokens = np.asarray(jax.device_get(logits)).argmax(-1).astype(np.int32)[:, None]
    _emit("fill", tokens=[DECODE_SEQS, fill], seconds=seconds)
    del filler, logits, rec
    cache_bytes = _nbytes({k: cache[k] for k in ("keys", "values")})
    cache_shardings = step.input_shardings[0][3]
    times, distinct = [], np.zeros(config.num_layers, np.int64)
    for i in range(steps):
        step_in = put(next_tokens, np.full((DECODE_SEQS, 1), fill + i, np.int32))
        cache = jax.device_put(cache, cache_shardings)
        with on_mesh():
            (logits, rec, cache), seconds = _timed(lambda: step(params, *step_in, cache))
        next_tokens = np.asarray(jax.device_get(logits[:, -1])).argmax(-1).astype(np.int32)[:, None]
        summary = _routing_summary(rec["expert_index"], config)
        if i == 0:
            _emit("decode_first", seconds=seconds, **summary)
        else:
            times.append(seconds)
            distinct += np.asarray(summary["distinct_experts"])
    mean_distinct = [float(d) / max(1, len(times)) for d in distinct]
    weight_bytes = decode_weight_bytes(params, config, [d for d in mean_distinct], DECODE_SEQS, cache_bytes)
    _emit("decode_steady", seconds=float(np.median(times)), all_seconds=times, distinct_experts=mean_distinct,
          flops=step_flops(config, DECODE_SEQS, 1, CACHE_LEN), tokens=DECODE_SEQS, weight_bytes=weight_bytes)
    _emit("done", peak_rss=_ru_maxrss())


def compile_child(opts: dict) -> None:
    import contextlib

    import jax
    import numpy as np

    jax.config.update("jax_enable_compilation_cache", False)
    from grokscope import RecordSpec, init_params
    from grokscope.config import ModelConfig
    from grokscope.forward import jitted_forward
    from grokscope.sharding import batch_sharding, place, shard_params

    config = ModelConfig.from_dict(opts["config"])
    _emit("machine", **_machine())
    mesh = _mesh(opts["mesh"])
    t0 = time.perf_counter()
    params = init_params(config, seed=0)
    params = shard_params(params, mesh) if mesh is not None else params
    jax.block_until_ready(params)
    _emit("init", seconds=time.perf_counter() - t0)
    rng = np.random.default_rng(1)
    tokens = rng.integers(3, config.vocab_size, (SEQS, PREFILL_LEN)).astype(np.int32)
    positions = np.ascontiguousarray(np.broadcast_to(np.arange(PREFILL_LEN, dtype=np.int32), tokens.shape))
    if mesh is not None:
        tokens, positions = (place(a, batch_sharding(mesh, a.shape)) for a in (tokens, positions))
    on_mesh = (lambda: jax.set_mesh(mesh)) if mesh is not None else contextlib.nullcontext
    for dispatch in opts["dispatches"]:
        fn = jitted_forward(config, RecordSpec(routing=True), opts["compute_dtype"], dispatch)
        with on_mesh():
            compiled, lower_s, compile_s = _compile(fn, params, tokens, positions)
            _, first_s = _timed(lambda: compiled(params, tokens, positions))
            _, second_s = _timed(lambda: compiled(params, tokens, positions))
        _emit("compiled", dispatch=dispatch, lower_s=lower_s, compile_s=compile_s, first_s=first_s,
              second_s=second_s)
    _emit("done", peak_rss=_ru_maxrss())


# --------------------------------------------------------------------------------------------
# the parent: children, their memory, and the tables


def _proc_memory(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, bytes (0, 0 once it is gone)."""
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss, hwm


def run_monitored(argv: list[str], env: dict, label: str, rss_limit: float, timeout: float) -> dict:
    """Runs a child that prints JSON lines; stops it past `rss_limit` bytes or `timeout` s.

    Each event gets `stage_peak`: the child's largest resident set since its previous event
    (exact when the kernel's high-water mark rose in that time, else the largest polled value)."""
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    events: list[dict] = []
    stderr = collections.deque(maxlen=60)
    t0 = time.monotonic()
    memory = {"polled": 0, "hwm": 0}  # since the previous event

    def read_stdout():
        for line in proc.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                stderr.append(line.rstrip())
                continue
            rss, hwm = _proc_memory(proc.pid)
            event["stage_peak"] = hwm if hwm > memory["hwm"] else max(memory["polled"], rss)
            memory["hwm"], memory["polled"] = max(hwm, memory["hwm"]), 0
            event["t"] = time.monotonic() - t0
            events.append(event)
            brief = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in event.items()
                     if isinstance(v, (int, float, str))
                     and k not in ("event", "t", "rss", "stage_peak", "utime", "stime", "minflt")}
            print(f"  [{label} {event['t']:6.0f} s] {event['event']}: RSS {event.get('rss', 0) / GB:.2f} GB, peak "
                  f"since the previous line {event['stage_peak'] / GB:.2f} GB {json.dumps(brief)[:240]}",
                  file=sys.stderr, flush=True)

    def read_stderr():
        for line in proc.stderr:
            stderr.append(line.rstrip())

    readers = [threading.Thread(target=read_stdout, daemon=True), threading.Thread(target=read_stderr, daemon=True)]
    for r in readers:
        r.start()
    peak, stopped = 0, None
    while proc.poll() is None:
        rss, hwm = _proc_memory(proc.pid)
        peak = max(peak, rss, hwm)
        memory["polled"] = max(memory["polled"], rss)
        elapsed = time.monotonic() - t0
        if rss > rss_limit:
            stopped = f"killed at {rss / GB:.1f} GB RSS"
        elif elapsed > timeout:
            stopped = f"killed after {elapsed / 60:.1f} min"
        if stopped:
            proc.kill()  # this child, by its own pid
            break
        time.sleep(0.05)
    proc.wait()
    for r in readers:
        r.join(timeout=10)
    result = {"events": {e["event"]: e for e in events}, "order": [e["event"] for e in events], "all_events": events,
              "returncode": proc.returncode, "stopped": stopped, "polled_peak": peak,
              "wall_s": time.monotonic() - t0, "stderr": list(stderr)}
    if stopped:
        result["stopped"] = f"{stopped} during {_stage_after(result['order'])}"
    elif proc.returncode:
        result["stopped"] = f"failed (exit status {proc.returncode}) during {_stage_after(result['order'])}"
    if result["stopped"]:
        print(f"  [{label} {result['wall_s']:6.0f} s] {result['stopped']}", file=sys.stderr, flush=True)
    return result


_STAGES = {None: "start-up", "machine": "rooflines", "rooflines": "load", "load": "prefill: trace + compile",
           "prefill_compiled": "cache fill: trace + compile", "fill_compiled": "decode step: trace + compile",
           "decode_compiled": "prefill: first call", "prefill_first": "prefill: timed calls",
           "prefill_steady": "cache fill: call", "fill": "decode: first step", "decode_first": "decode: timed steps",
           "decode_steady": "the end", "init": "compiles"}


def _stage_after(order: list[str]) -> str:
    return _STAGES.get(order[-1] if order else None, order[-1] if order else "start-up")


def child_env(mesh: str) -> dict:
    data, model = (int(x) for x in mesh.split("x"))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={data * model}"
    return env


def _fmt(value, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "s":
        return f"{value:.2f}" if value < 100 else f"{value:.0f}"
    if kind == "gb":
        return f"{value / GB:.2f}"
    if kind == "pct":
        return f"{100 * value:.1f}%"
    if kind == "g":
        return f"{value / 1e9:.1f}"
    if kind == "x":
        return f"{value:.2f}x"
    return str(value)


def print_width_table(results: dict, config, args, size: int) -> None:
    def ev(r, name, key):
        return r["events"].get(name, {}).get(key)

    rows = []

    def row(label, fn, kind=""):
        rows.append([label] + [_fmt(_safe(fn, r), kind) for r in results.values()])

    def _safe(fn, r):
        try:
            return fn(r)
        except Exception:  # what a stopped child did not report
            return None

    def devices(r):
        return r["events"]["machine"]["devices"]

    def per_call(r, before, after, key):
        """A counter's growth over the timed calls between two events, per call."""
        return (ev(r, after, key) - ev(r, before, key)) / len(ev(r, after, "all_seconds"))

    def per_s(r, name, key):
        return ev(r, name, key) / ev(r, name, "seconds")

    row("status", lambda r: r["stopped"].split(" at ")[0].split(" after ")[0].split(" (")[0] if r["stopped"] else "ok")
    row("child wall s", lambda r: r["wall_s"], "s")
    row("matmul peak GFLOP/s (this child)", lambda r: ev(r, "rooflines", "matmul_flops"), "g")
    row("read bandwidth GB/s (this child)", lambda r: ev(r, "rooflines", "bandwidth"), "g")
    row("load s", lambda r: ev(r, "load", "seconds"), "s")
    row("RSS after load GB", lambda r: ev(r, "load", "rss"), "gb")
    P = f"prefill {SEQS}x{PREFILL_LEN}"
    row(f"{P}: trace+lower s", lambda r: ev(r, "prefill_compiled", "lower_s"), "s")
    row(f"{P}: compile s", lambda r: ev(r, "prefill_compiled", "compile_s"), "s")
    row(f"{P}: first call s", lambda r: ev(r, "prefill_first", "seconds"), "s")
    row(f"{P}: steady s (median)", lambda r: ev(r, "prefill_steady", "seconds"), "s")
    row(f"{P}: tok/s", lambda r: per_s(r, "prefill_steady", "tokens"), "s")
    row(f"{P}: model GFLOP/s", lambda r: per_s(r, "prefill_steady", "flops"), "g")
    row(f"{P}: of matmul peak", lambda r: per_s(r, "prefill_steady", "flops") / ev(r, "rooflines", "matmul_flops"),
        "pct")
    row(f"{P}: XLA temp GB/device", lambda r: ev(r, "prefill_compiled", "temp"), "gb")
    row(f"{P}: XLA temp x devices GB", lambda r: ev(r, "prefill_compiled", "temp") * devices(r), "gb")
    row(f"{P}: CPU user s/call", lambda r: per_call(r, "prefill_first", "prefill_steady", "utime"), "s")
    row(f"{P}: CPU system s/call", lambda r: per_call(r, "prefill_first", "prefill_steady", "stime"), "s")
    row(f"{P}: minor page faults/call", lambda r: f"{per_call(r, 'prefill_first', 'prefill_steady', 'minflt'):.0f}")
    row(f"{P}: distinct experts/layer", lambda r: min(ev(r, "prefill_first", "distinct_experts")))
    row(f"{P}: busiest expert share", lambda r: max(ev(r, "prefill_first", "busiest_share")), "pct")
    row(f"{P}: logits finite", lambda r: ev(r, "prefill_first", "finite"))
    row(f"RSS after prefill GB", lambda r: ev(r, "prefill_steady", "rss"), "gb")
    D = f"decode {DECODE_SEQS}x1"
    row(f"cache fill {DECODE_SEQS}x{CACHE_LEN - 1 - args.repeats}: compile s",
        lambda r: ev(r, "fill_compiled", "compile_s"), "s")
    row(f"cache fill: call s", lambda r: ev(r, "fill", "seconds"), "s")
    row(f"{D}: trace+lower s", lambda r: ev(r, "decode_compiled", "lower_s"), "s")
    row(f"{D}: compile s", lambda r: ev(r, "decode_compiled", "compile_s"), "s")
    row(f"{D}: first call s", lambda r: ev(r, "decode_first", "seconds"), "s")
    row(f"{D}: steady s (median)", lambda r: ev(r, "decode_steady", "seconds"), "s")
    row(f"{D}: tok/s", lambda r: per_s(r, "decode_steady", "tokens"), "s")
    row(f"{D}: model GFLOP/s", lambda r: per_s(r, "decode_steady", "flops"), "g")
    row(f"{D}: of matmul peak", lambda r: per_s(r, "decode_steady", "flops") / ev(r, "rooflines", "matmul_flops"),
        "pct")
    row(f"{D}: CPU user s/call", lambda r: per_call(r, "decode_first", "decode_steady", "utime"), "s")
    row(f"{D}: CPU system s/call", lambda r: per_call(r, "decode_first", "decode_steady", "stime"), "s")
    row(f"{D}: minor page faults/call", lambda r: f"{per_call(r, 'decode_first', 'decode_steady', 'minflt'):.0f}")
    row(f"{D}: distinct experts/layer", lambda r: f"{min(ev(r, 'decode_steady', 'distinct_experts')):.1f}")
    row(f"{D}: weight bytes read GB", lambda r: sum(ev(r, "decode_steady", "weight_bytes").values()), "gb")
    row(f"{D}: achieved GB/s", lambda r: sum(ev(r, "decode_steady", "weight_bytes").values())
        / ev(r, "decode_steady", "seconds"), "g")
    row(f"{D}: of read bandwidth", lambda r: sum(ev(r, "decode_steady", "weight_bytes").values())
        / ev(r, "decode_steady", "seconds") / ev(r, "rooflines", "bandwidth"), "pct")
    row(f"cache fill: XLA temp GB/device", lambda r: ev(r, "fill_compiled", "temp"), "gb")
    row(f"{D}: XLA temp GB/device", lambda r: ev(r, "decode_compiled", "temp"), "gb")
    row(f"{D}: XLA temp x devices GB", lambda r: ev(r, "decode_compiled", "temp") * devices(r), "gb")
    for label, name in (("load", "load"), ("prefill first call", "prefill_first"),
                        ("prefill timed calls", "prefill_steady"), ("cache fill call", "fill"),
                        ("decode first step", "decode_first"), ("decode timed steps", "decode_steady")):
        row(f"peak RSS GB during {label}", lambda r, name=name: ev(r, name, "stage_peak"), "gb")
    row("peak RSS GB (ru_maxrss)", lambda r: ev(r, "done", "peak_rss"), "gb")
    row("peak RSS GB (polled; killed ones)", lambda r: r["polled_peak"], "gb")
    row("peak RSS / checkpoint", lambda r: max(r["polled_peak"], ev(r, "done", "peak_rss") or 0) / size, "x")

    header = ["", *results]
    widths = [max(len(str(line[i])) for line in [header] + rows) for i in range(len(header))]
    print()
    print("  ".join(str(h).ljust(w) if i == 0 else str(h).rjust(w) for i, (h, w) in enumerate(zip(header, widths))))
    for line in rows:
        print("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(line, widths))))

    print()
    for name, r in results.items():
        print(f"{name}: {r['stopped'] or 'ok'}")
    first = next((r for r in results.values() if "machine" in r["events"]), None)
    decode = next((r["events"]["decode_steady"] for r in results.values() if "decode_steady" in r["events"]), None)
    print()
    if decode:
        parts = ", ".join(f"{k} {v / GB:.3f}" for k, v in decode["weight_bytes"].items())
        print(f"decode weight bytes per step (GB, first dispatch that finished): {parts}")
    for name, r in results.items():
        for event in ("prefill_compiled", "fill_compiled", "decode_compiled"):
            e = r["events"].get(event)
            if not e:
                continue
            m = {k: e.get(k) for k in ("argument", "output", "alias", "temp")}
            print(f"{name} {event.split('_')[0]} (XLA memory per device, GB): "
                  + ", ".join(f"{k} {v / GB:.3f}" for k, v in m.items() if v is not None)
                  + (f"; XLA's cost estimate {e['xla_flops'] / 1e9:.1f} GFLOP, {e['xla_bytes_accessed'] / GB:.2f} GB "
                     f"accessed (loop bodies counted once)" if "xla_flops" in e else ""))
            for b in e.get("largest_buffers", [])[:5]:
                print(f"    {b['bytes'] / GB:7.3f} GB  {b['shape']:<24} {b['op']:<20} {b['op_name']}")
    for name, r in results.items():
        if r["stopped"] and r["stderr"]:
            tail = "\n    ".join(r["stderr"][-15:])
            print(f"{name} stderr tail:\n    {tail}")
    if first:
        m = first["events"]["machine"]
        print(f"machine: {m['cores']} cores ({m['usable_cores']} usable, {m['cpu']}), jax {m['jax']} / jaxlib "
              f"{m['jaxlib']}, {m['devices']} {m['platform']} devices, mesh {args.mesh}, grokscope from "
              f"{m['grokscope']}")
    c = config
    width = "NARROW (--narrow)" if args.narrow else "full"
    print(f"model: {args.arch} at {width} width, {c.num_layers} layer(s): d {c.emb_size}, {c.num_q_heads}/"
          f"{c.num_kv_heads} heads of {c.key_size}, {c.num_experts} experts of {c.ffn_size} (top "
          f"{c.num_selected_experts}){f', dense MLP {c.dense_ffn_size}' if c.dense_ffn_size else ''}, vocab "
          f"{c.vocab_size}; checkpoint {size / GB:.2f} GB on disk; {active_params(c) / 1e9:.2f} G active "
          f"parameters per token; compute {args.compute_dtype}")


def main_width(args) -> None:
    config = width_config(args)
    directory = Path(args.dir or f"/tmp/grokscope-width/{args.arch}-{args.layers}L{'-narrow' if args.narrow else ''}")
    ensure_checkpoint(args, directory)
    size = checkpoint_bytes(directory)
    results = {}
    for dispatch in args.dispatch.split(","):
        opts = {"config": dataclasses.asdict(config), "dir": str(directory), "dispatch": dispatch,
                "mesh": args.mesh, "compute_dtype": args.compute_dtype, "repeats": args.repeats,
                "quantize": args.quantize if args.arch == "grok2" else None}
        print(f"{dispatch}: child started", file=sys.stderr, flush=True)
        results[dispatch] = run_monitored([sys.executable, __file__, "--run-child", json.dumps(opts)],
                                          child_env(args.mesh), dispatch, args.rss_limit_gb * GB,
                                          args.timeout_min * 60)
    print_width_table(results, config, args, size)


def main_compile(args) -> None:
    layers = [int(x) for x in args.compile_layers.split(",")]
    dispatches = args.dispatch.split(",")
    results = {}
    for L in layers:
        config = narrow_config(args.arch, L)
        opts = {"config": dataclasses.asdict(config), "mesh": args.mesh, "dispatches": dispatches,
                "compute_dtype": args.compute_dtype}
        results[L] = run_monitored([sys.executable, __file__, "--compile-child", json.dumps(opts)],
                                   child_env(args.mesh), f"L={L}", args.rss_limit_gb * GB, args.timeout_min * 60)
    c = narrow_config(args.arch, 1)
    print()
    print(f"compile time vs layers: {args.arch} narrow (d {c.emb_size}, {c.num_q_heads}/{c.num_kv_heads} heads of "
          f"{c.key_size}, {c.num_experts} experts of {c.ffn_size}, vocab {c.vocab_size}), prefill "
          f"{SEQS}x{PREFILL_LEN}, routing recorded, mesh {args.mesh}, {args.compute_dtype}")
    print(f"{'dispatch':<9} {'layers':>6} {'trace+lower s':>14} {'compile s':>10} {'first call s':>13} "
          f"{'2nd call s':>11} {'s/layer (lower+compile) since previous L':>42}")
    for dispatch in dispatches:
        previous = None
        for L, r in results.items():
            found = [e for e in r["all_events"] if e["event"] == "compiled" and e.get("dispatch") == dispatch]
            if not found:
                print(f"{dispatch:<9} {L:>6} {r['stopped'] or 'no result'}")
                continue
            e = found[0]
            total = e["lower_s"] + e["compile_s"]
            slope = "" if previous is None else f"{(total - previous[1]) / (L - previous[0]):.3f}"
            print(f"{dispatch:<9} {L:>6} {e['lower_s']:>14.2f} {e['compile_s']:>10.2f} {e['first_s']:>13.3f} "
                  f"{e['second_s']:>11.3f} {slope:>42}")
            previous = (L, total)
    for L, r in results.items():
        if r["stopped"]:
            print(f"L={L}: {r['stopped']}\n    " + "\n    ".join(r["stderr"][-15:]))
    m = next((r["events"]["machine"] for r in results.values() if "machine" in r["events"]), None)
    if m:
        print(f"machine: {m['cores']} cores ({m['usable_cores']} usable, {m['cpu']}), jax {m['jax']} / jaxlib "
              f"{m['jaxlib']}, {m['devices']} {m['platform']} devices, grokscope from {m['grokscope']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["grok1", "grok2"], default="grok1")
    parser.add_argument("--layers", type=int, default=1, help="decoder layers of the full-width checkpoint (default 1)")
    parser.add_argument("--mesh", default="1x8", help="data x model (default 1x8: 8 simulated CPU devices)")
    parser.add_argument("--dispatch", default="grouped,ragged,dense", help="MoE dispatches, comma-separated")
    parser.add_argument("--dir", help="checkpoint directory (kept; default /tmp/grokscope-width/{arch}-{layers}L)")
    parser.add_argument("--compile-layers",
                        help="instead: compile seconds of a narrow config at these depths, e.g. 1,8,64")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after the first (default 3)")
    parser.add_argument("--compute-dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--quantize", choices=["int8"], default=None,
                        help="grok2 only: quantize the matmul weights to int8 as they load")
    parser.add_argument("--rss-limit-gb", type=float, default=20.0, help="stop a child past this RSS (default 20)")
    parser.add_argument("--timeout-min", type=float, default=10.0, help="stop a child after this long (default 10)")
    parser.add_argument("--narrow", action="store_true",
                        help="the width benchmark on the narrow config instead (checks this script in a minute)")
    parser.add_argument("--write-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--run-child", help=argparse.SUPPRESS)
    parser.add_argument("--compile-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeats < 3:
        parser.error("--repeats: at least 3")
    if args.write_child:
        config = width_config(args)
        (write_grok1 if args.arch == "grok1" else write_grok2)(config, Path(args.dir))
    elif args.run_child:
        run_child(json.loads(args.run_child))
    elif args.compile_child:
        compile_child(json.loads(args.compile_child))
    elif args.compile_layers:
        main_compile(args)
    else:
        main_width(args)


if __name__ == "__main__":
    main()
