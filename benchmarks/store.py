"""The store writer against numpy.save of the same bytes to the same disk.

Batches shaped like a dump's (routing + attention top-16 on every layer and head, grok-tiny's
shape, random values) are written by `grokscope.store.StoreWriter` (compressing, 2 threads)
and, as the baseline, by numpy.save in the same pieces (each batch's block of each array, one
.npy file each). Both are timed into the page cache and until os.sync() returns; alternating
trials, medians. `benchmarks/dump.py` runs the same comparison on a real dump's batches.

    python benchmarks/store.py [--sequences 512] [--trials 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def compare_writer(variables, coords, recorded, work: Path, trials: int) -> dict:
    """Writes `recorded` [(row0, n_valid, {name: [B, ...] array})] `trials` times each way.

    Returns medians: writer / numpy seconds into the page cache and until synced, the bytes
    handed to each, bytes on disk, and the number of .npy files.
    """
    from grokscope.store import StoreWriter, create, row_blocks

    def write_store(trial: int) -> tuple[float, float, int]:
        group = create(work / f"writer-{trial}.zarr", variables, coords, {"grokscope": {"kind": "benchmark"}})
        os.sync()
        writer = StoreWriter(group)
        t0 = time.perf_counter()
        for row0, n, values in recorded:
            writer.put(row0, n, values)
        writer.close()
        seconds = time.perf_counter() - t0
        os.sync()
        return seconds, time.perf_counter() - t0, writer.bytes_written

    arrays = dict(create(work / "shape.zarr", variables, coords, {}).arrays())
    blocks = [(f"{name}-{row0}-{i}", block) for row0, n, values in recorded for name, value in values.items()
              for i, (_, block) in enumerate(row_blocks(arrays[name], value, row0, n, values["length"], name))]
    np_bytes = sum(b.nbytes for _, b in blocks)

    def write_npy(trial: int) -> tuple[float, float, int]:
        npy_dir = work / f"npy-{trial}"
        npy_dir.mkdir()
        os.sync()
        t0 = time.perf_counter()
        for key, block in blocks:
            np.save(npy_dir / f"{key}.npy", block)
        seconds = time.perf_counter() - t0
        os.sync()
        return seconds, time.perf_counter() - t0, np_bytes

    runs = {"writer": [], "npy": []}
    for trial in range(trials):  # alternating: page-cache speed swings from run to run
        runs["writer"].append(write_store(trial))
        runs["npy"].append(write_npy(trial))
    out = {"trials": trials, "files": len(blocks)}
    for name, results in runs.items():
        out[f"{name}_seconds"] = float(np.median([r[0] for r in results]))
        out[f"{name}_synced_seconds"] = float(np.median([r[1] for r in results]))
        out[f"{name}_bytes"] = results[0][2]
    out["store_on_disk"] = sum(f.stat().st_size for f in (work / "writer-0.zarr").rglob("*") if f.is_file())
    out["npy_on_disk"] = sum(f.stat().st_size for f in (work / "npy-0").iterdir())
    return out


def format_comparison(r: dict) -> str:
    mb = 1e6
    writer, npy = r["writer_bytes"] / mb / r["writer_seconds"], r["npy_bytes"] / mb / r["npy_seconds"]
    writer_s, npy_s = (r["writer_bytes"] / mb / r["writer_synced_seconds"],
                       r["npy_bytes"] / mb / r["npy_synced_seconds"])
    return (f"writer alone: {r['writer_bytes'] / mb:.1f} MB in {r['writer_seconds']:.2f} s = {writer:.0f} MB/s; "
            f"numpy.save of the same blocks ({r['npy_bytes'] / mb:.1f} MB, {r['files']} files): {npy:.0f} MB/s; "
            f"ratio {writer / npy:.2f}  (into the page cache; medians of {r['trials']})\n"
            f"the same, timed until os.sync() returns (on disk: store {r['store_on_disk'] / mb:.1f} MB, "
            f".npy {r['npy_on_disk'] / mb:.1f} MB): writer {writer_s:.0f} MB/s, numpy.save {npy_s:.0f} MB/s; "
            f"ratio {writer_s / npy_s:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    from grokscope import GROK_TINY, AttentionSpec, RecordSpec
    from grokscope.store import layout

    config, spec = GROK_TINY, RecordSpec(attention=AttentionSpec(format="topk", k=16))
    B, P, L, E, H = args.batch_size, args.max_len, config.num_layers, config.num_experts, config.num_q_heads
    rng = np.random.default_rng(0)
    recorded = []
    for row0 in range(0, args.sequences, B):
        n = min(B, args.sequences - row0)
        recorded.append((row0, n, {
            "tokens": rng.integers(0, config.vocab_size, (B, P)).astype(np.int32),
            "length": rng.integers(P // 4, P, B).astype(np.int32),
            "router_logits": rng.standard_normal((B, P, L, E)).astype(np.float32),
            "expert_index": rng.integers(0, E, (B, P, L, 2)).astype(np.int8),
            "expert_gate": rng.random((B, P, L, 2)).astype(np.float32),
            "attn_topk_index": np.sort(rng.integers(0, P, (B, L, H, P, 16)), -1).astype(np.int32),
            "attn_topk_weight": rng.random((B, L, H, P, 16)).astype(np.float16)}))
    variables, coords = layout(config, spec, args.sequences, P, B, {}, None)
    work = Path(tempfile.mkdtemp(prefix="grokscope-bench-store-"))
    try:
        result = compare_writer(variables, coords, recorded, work, args.trials)
    finally:
        shutil.rmtree(work)
    print(f"{args.sequences} sequences x {P} positions, batch {B}: routing + attention top-16 on "
          f"{L} layers x {H} heads (random values)")
    print(format_comparison(result))


if __name__ == "__main__":
    sys.exit(main())
