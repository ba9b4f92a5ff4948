"""Peak memory of the analysis functions on a store larger than the memory they use.

Writes a synthetic routing store (random router logits, their top-2, padding) of about
--size-gb on disk, chunk by chunk, then computes each metric in a fresh process and reports its
peak RSS (ru_maxrss) above the process's baseline next to the store's size: a lazy metric reads
the store chunk by chunk, so its peak stays a small fraction of the store. (The baseline is the
peak after importing and opening the store; ru_maxrss is a high-water mark.)

    python benchmarks/analysis_memory.py [--size-gb 1.5] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

METRICS = {
    "hard_load": "A.hard_load(ds)",
    "soft_load": "A.soft_load(ds)",
    "load_cv + max_vio": "(A.load_cv(ds), A.max_vio(ds))",
    "mean_router_entropy": "A.mean_router_entropy(ds)",
    "router_margins (layer mean)": "A.layer_mean(A.router_margins(ds)['margin_23'], ds)",
    "repetition_rate": "A.repetition_rate(ds)",
    "coactivation": "A.coactivation(ds)",
    "group_load": "A.group_load(ds, by='label')",
    "routing_agreement (self)": "A.routing_agreement(ds, ds)",
    "transition_information 0->1": "A.transition_information(ds, 0, 1)",
    "path_statistics layers 0-3": "A.path_statistics(ds, layers=[0, 1, 2, 3])",
    "vocabulary_specialization": "A.vocabulary_specialization(ds)",
    "expert_enrichment (50 perm.)": "A.expert_enrichment(ds, by='label', n_permutations=50)",
    "repetition_shuffle_test (20)": "A.repetition_shuffle_test(ds, n_permutations=20)",
}

_CHILD = r"""
import json, resource, sys, time
import grokscope.analysis as A
from grokscope import open_store
ds = open_store(sys.argv[1])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t0 = time.perf_counter()
result = eval(sys.argv[2])
for r in (result if isinstance(result, tuple) else (result,)):
    r.compute()
print(json.dumps({"base": base, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "seconds": time.perf_counter() - t0}))
"""


def write_store(path: Path, size_gb: float) -> None:
    import dataclasses

    from grokscope import RecordSpec, TINY
    from grokscope.store import create, layout

    config = dataclasses.replace(TINY, num_layers=16, sequence_len=512)
    P, L, E, B = 512, config.num_layers, config.num_experts, 64
    per_sequence = P * L * E * 4 + P * L * 2 * 5  # router_logits + expert_index + expert_gate
    S = max(B, int(size_gb * 1e9 / per_sequence) // B * B)
    variables, coords = layout(config, RecordSpec(), S, P, B, {"label": str}, None)
    group = create(path, variables, coords, {"grokscope": {"kind": "benchmark"}})
    rng = np.random.default_rng(0)
    for row0 in range(0, S, B):
        logits = rng.normal(size=(B, P, L, E)).astype(np.float32)
        index = np.argsort(-logits, axis=-1)[..., :2]
        probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        lengths = rng.integers(P // 4, P + 1, B).astype(np.int32)
        pad = np.arange(P)[None, :] >= lengths[:, None]
        index = index.astype(np.int8)
        index[pad] = -1
        logits[pad] = 0
        rows = slice(row0, row0 + B)
        group["router_logits"][rows] = logits
        group["expert_index"][rows] = index
        group["expert_gate"][rows] = np.take_along_axis(probs, index.astype(np.int64).clip(0), -1) * (~pad)[..., None, None]
        group["length"][rows] = lengths
        group["tokens"][rows] = np.where(pad, 0, rng.integers(1, 512, (B, P))).astype(np.int32)
        group["label"][rows] = np.array(["code", "prose"] * (B // 2), dtype=object)
        group["done"][rows] = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=1.5)
    parser.add_argument("--dir")
    args = parser.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="grokscope-analysis-mem-"))
    store = root / "store.zarr"
    if not store.exists():
        t0 = time.perf_counter()
        write_store(store, args.size_gb)
        print(f"wrote {store} in {time.perf_counter() - t0:.0f} s")
    import zarr

    group = zarr.open_group(str(store), mode="r")
    logical = sum(group[k].nbytes for k in group.array_keys())
    on_disk = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    print(f"store: {group['length'].shape[0]} sequences x {group['tokens'].shape[1]} positions x "
          f"{group['router_logits'].shape[2]} layers; {logical / 1e9:.2f} GB of arrays ({on_disk / 1e9:.2f} GB on disk)")
    print(f"{'metric':<32} {'baseline MB':>12} {'peak MB':>8} {'peak / store':>13} {'seconds':>8}")
    for name, expression in METRICS.items():
        out = subprocess.run([sys.executable, "-c", _CHILD, str(store), expression], capture_output=True, text=True)
        if out.returncode:
            print(f"{name:<32} failed: {out.stderr.strip().splitlines()[-1]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{name:<32} {r['base'] / 1e6:>12.0f} {r['peak'] / 1e6:>8.0f} {r['peak'] / logical:>13.2f} "
              f"{r['seconds']:>8.1f}")
    if not args.dir:
        import shutil

        shutil.rmtree(root)


if __name__ == "__main__":
    main()
