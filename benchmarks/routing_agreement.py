"""How much do int8 weights move routing? grok-tiny as shipped (int8 x scale, products in
float32) against the same weights dequantised and rounded to bfloat16 (what a bf16 conversion of
the release runs), and against bfloat16 compute, on the held-out example prompts.

    python benchmarks/routing_agreement.py [--prompts FILE.jsonl]

Prints, per layer, top-1 agreement, exact top-2 set match, and the flip rate by p2-p3 margin.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np


def main() -> None:
    from grokscope import Session, save_params
    from grokscope.analysis import routing_agreement
    from grokscope.quant import QuantizedWeight8bit, dequantize
    from grokscope.session import default_model_dir

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", default=str(default_model_dir() / "examples.jsonl"))
    args = parser.parse_args()
    texts = [json.loads(line)["text"] for line in Path(args.prompts).read_text().splitlines() if line.strip()]

    shipped = Session()
    bf16 = {m: {n: (np.asarray(dequantize(v, jnp.bfloat16)).astype(np.float32) if isinstance(v, QuantizedWeight8bit)
                    else np.asarray(v)) for n, v in vs.items()} for m, vs in shipped.params.items()}
    with tempfile.TemporaryDirectory() as tmp:
        save_params(bf16, tmp, shipped.config, quantize_weights=False)
        (Path(tmp) / "config.json").write_text((default_model_dir() / "config.json").read_text())
        dequantised = Session(checkpoint=tmp, tokenizer=default_model_dir() / "tokenizer.model")
        runs = {"int8 (as shipped)": shipped.run(texts),
                "bf16 weights": dequantised.run(texts),
                "bf16 compute": Session(compute_dtype="bfloat16").run(texts)}
    reference = runs["int8 (as shipped)"]
    print(f"{len(texts)} prompts, {int(reference['length'].sum())} tokens; reference: int8 (as shipped)")
    for name in ("bf16 weights", "bf16 compute"):
        agreement = routing_agreement(reference, runs[name]).compute()
        print(f"\n{name}:")
        print(f"{'layer':>5} {'top-1 agree':>12} {'top-2 set':>10}")
        for i, layer in enumerate(agreement["layer"].values):
            print(f"{int(layer):>5} {float(agreement['top1_agreement'][i]):>12.4f} "
                  f"{float(agreement['set_match'][i]):>10.4f}")
        flips = agreement["flip_rate_by_margin"].values  # [layer, margin_bin]
        counts = agreement["tokens_by_margin"].values
        pooled = (flips * counts).sum(0) / np.maximum(counts.sum(0), 1)
        print("flip rate by p2-p3 margin over all (token, layer) cells (cells): " + ", ".join(
            f"[{lo:g}, {hi:g}): {rate:.4f} ({n})" for lo, hi, rate, n in zip(
                agreement["margin_lo"].values, agreement["margin_hi"].values, np.where(counts.sum(0) > 0, pooled, np.nan),
                counts.sum(0))))

if __name__ == "__main__":
    main()
