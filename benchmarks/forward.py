"""Forward throughput: sparse expert dispatch against the dense reference, and a roofline line.

Measured in one run, per config (the `mid` config of 4 layers, d 512, 8 experts top-2,
widening 8, vocab 8192 at batch 4 x 256; and grok-tiny at batch 16 x 128):
  MoE layer alone   one MoE block (jitted), sparse vs dense, the same inputs, and the
                    temporary memory XLA allocates for each (int8 weights dequantised per call:
                    all experts at once when dense, one expert at a time when grouped)
  forward           the whole jitted forward (routing recorded), sparse vs dense
  roofline          the sparse forward's useful FLOP/s against this machine's matmul FLOP/s
                    (a 2048^3 float32 matmul), FLOPs counted from the shapes (k experts per token)
Timings are medians of --repeats runs after a warm-up (compilation excluded).

    python benchmarks/forward.py [--devices 1,8] [--device cpu|gpu] [--repeats 5]

Each device count runs in its own subprocess: with --devices 1,8 the second run has 8
simulated CPU devices (or the first 8 GPUs) and a (data=1, model=8) mesh, the release's
tensor-parallel layout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _median_seconds(fn, repeats: int) -> float:
    import numpy as np

    fn()  # warm-up (compiles)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _forward_flops(config, batch: int, length: int) -> float:
    """Multiply-adds x 2 of one forward with k experts per token (what the model needs)."""
    c = config
    tokens = batch * length
    d, f, h, kv, dh = c.emb_size, c.ffn_size, c.num_q_heads, c.num_kv_heads, c.key_size
    per_token_layer = (d * (h + 2 * kv) * dh + h * dh * d  # q, k, v, output projections
                       + 2 * h * dh * length / 2  # scores and weighted values, causal half on average
                       + d * c.num_experts  # router
                       + c.num_selected_experts * 3 * d * f)  # k experts' GeGLU
    return 2.0 * tokens * (c.num_layers * per_token_layer + d * c.vocab_size)


def _matmul_flops_per_second(repeats: int) -> float:
    import jax
    import jax.numpy as jnp

    n = 2048
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x, y: jnp.dot(x, y, precision=jax.lax.Precision.HIGHEST))
    seconds = _median_seconds(lambda: f(a, a).block_until_ready(), repeats)
    return 2 * n**3 / seconds


def run(repeats: int) -> dict:
    import haiku as hk
    import jax
    import numpy as np

    from grokscope import GROK_TINY, RecordSpec, init_params, make_mesh
    from grokscope.config import ModelConfig
    from grokscope.forward import jitted_forward
    from grokscope.model.moe import MoELayer
    from grokscope.sharding import batch_sharding, shard_params

    mid = ModelConfig(emb_size=512, key_size=64, num_q_heads=8, num_kv_heads=2, num_layers=4, vocab_size=8192,
                      widening_factor=8, attn_output_multiplier=0.125, num_experts=8, num_selected_experts=2,
                      embedding_multiplier_scale=22.627416997969522, output_multiplier_scale=0.5773502691896257,
                      pad_token=0, eos_token=2, sequence_len=256)
    n_dev = jax.device_count()
    mesh = make_mesh(1, n_dev) if n_dev > 1 else None
    results = {"devices": n_dev, "platform": jax.devices()[0].platform, "configs": {}}
    peak = _matmul_flops_per_second(repeats)
    results["matmul_flops"] = peak
    for name, config, (B, T) in (("mid", mid, (4, 256)), ("grok-tiny", GROK_TINY, (16, 128))):
        rng = np.random.default_rng(0)
        params = init_params(config, seed=0)
        tokens = rng.integers(1, config.vocab_size, (B, T)).astype(np.int32)
        positions = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
        if mesh is not None:
            params = shard_params(params, mesh)
            tokens = jax.device_put(tokens, batch_sharding(mesh, tokens.shape))
            positions = jax.device_put(positions, batch_sharding(mesh, positions.shape))
        row = {"batch": [B, T]}
        for dispatch in ("dense", "sparse"):
            fn = jitted_forward(config, RecordSpec(), "float32", dispatch)

            def call(fn=fn):
                if mesh is not None:
                    with jax.set_mesh(mesh):
                        jax.block_until_ready(fn(params, tokens, positions))
                else:
                    jax.block_until_ready(fn(params, tokens, positions))

            row[f"forward_{dispatch}_s"] = _median_seconds(call, repeats)
        # one MoE block alone, the first layer's weights
        prefix = "transformer/decoder_layer_0/"
        moe_params = {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix + "moe/")}
        x = jax.random.normal(jax.random.PRNGKey(1), (B, T, config.emb_size), np.float32)
        probs = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(2), (B, T, config.num_experts)), -1)
        for dispatch in ("dense", "sparse"):
            f = hk.without_apply_rng(hk.transform_with_state(
                lambda x, p, d=dispatch: MoELayer(config, d)(x, p)))
            apply = jax.jit(lambda prm, x, p, f=f: f.apply(prm, {}, x, p)[0])
            row[f"moe_{dispatch}_s"] = _median_seconds(lambda: apply(moe_params, x, probs).block_until_ready(),
                                                       repeats)
            memory = apply.lower(moe_params, x, probs).compile().memory_analysis()
            row[f"moe_{dispatch}_temp_bytes"] = int(getattr(memory, "temp_size_in_bytes", 0) or 0)
        row["tokens"] = B * T
        row["flops"] = _forward_flops(config, B, T)
        results["configs"][name] = row
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", default="1", help="comma-separated device counts, e.g. 1,8")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.json_child:
        print(json.dumps(run(args.repeats)))
        return
    runs = []
    for n in (int(x) for x in args.devices.split(",")):
        env = dict(os.environ, JAX_PLATFORMS="cpu" if args.device == "cpu" else "cuda")
        if args.device == "cpu":
            env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
        else:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(n))
        out = subprocess.run([sys.executable, __file__, "--json-child", "--repeats", str(args.repeats)],
                             env=env, capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"benchmark with {n} device(s) failed:\n{out.stderr[-3000:]}")
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    for r in runs:
        print(f"{r['platform']} x{r['devices']}  (matmul {r['matmul_flops'] / 1e9:.1f} GFLOP/s, float32 2048^3)")
        print(f"  {'config':<10} {'batch':>8} {'MoE dense':>10} {'MoE sparse':>11} {'speed-up':>9} "
              f"{'fwd dense':>10} {'fwd sparse':>11} {'speed-up':>9} {'tok/s sparse':>13} {'of peak':>8}")
        for name, row in r["configs"].items():
            B, T = row["batch"]
            flops_s = row["flops"] / row["forward_sparse_s"]
            print(f"  {name:<10} {f'{B}x{T}':>8} {row['moe_dense_s'] * 1e3:>8.1f}ms {row['moe_sparse_s'] * 1e3:>9.1f}ms "
                  f"{row['moe_dense_s'] / row['moe_sparse_s']:>8.2f}x {row['forward_dense_s'] * 1e3:>8.1f}ms "
                  f"{row['forward_sparse_s'] * 1e3:>9.1f}ms {row['forward_dense_s'] / row['forward_sparse_s']:>8.2f}x "
                  f"{row['tokens'] / row['forward_sparse_s']:>13.0f} {flops_s / r['matmul_flops']:>7.0%}")
        for name, row in r["configs"].items():
            print(f"  {name}: MoE temporaries dense {row['moe_dense_temp_bytes'] / 1e6:.1f} MB, "
                  f"sparse {row['moe_sparse_temp_bytes'] / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
