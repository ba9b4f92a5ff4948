"""Generation throughput with a key/value cache, with and without recording.

`Session.generate` on the bundled grok-tiny (or --checkpoint), greedy, the same prompt and
length each time: tokens/s with nothing recorded, with routing, and with routing + attention
top-8 on every layer, measured in one run (medians of --repeats after a warm-up, so
compilation is excluded).

    python benchmarks/generate.py [--checkpoint DIR] [--new-tokens 64] [--repeats 3] [--device cpu|gpu]
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    args = parser.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu" if args.device == "cpu" else "cuda")

    import jax
    import numpy as np

    from grokscope import AttentionSpec, RecordSpec, Session

    session = Session(checkpoint=args.checkpoint)
    prompt = "def moving_average(values, window):\n    "
    specs = {"nothing recorded": RecordSpec(routing=False), "routing": RecordSpec(),
             "routing + attention top-8": RecordSpec(attention=AttentionSpec(format="topk", k=8))}
    for spec in specs.values():  # warm-up: compile the prompt step and the one-token step
        session.generate(prompt, max_new_tokens=2, record=spec, stop_at_eos=False)
    times = {name: [] for name in specs}
    for _ in range(args.repeats):
        for name, spec in specs.items():
            t0 = time.perf_counter()
            gen = session.generate(prompt, max_new_tokens=args.new_tokens, record=spec, stop_at_eos=False)
            times[name].append(time.perf_counter() - t0)
            assert len(gen.token_ids) - gen.prompt_length == args.new_tokens
    base = float(np.median(times["nothing recorded"]))
    print(f"{jax.devices()[0].platform} x{jax.device_count()}; {session.config.num_layers} layers, "
          f"d={session.config.emb_size}; {args.new_tokens} new tokens after a "
          f"{len(session.tokenizer.encode(prompt))}-token prompt, greedy")
    print(f"{'record':<28} {'seconds':>8} {'tokens/s':>9} {'vs nothing':>11}")
    for name, t in times.items():
        seconds = float(np.median(t))
        print(f"{name:<28} {seconds:>8.3f} {args.new_tokens / seconds:>9.1f} {base / seconds:>10.0%}")


if __name__ == "__main__":
    sys.exit(main())
