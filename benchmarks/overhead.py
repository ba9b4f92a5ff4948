"""The cost of recording: the jitted forward with each RecordSpec against recording nothing.

Measured in one run on the same batch (the `mid` config of benchmarks/forward.py, 4 x 256
tokens, sparse dispatch), compilation excluded, medians of --repeats runs:
  none                         logits only
  routing                      router logits, expert indices and gates, every layer
  routing + attention topk     + the top-16 keys per query, every layer and head
  routing + attention head_mean
  + residual                   + the residual stream after every layer
and, from XLA's compiled memory analysis, each program's temporary and output bytes: an
attention record in `topk` or `head_mean` form holds one layer's [heads, T, T] probabilities
at a time (as attention itself does), never all layers' at once.

    python benchmarks/overhead.py [--device cpu|gpu] [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    args = parser.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu" if args.device == "cpu" else "cuda")

    import jax
    import numpy as np

    from grokscope import AttentionSpec, RecordSpec, init_params
    from grokscope.config import ModelConfig
    from grokscope.forward import jitted_forward

    config = ModelConfig(emb_size=512, key_size=64, num_q_heads=8, num_kv_heads=2, num_layers=4, vocab_size=8192,
                         widening_factor=8, attn_output_multiplier=0.125, num_experts=8, num_selected_experts=2,
                         embedding_multiplier_scale=22.627416997969522, output_multiplier_scale=0.5773502691896257,
                         pad_token=0, eos_token=2, sequence_len=args.length)
    B, T = args.batch, args.length
    params = init_params(config, seed=0)
    tokens = np.random.default_rng(0).integers(1, config.vocab_size, (B, T)).astype(np.int32)
    positions = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
    specs = {
        "none": RecordSpec(routing=False),
        "routing": RecordSpec(),
        "routing + attention topk k=16": RecordSpec(attention=AttentionSpec(format="topk", k=16)),
        "routing + attention head_mean": RecordSpec(attention=AttentionSpec(format="head_mean")),
        "routing + topk + residual": RecordSpec(attention=AttentionSpec(format="topk", k=16), residual="all"),
        "routing + attention full": RecordSpec(attention=AttentionSpec(format="full")),
    }
    fns = {name: jitted_forward(config, spec, "float32", "sparse") for name, spec in specs.items()}
    memory = {}
    for name, fn in fns.items():
        compiled = fn.lower(params, tokens, positions).compile()
        analysis = compiled.memory_analysis()
        memory[name] = (getattr(analysis, "temp_size_in_bytes", 0), getattr(analysis, "output_size_in_bytes", 0))
        jax.block_until_ready(fn(params, tokens, positions))  # warm-up
    # interleaved rounds, so that drifts of the machine hit every spec alike
    times = {name: [] for name in fns}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(params, tokens, positions))
            times[name].append(time.perf_counter() - t0)
    seconds = {name: float(np.median(t)) for name, t in times.items()}
    base = seconds["none"]
    one_layer_probs = B * config.num_q_heads * T * T * 4
    print(f"{jax.devices()[0].platform} x{jax.device_count()}; mid config (4 layers, d 512, 8 experts top-2), "
          f"batch {B} x {T}; one layer's attention probabilities: {one_layer_probs / 1e6:.1f} MB")
    print(f"{'record':<32} {'ms':>8} {'vs none':>8} {'overhead':>9} {'temp MB':>9} {'output MB':>10}")
    for name in fns:
        temp, out = memory[name]
        print(f"{name:<32} {seconds[name] * 1e3:>8.1f} {seconds[name] / base:>8.3f} {seconds[name] / base - 1:>+9.1%} "
              f"{temp / 1e6:>9.1f} {out / 1e6:>10.1f}")


if __name__ == "__main__":
    sys.exit(main())
