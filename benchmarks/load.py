"""Checkpoint loading: throughput and peak host memory, grokscope vs read-everything-first.

Writes a synthetic checkpoint of about --size-gb in one release's layout, then loads it in a
fresh process per load and reports each way's load throughput (GB/s) and peak RSS
(ru_maxrss) against a bound of checkpoint size + 2 x the largest tensor.

--arch grok1 (the default): Grok-1's layout (`ckpt-0/tensor{i:05d}_000` pickles; int8 expert
and attention weights with bf16 scales, f32 embeddings/norms/routers). Each parameter is one
file, so the bound's "largest tensor" is the largest file.

  streamed: grokscope.load_params (tensor by tensor, validated, placed as read)
  hashed:   the same with digests={} (each file's xxh3_128 computed as it is read)
  naive:    read every tensor into host memory first, then device_put the whole tree

--arch grok2: Grok-2's release layout, written by `grokscope.formats.grok2.save_release` (39
bfloat16 safetensors files: 18 kinds of tensor, the experts' w1/w2/w3 split over 8 TP ranks)
for a Grok-2-architecture config (dense MLP beside 8 experts top-2, untied head) with
d 2048, 16 q / 4 kv heads of 128, expert width 4096, dense width 8192, vocab 32768, and as
many layers as reach --size-gb. A stacked expert weight [E, D, F] is assembled from 8 experts
x 8 rank slices, so the bound's "largest tensor" is the largest parameter as grokscope holds
it (bfloat16), not the largest tensor in a file; both are printed.

  streamed: grokscope.formats.load_params (parameter by parameter, validated, placed as assembled)
  hashed:   the same with digests={}
  int8:     the same with quantize="int8" (matmul weights quantized as they load); the
            table's "loaded GB" column gives the bytes of the loaded parameters
  naive:    read every tensor of every file into host memory first, assemble the parameters
            from them, drop the file tensors, then device_put the whole tree

It also prints the per-device parameter memory of the real Grok-2 (`grokscope.config.GROK_2`)
on a 1x8 mesh, as stored (bfloat16) and with int8, from `grokscope.layout.device_bytes`
(nothing is loaded).

streamed and hashed run --repeat times each, alternately (the table shows each one's
fastest run; naive and int8 run once); the cost of hashing is given in wall-clock and in CPU
time (all the load's threads; the steadier on a busy machine), each as the median over those
pairs of hashed / streamed and as the ratio of the least times.

On a CPU backend the loaded parameters live in host memory, so the floor is about
1x the checkpoint; on an accelerator the parameters leave host memory as they are placed.

    python benchmarks/load.py --size-gb 3 [--arch grok2] [--device gpu] [--dir /tmp/bench-ckpt] [--repeat 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_CHILD = r"""
import json, os, resource, sys, time
import jax
jax.devices()
from grokscope import load_params, ModelConfig
from grokscope.checkpoint import read_tensor, tensor_path, check_tensor
from grokscope.layout import param_shapes
config = ModelConfig.from_dict(json.loads(sys.argv[3]))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t0, c0 = time.perf_counter(), time.process_time()
if sys.argv[2] == "streamed":
    params = load_params(sys.argv[1], config)
elif sys.argv[2] == "hashed":
    digests = {}
    params = load_params(sys.argv[1], config, digests=digests)
    assert len(digests) == len(param_shapes(config))
else:
    shapes = param_shapes(config)
    host = {}
    for i, (path, s) in enumerate(shapes.items()):
        v = read_tensor(tensor_path(sys.argv[1], i))
        check_tensor(v, path, s, path)
        host[path] = v
    params = jax.device_put(host, jax.devices()[0])
jax.block_until_ready(params)
seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"baseline_rss": base, "peak_rss": peak, "seconds": seconds, "cpu_seconds": cpu_seconds,
                  "platform": jax.devices()[0].platform}))
"""

_CHILD_GROK2 = r"""
import json, re, resource, sys, time
import jax
import numpy as np
jax.devices()
from grokscope import ModelConfig
from grokscope.formats import load_params
from grokscope.formats.grok2 import checkpoint_files, release_names
from grokscope.formats.safetensors_io import read_header, read_tensor
from grokscope.layout import param_layout
directory, mode = sys.argv[1], sys.argv[2]
config = ModelConfig.from_dict(json.loads(sys.argv[3]))
layout = param_layout(config)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t0, c0 = time.perf_counter(), time.process_time()
if mode == "streamed":
    params = load_params(directory, config)
