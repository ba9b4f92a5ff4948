"""Dump throughput against the bare forward, and the store writer against numpy.save.

Measured in one run, on the same prompts and batches:
  forward only        the jitted forward (nothing recorded, nothing written)
  dump, routing       `grokscope.dump` recording routing (tokenise, forward, background writer)
  dump, +attention    routing + attention top-k (k=16) on all layers and heads
and the writer's MB/s on the topk run's batches, written with nothing else running, next to
numpy.save of the same bytes to the same disk in the same pieces (each batch's block of each
array, one file each), both into the page cache and timed until os.sync() returns (medians of
--write-trials alternating trials). Compilation is excluded (one warm-up pass first).

    python benchmarks/dump.py [--checkpoint DIR] [--prompts N] [--batch-size B] [--device cpu|gpu]

Without --checkpoint it uses the bundled model if present, else a random `small` model with a
tokenizer trained on the standard library's text.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _random_small(directory: Path) -> Path:
    import dataclasses
    import sysconfig

    import sentencepiece as spm

    from grokscope import SMALL, init_params, save_params

    save_params(init_params(SMALL, seed=0), directory, SMALL)
    (directory / "config.json").write_text(json.dumps(dataclasses.asdict(SMALL)))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    lines = [line for f in sorted(stdlib.glob("*.py"))[:60] for line in f.read_text(errors="ignore").splitlines()
             if line.strip()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(directory / "tokenizer"),
                                   vocab_size=SMALL.vocab_size, model_type="bpe", byte_fallback=True, pad_id=0,
                                   bos_id=1, eos_id=2, unk_id=3, num_threads=2, minloglevel=2)
    return directory


def _prompts(path: Path, n: int, tokenizer, max_tokens: int) -> Path:
    import sysconfig

    rng = np.random.default_rng(0)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "\n".join(f.read_text(errors="ignore") for f in sorted(stdlib.glob("*.py"))[60:120])
    words = text.split()
    with open(path, "w") as f:
        for _ in range(n):
            start = int(rng.integers(0, len(words) - 400))
            count = int(rng.integers(20, 120))
            prompt = " ".join(words[start:start + count])
            ids = tokenizer.encode(prompt)[:max_tokens]
            f.write(json.dumps({"text": tokenizer.decode(ids)}) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--write-trials", type=int, default=5, help="writer / numpy.save trials (medians)")
    args = parser.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu" if args.device == "cpu" else "cuda")

    import jax

    from grokscope import AttentionSpec, RecordSpec, dump
    from grokscope.dump import encode_prompts, read_prompts
    from grokscope.record import to_store_dtypes
    from grokscope.runner import bucket_length, pad, run, run_ids
    from grokscope.session import default_model_dir, load_model

    work = Path(tempfile.mkdtemp(prefix="grokscope-bench-dump-"))
    checkpoint = Path(args.checkpoint) if args.checkpoint else default_model_dir()
    if not (checkpoint / "ckpt-0").is_dir():
        checkpoint = _random_small(work / "model")
    model = load_model(checkpoint)
    prompts_file = _prompts(work / "prompts.jsonl", args.prompts, model.tokenizer, args.max_len)
    prompts, _ = read_prompts(prompts_file)
    ids = encode_prompts(model.tokenizer, [p.text for p in prompts], args.max_len, None,
                         [p.line for p in prompts], "bench")
    n_tokens = sum(len(i) for i in ids)
    B = args.batch_size
    batches = [ids[i:i + B] for i in range(0, len(ids), B)]

    def forward_logits() -> float:
        t0 = time.perf_counter()
        for batch in batches:
            length = bucket_length(max(len(i) for i in batch), args.max_len)
            _, outputs = run(model, pad(batch, length, B), RecordSpec(routing=False), outputs=("logits",))
            outputs["logits"].block_until_ready()
        return time.perf_counter() - t0

    specs = {"routing": RecordSpec(),
             "routing+attention topk": RecordSpec(attention=AttentionSpec(format="topk", k=16))}

    def run_dump(name: str, spec, tag: str):
        out = work / f"{name.replace(' ', '_').replace('+', '_')}-{tag}.zarr"
        t0 = time.perf_counter()
        summary = dump(prompts_file, out, model=model, record=spec, batch_size=B, max_len=args.max_len,
                       progress=False)
        return time.perf_counter() - t0, summary, out

    # warm-up: compile every bucket shape for every spec
    forward_logits()
    for name, spec in specs.items():
        run_dump(name, spec, "warmup")

    results = {"forward only": forward_logits()}
    summaries = {}
    for name, spec in specs.items():
        seconds, summary, out = run_dump(name, spec, "timed")
        results[f"dump, {name}"] = seconds
        summaries[name] = (summary, out)

    # The writer alone against numpy.save of the same bytes on the same disk, in the same
    # pieces. During a dump the writer shares the CPU with the forward; here the batches of
    # the topk run are computed first, then written with nothing else running.
    from grokscope.store import layout
    from store import compare_writer, format_comparison  # benchmarks/store.py

    spec = specs["routing+attention topk"]
    recorded = []
    for row0 in range(0, len(ids), B):
        batch = ids[row0:row0 + B]
        length = bucket_length(max(len(i) for i in batch), args.max_len)
        tokens, outputs, _ = run_ids(model, batch, length, spec, B)
        outputs = to_store_dtypes(outputs, model.config)
        lengths = np.array([len(i) for i in batch] + [0] * (B - len(batch)), np.int32)
        recorded.append((row0, len(batch), {"tokens": tokens, "length": lengths,
                                            **{k: np.asarray(v) for k, v in outputs.items()}}))
    variables, coords = layout(model.config, spec, len(ids), args.max_len, B, {}, None)
    comparison = compare_writer(variables, coords, recorded, work, args.write_trials)
    in_dump = summaries["routing+attention topk"][0]

    device = jax.devices()[0]
    print(f"model: {checkpoint.name if checkpoint.name != 'model' else 'random small'} "
          f"({model.config.num_layers} layers, d={model.config.emb_size}); {len(prompts)} prompts, "
          f"{n_tokens} tokens, batch {B}; device {device.platform} x{jax.device_count()}")
    base = results["forward only"]
    print(f"{'run':<34} {'seconds':>8} {'tokens/s':>10} {'vs forward':>11}")
    for name, seconds in results.items():
        print(f"{name:<34} {seconds:>8.2f} {n_tokens / seconds:>10.0f} {base / seconds:>10.0%}")
    print(format_comparison(comparison))
    print(f"(during the dump, sharing the CPU with the forward: {in_dump.bytes_written / 1e6:.1f} MB in "
          f"{in_dump.writer_seconds:.2f} s of writing = {in_dump.bytes_written / 1e6 / in_dump.writer_seconds:.0f} MB/s)")
    import shutil

    shutil.rmtree(work)


if __name__ == "__main__":
    sys.exit(main())
