"""Checkpoint loading: throughput and peak host memory, grokscope vs read-everything-first.

Writes a synthetic checkpoint in the release's layout (int8 expert and attention weights
with bf16 scales, f32 embeddings/norms/routers) of about --size-gb, then loads it in a
fresh process per load and reports each way's load throughput (GB/s) and peak RSS
(ru_maxrss), against the bound checkpoint size + 2 x the largest tensor:

  streamed: grokscope.load_params (tensor by tensor, validated, placed as read)
  hashed:   the same with digests={} (each file's xxh3_128 computed as it is read)
  naive:    read every tensor into host memory first, then device_put the whole tree

streamed and hashed run --repeat times each, alternately (the table shows each one's
fastest run); the cost of hashing is given in wall-clock and in CPU time (all the load's
threads; the steadier on a busy machine), each as the median over those pairs of hashed /
streamed and as the ratio of the least times.

On a CPU backend the loaded parameters live in host memory, so the floor is about
1x the checkpoint; on an accelerator the parameters leave host memory as they are placed.

    python benchmarks/load.py --size-gb 3 [--device gpu] [--dir /tmp/bench-ckpt] [--repeat 3]
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


def synthetic_config(size_gb: float):
    from grokscope.config import ModelConfig

    per_layer = 3 * 8 * 2048 * 10928 + 4 * 2048 * 2048  # int8 expert + attention weights
    layers = max(1, round(size_gb * 1e9 / per_layer))
    return ModelConfig(emb_size=2048, key_size=128, num_q_heads=16, num_kv_heads=4, num_layers=layers,
                       vocab_size=32768, widening_factor=8, attn_output_multiplier=0.088, num_experts=8,
                       num_selected_experts=2, embedding_multiplier_scale=1.0, output_multiplier_scale=1.0)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=3.0)
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--dir", help="checkpoint directory (kept; default a temp dir, removed)")
    parser.add_argument("--repeat", type=int, default=3, help="loads with and without hashing, each (default 3)")
    parser.add_argument("--write-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    config = synthetic_config(args.size_gb)
    directory = Path(args.dir or tempfile.mkdtemp(prefix="grokscope-bench-"))
    if args.write_only:
        write_synthetic(config, directory)
        return
    if not (directory / "ckpt-0").is_dir():
        # In a child process: ru_maxrss carries over from a parent across fork, so this
        # process stays small.
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--size-gb", str(args.size_gb), "--dir", str(directory),
                        "--write-only"], check=True)
        print(f"wrote {directory} in {time.perf_counter() - t0:.0f} s")
    size = sum(f.stat().st_size for f in (directory / "ckpt-0").iterdir())
    env = {**os.environ, "JAX_PLATFORMS": args.device if args.device == "cpu" else "cuda"}
    env.pop("XLA_FLAGS", None)

    def load(mode: str) -> dict:
        out = subprocess.run([sys.executable, "-c", _CHILD, str(directory), mode,
                              json.dumps(dataclasses.asdict(config))],
                             capture_output=True, text=True, env=env)
        if out.returncode:
            sys.exit(f"the {mode} load failed (exit status {out.returncode}):\n{out.stderr[-4000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    runs: dict[str, list[dict]] = {"streamed": [], "hashed": [], "naive": []}
    for _ in range(max(1, args.repeat)):
        for mode in ("streamed", "hashed"):
            runs[mode].append(load(mode))
    runs["naive"].append(load("naive"))
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
    for what, key in (("load time", "seconds"), ("CPU time", "cpu_seconds")):
        ratios = sorted(h[key] / p[key] for p, h in zip(runs["streamed"], runs["hashed"]))
        fastest = min(r[key] for r in runs["hashed"]) / min(r[key] for r in runs["streamed"])
        print(f"hashing (xxh3_128 while loading), hashed/streamed {what}: {statistics.median(ratios):.3f} "
              f"(median of {len(ratios)} alternating pairs: {', '.join(f'{r:.3f}' for r in ratios)}); "
              f"least hashed / least streamed {fastest:.3f}")
    if not args.dir:
        import shutil

        shutil.rmtree(directory)


if __name__ == "__main__":
    main()