elif mode == "hashed":
    digests = {}
    params = load_params(directory, config, digests=digests)
    assert len(digests) == len(layout)
elif mode == "int8":
    params = load_params(directory, config, quantize="int8")
else:
    raw = {}
    for file in checkpoint_files(directory):
        rank = re.search(r"-TP-(common|\d{3})\.safetensors$", file.name).group(1)
        for name, info in read_header(file).items():
            raw.setdefault(name, []).append((-1 if rank == "common" else int(rank), read_tensor(info)))
    host = {path: np.empty(spec.shape, spec.dtype) for path, spec in layout.items()}
    for name, source in release_names(config).items():
        parts = [v for _, v in sorted(raw[name], key=lambda p: p[0])]
        split = next((d for d in range(len(source.shape)) if parts[0].shape[d] != source.shape[d]), 0)
        whole = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=split)
        assert whole.shape == source.shape, (name, whole.shape, source.shape)
        whole = whole.T if source.transpose else whole
        dest = host[source.param]
        if source.expert is None:
            dest[...] = whole
        else:
            dest[source.expert] = whole
    del raw, parts, whole
    tree = {}
    for path, value in host.items():
        module, name = path.rsplit("/", 1)
        tree.setdefault(module, {})[name] = value
    del host
    params = jax.device_put(tree, jax.devices()[0])
jax.block_until_ready(params)
seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
loaded = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(params))
print(json.dumps({"baseline_rss": base, "peak_rss": peak, "seconds": seconds, "cpu_seconds": cpu_seconds,
                  "platform": jax.devices()[0].platform, "param_bytes": loaded}))
"""


def synthetic_config(size_gb: float):
    from grokscope.config import ModelConfig

    per_layer = 3 * 8 * 2048 * 10928 + 4 * 2048 * 2048  # int8 expert + attention weights
    layers = max(1, round(size_gb * 1e9 / per_layer))
    return ModelConfig(emb_size=2048, key_size=128, num_q_heads=16, num_kv_heads=4, num_layers=layers,
                       vocab_size=32768, widening_factor=8, attn_output_multiplier=0.088, num_experts=8,
                       num_selected_experts=2, embedding_multiplier_scale=1.0, output_multiplier_scale=1.0)


def synthetic_config_grok2(size_gb: float):
    """A Grok-2-architecture config whose bfloat16 checkpoint is about `size_gb` GB."""
    import numpy as np

    from grokscope.config import GROK2_TINY
    from grokscope.layout import param_layout

    def config(layers):
        return dataclasses.replace(GROK2_TINY, emb_size=2048, key_size=128, num_q_heads=16, num_kv_heads=4,
                                   num_layers=layers, vocab_size=32768, attn_output_multiplier=128 ** -0.5,
                                   embedding_multiplier_scale=2048 ** 0.5, sequence_len=8192,
                                   attn_temperature_len=1024, moe_ffn_size=4096, dense_ffn_size=8192)

    def nbytes(c):
        return sum(int(np.prod(s.shape)) * s.dtype.itemsize for s in param_layout(c).values())

    fixed = nbytes(config(1)) - (nbytes(config(2)) - nbytes(config(1)))  # embeddings, head, final norm
    per_layer = nbytes(config(2)) - nbytes(config(1))
    return config(max(1, round((size_gb * 1e9 - fixed) / per_layer)))


def write_synthetic(config, directory: Path) -> None:
    import ml_dtypes
    import numpy as np

    from grokscope import save_params
    from grokscope.layout import is_quantizable, param_shapes, release_scale_blocks
    from grokscope.quant import QuantizedWeight8bit

    rng = np.random.default_rng(0)
    params: dict = {}
    for path, (shape, dtype) in param_shapes(config).items():
        module, name = path.rsplit("/", 1)
        if is_quantizable(path):
            blocks = release_scale_blocks(path, shape)
            value = QuantizedWeight8bit(
                weight=rng.integers(-127, 128, size=shape, dtype=np.int8),
                scales=np.full(shape[:-2] + (blocks, shape[-1]), 0.01, ml_dtypes.bfloat16))
        else:
            value = rng.standard_normal(shape, dtype=np.float32)
        params.setdefault(module, {})[name] = value
    save_params(params, directory, config)


def write_synthetic_grok2(config, directory: Path) -> None:
    """Random bfloat16 parameters of `config`, written in the release's layout. `save_release`
    holds the whole params dict and the torch-order copies of its tensors until it writes,
    about 2x the checkpoint; a float32 temporary of one parameter at a time besides."""
    import ml_dtypes
    import numpy as np

    from grokscope.formats.grok2 import save_release
    from grokscope.layout import param_layout

    rng = np.random.default_rng(0)
    params: dict = {}
    for path, spec in param_layout(config).items():
        module, name = path.rsplit("/", 1)
        value = np.empty(spec.shape, ml_dtypes.bfloat16)
        flat = value.reshape(-1)
        for start in range(0, flat.size, 1 << 24):  # float32 temporaries of 64 MB at most
            chunk = flat[start:start + (1 << 24)]
            chunk[...] = rng.standard_normal(chunk.size, dtype=np.float32) * 0.02
        params.setdefault(module, {})[name] = value
    save_release(params, config, directory)


def _load(child: str, directory: Path, mode: str, config, env) -> dict:
    out = subprocess.run([sys.executable, "-c", child, str(directory), mode, json.dumps(dataclasses.asdict(config))],
                         capture_output=True, text=True, env=env)
    if out.returncode:
        sys.exit(f"the {mode} load failed (exit status {out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _print_hashing(runs: dict[str, list[dict]]) -> None:
    for what, key in (("load time", "seconds"), ("CPU time", "cpu_seconds")):
        ratios = sorted(h[key] / p[key] for p, h in zip(runs["streamed"], runs["hashed"]))
        fastest = min(r[key] for r in runs["hashed"]) / min(r[key] for r in runs["streamed"])
        print(f"hashing (xxh3_128 while loading), hashed/streamed {what}: {statistics.median(ratios):.3f} "
              f"(median of {len(ratios)} alternating pairs: {', '.join(f'{r:.3f}' for r in ratios)}); "
              f"least hashed / least streamed {fastest:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["grok1", "grok2"], default="grok1",
                        help="the release layout to write and load (default grok1)")
    parser.add_argument("--size-gb", type=float, default=3.0)
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--dir", help="checkpoint directory (kept; default a temp dir, removed)")
    parser.add_argument("--repeat", type=int, default=3, help="loads with and without hashing, each (default 3)")
    parser.add_argument("--write-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    grok2 = args.arch == "grok2"
    config = synthetic_config_grok2(args.size_gb) if grok2 else synthetic_config(args.size_gb)
    directory = Path(args.dir or tempfile.mkdtemp(prefix="grokscope-bench-"))
    if args.write_only:
        (write_synthetic_grok2 if grok2 else write_synthetic)(config, directory)
        return
    if grok2:
        from grokscope.formats.grok2 import is_grok2_dir

        written = is_grok2_dir(directory)
    else:
        written = (directory / "ckpt-0").is_dir()
    if not written:
        # In a child process: ru_maxrss carries over from a parent across fork, so this
        # process stays small.
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--arch", args.arch, "--size-gb", str(args.size_gb),
                        "--dir", str(directory), "--write-only"], check=True)
        print(f"wrote {directory} in {time.perf_counter() - t0:.0f} s")
    env = {**os.environ, "JAX_PLATFORMS": args.device if args.device == "cpu" else "cuda"}
    env.pop("XLA_FLAGS", None)
    if grok2:
        report_grok2(config, directory, env, args.repeat)
    else:
        report_grok1(config, directory, env, args.repeat)
    if not args.dir:
        import shutil

        shutil.rmtree(directory)


def report_grok1(config, directory: Path, env, repeat: int) -> None:
    size = sum(f.stat().st_size for f in (directory / "ckpt-0").iterdir())
    runs: dict[str, list[dict]] = {"streamed": [], "hashed": [], "naive": []}
    for _ in range(max(1, repeat)):
        for mode in ("streamed", "hashed"):
            runs[mode].append(_load(_CHILD, directory, mode, config, env))
    runs["naive"].append(_load(_CHILD, directory, "naive", config, env))
    results = {mode: min(rs, key=lambda r: r["seconds"]) for mode, rs in runs.items()}
    gb = 1e9
    print(f"checkpoint: {size / gb:.2f} GB in {config.num_layers + 2} layers' worth of files "
          f"({len(list((directory / 'ckpt-0').iterdir()))} tensors), platform {results['streamed']['platform']}")
    largest = max(f.stat().st_size for f in (directory / "ckpt-0").iterdir())
    bound = size + 2 * largest
    print(f"bound: checkpoint + 2 x largest tensor ({largest / gb:.2f} GB) = {bound / gb:.2f} GB")
    print(f"{'mode':<10} {'peak RSS GB':>12} {'above baseline GB':>18} {'peak/ckpt':>10} {'peak/bound':>11} "
          f"{'seconds':>8} {'GB/s':>6}")
    for mode, r in results.items():
        above = r["peak_rss"] - r["baseline_rss"]
        print(f"{mode:<10} {r['peak_rss'] / gb:>12.2f} {above / gb:>18.2f} {r['peak_rss'] / size:>10.2f} "
              f"{r['peak_rss'] / bound:>11.2f} {r['seconds']:>8.1f} {size / gb / r['seconds']:>6.2f}")
    s, n = results["streamed"], results["naive"]
    print(f"ratio streamed/naive peak RSS above baseline: "
          f"{(s['peak_rss'] - s['baseline_rss']) / (n['peak_rss'] - n['baseline_rss']):.2f}")
    _print_hashing(runs)


def report_grok2(config, directory: Path, env, repeat: int) -> None:
    import numpy as np

    from grokscope.config import GROK_2
    from grokscope.formats.grok2 import checkpoint_files, release_names
    from grokscope.formats.safetensors_io import read_header
    from grokscope.layout import device_bytes, param_layout

    files = checkpoint_files(directory)
    size = sum(f.stat().st_size for f in files)
    tensors = [info for f in files for info in read_header(f).values()]
    layout = param_layout(config)
    pieces: dict[str, int] = {}
    sources = release_names(config)
    for info in tensors:
        pieces[sources[info.name].param] = pieces.get(sources[info.name].param, 0) + 1
    sizes = {path: int(np.prod(spec.shape)) * spec.dtype.itemsize for path, spec in layout.items()}
    # The largest parameter; among equals, the one assembled from the most file tensors.
    largest_param = max(layout, key=lambda p: (sizes[p], pieces[p]))
    largest_file_tensor = max(tensors, key=lambda t: t.nbytes)

    runs: dict[str, list[dict]] = {"streamed": [], "hashed": [], "int8": [], "naive": []}
    for _ in range(max(1, repeat)):
        for mode in ("streamed", "hashed"):
            runs[mode].append(_load(_CHILD_GROK2, directory, mode, config, env))
    for mode in ("int8", "naive"):
        runs[mode].append(_load(_CHILD_GROK2, directory, mode, config, env))
    results = {mode: min(rs, key=lambda r: r["seconds"]) for mode, rs in runs.items()}
    gb = 1e9
    print(f"checkpoint: {size / gb:.2f} GB in {len(files)} files ({len(tensors)} tensors; {config.num_layers} "
          f"layers, {len(layout)} parameters), Grok-2 release layout (bfloat16, experts over 8 TP ranks), "
          f"platform {results['streamed']['platform']}")
    t = largest_file_tensor
    print(f"largest file tensor: {t.nbytes / gb:.3f} GB ({t.name} {list(t.shape)}, {t.file.name})")
    print(f"largest parameter:   {sizes[largest_param] / gb:.3f} GB ({largest_param} "
          f"{list(layout[largest_param].shape)} bfloat16, from {pieces[largest_param]} file tensors)")
    bound = size + 2 * sizes[largest_param]
    print(f"bound: checkpoint + 2 x largest parameter = {bound / gb:.2f} GB")
    print(f"{'mode':<10} {'peak RSS GB':>12} {'above baseline GB':>18} {'peak/ckpt':>10} {'peak/bound':>11} "
          f"{'loaded GB':>10} {'seconds':>8} {'GB/s':>6}")
    for mode, r in results.items():
        above = r["peak_rss"] - r["baseline_rss"]
        print(f"{mode:<10} {r['peak_rss'] / gb:>12.2f} {above / gb:>18.2f} {r['peak_rss'] / size:>10.2f} "
              f"{r['peak_rss'] / bound:>11.2f} {r['param_bytes'] / gb:>10.2f} {r['seconds']:>8.1f} "
              f"{size / gb / r['seconds']:>6.2f}")
    s, n = results["streamed"], results["naive"]
    print(f"ratio streamed/naive peak RSS above baseline: "
          f"{(s['peak_rss'] - s['baseline_rss']) / (n['peak_rss'] - n['baseline_rss']):.2f}")
    _print_hashing(runs)
    print(f"real Grok-2 (GROK_2, {GROK_2.num_layers} layers, d {GROK_2.emb_size}) on a 1x8 mesh, parameters per "
          f"device: {device_bytes(GROK_2, 1, 8) / gb:.2f} GB as stored (bfloat16), "
          f"{device_bytes(GROK_2, 1, 8, quantize='int8') / gb:.2f} GB with quantize='int8'")


if __name__ == "__main__":
    main()
