"""Batch activation dumps: prompts -> batches -> forward -> background writer -> zarr store.

`dump(prompts_file, out, ...)` (and `grokscope dump`) runs every prompt through the model
and records what the RecordSpec asks for. Running the same command again after Ctrl-C or
`kill -9` resumes: batches already marked `done` are skipped, the others are computed and
written again, so each sequence is written exactly once and the finished store equals an
uninterrupted run's.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

import jax
import numpy as np
import zarr

import grokscope
from grokscope.forward import jitted_forward
from grokscope.record import RecordSpec, to_store_dtypes
from grokscope.sharding import batch_sharding, place
from grokscope.store import RESERVED_NAMES, StoreWriter, column_dtype, create, layout

__all__ = ["dump", "DumpError", "DumpSummary", "Prompt", "read_prompts", "encode_prompts", "run_batch"]


class DumpError(ValueError):
    """Bad input to a dump (prompts, lengths, output path), named precisely."""


@dataclasses.dataclass(frozen=True)
class Prompt:
    text: str
    metadata: dict
    line: int


def read_prompts(path: str | Path) -> tuple[list[Prompt], int]:
    """Reads a `.txt` (one prompt per line) or `.jsonl` (`{"text": ..., other fields}`) file.

    Returns (prompts, number of blank lines skipped).

    Raises:
      DumpError: missing or empty file, a line that is not UTF-8 or not valid JSON, a JSON
        line without a string "text", or inconsistent metadata fields (naming the line).
    """
    path = Path(path)
    if not path.is_file():
        raise DumpError(f"prompts file not found: {path}")
    jsonl = path.suffix == ".jsonl"
    if not jsonl and path.suffix != ".txt":
        raise DumpError(f"{path}: expected a .txt (one prompt per line) or .jsonl file")
    prompts, blank = [], 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DumpError(f"{path}:{number}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            line = line.rstrip("\r\n")
            if not line.strip():
                blank += 1
                continue
            if not jsonl:
                prompts.append(Prompt(line, {}, number))
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DumpError(f"{path}:{number}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DumpError(f'{path}:{number}: expected an object with a string "text" field')
            metadata = {k: v for k, v in record.items() if k != "text"}
            reserved = sorted(set(metadata) & RESERVED_NAMES)
            if reserved:
                raise DumpError(f"{path}:{number}: field names {reserved} are reserved by the store")
            bad = [k for k, v in metadata.items() if not isinstance(v, (str, int, float, bool))]
            if bad:
                raise DumpError(f"{path}:{number}: metadata fields {bad} must be strings, numbers or booleans")
            prompts.append(Prompt(record["text"], metadata, number))
    if not prompts:
        raise DumpError(f"{path}: no prompts (the file is empty or blank)")
    fields = set().union(*(p.metadata for p in prompts))
    for p in prompts:
        missing = sorted(fields - set(p.metadata))
        if missing:
            raise DumpError(f"{path}:{p.line}: missing metadata fields {missing} that other lines have")
    return prompts, blank


def encode_prompts(tokenizer, texts: Sequence[str], max_len: int, truncate: str | None,
                   lines: Sequence[int], source: str) -> list[list[int]]:
    """Token ids of every text; a text longer than `max_len` is an error unless truncated."""
    if truncate not in (None, "left", "right"):
        raise DumpError(f"truncate: expected 'left' or 'right', got {truncate!r}")
    out = []
    for text, line in zip(texts, lines):
        ids = tokenizer.encode(text)
        if not ids:
            raise DumpError(f"{source}:{line}: the prompt encodes to no tokens")
        if len(ids) > max_len:
            if truncate is None:
                raise DumpError(f"{source}:{line}: {len(ids)} tokens, longer than max_len {max_len} "
                                f"(raise --max-len, or pass --truncate left|right)")
            ids = ids[-max_len:] if truncate == "left" else ids[:max_len]
        out.append(ids)
    return out


def run_batch(model, record: RecordSpec, ids: Sequence[Sequence[int]], length: int, compute_dtype: str,
              batch_size: int | None = None):
    """Pads `ids` into [batch_size, length] tokens and runs the recorded forward.

    Returns (tokens as numpy, record dict of device arrays in the store's dtypes).
    """
    rows = batch_size or len(ids)
    tokens = np.zeros((rows, length), np.int32)
    for i, seq in enumerate(ids):
        tokens[i, : len(seq)] = seq
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape)
    fn = jitted_forward(model.config, record, compute_dtype)
    if model.mesh is None:
        _, outputs = fn(model.params, tokens, positions)
        return tokens, to_store_dtypes(outputs)
    with jax.set_mesh(model.mesh):
        _, outputs = fn(model.params, place(tokens, batch_sharding(model.mesh, tokens.shape)),
                        place(positions, batch_sharding(model.mesh, positions.shape)))
        return tokens, to_store_dtypes(outputs)


@dataclasses.dataclass(frozen=True)
class DumpSummary:
    path: str
    sequences: int
    tokens: int
    sequences_written: int
    bytes_written: int
    seconds: float
    resumed: bool
    writer_seconds: float = 0.0  # time the writer thread spent writing (not waiting)

    def __str__(self) -> str:
        what = f"{self.sequences_written} of {self.sequences} sequences written" if self.resumed else \
            f"{self.sequences} sequences"
        return (f"{self.path}: {what}, {self.tokens} tokens, {self.bytes_written / 1e6:.1f} MB written "
                f"in {self.seconds:.1f} s")


class _Progress:
    """A one-line progress display on stderr: sequences, tokens/s, ETA."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled
        self.start = time.perf_counter()
        self.done = self.tokens = 0
        self._last = 0.0
        self._tty = sys.stderr.isatty()

    def update(self, sequences: int, tokens: int, final: bool = False):
        self.done += sequences
        self.tokens += tokens
        now = time.perf_counter()
        if not self.enabled or (not final and now - self._last < (0.2 if self._tty else 5.0)):
            return
        self._last = now
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        width = 24
        filled = int(width * self.done / max(self.total, 1))
        line = (f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} seq  "
                f"{self.tokens / elapsed:,.0f} tok/s  ETA {eta:,.0f} s")
        print(("\r" if self._tty else "") + line, end="\n" if (final or not self._tty) else "", file=sys.stderr,
              flush=True)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _identity(model, record, prompts_path, batch_size, max_len, truncate, compute_dtype) -> dict:
    """What must match for a store to be resumed (and is kept as provenance)."""
    return {
        "model_config": model.config.to_dict(),
        "checkpoint": model.checkpoint_identity,
        "tokenizer": model.tokenizer.identity(),
        "record_spec": record.resolved(model.config).to_dict(),
        "prompts": {"path": str(Path(prompts_path).resolve()), "sha256": _sha256(Path(prompts_path))},
        "batch_size": batch_size, "max_len": max_len, "truncate": truncate, "compute_dtype": compute_dtype,
    }


_COMPARED = ("model_config", "record_spec", "tokenizer", "batch_size", "max_len", "truncate", "compute_dtype")


def _differences(stored: dict, wanted: dict) -> list[str]:
    out = []
    for key in _COMPARED:
        if json.loads(json.dumps(stored.get(key))) != json.loads(json.dumps(wanted[key])):
            out.append(f"{key}: store has {stored.get(key)!r}, this run has {wanted[key]!r}")
    if stored.get("checkpoint", {}).get("index_sha256") != wanted["checkpoint"]["index_sha256"]:
        out.append(f"checkpoint: store was written from {stored.get('checkpoint', {}).get('path')}, "
                   f"this run uses {wanted['checkpoint']['path']} (different tensor files)")
    if stored.get("prompts", {}).get("sha256") != wanted["prompts"]["sha256"]:
        out.append("prompts: the prompts file's contents differ from the store's")
    return out


def _open_for_resume(out: Path, identity: dict):
    if not (out / "zarr.json").is_file():
        raise DumpError(f"{out} exists and is not a zarr store; choose another --out (nothing was changed)")
    group = zarr.open_group(store=str(out), mode="r+", zarr_format=3)
    attrs = dict(group.attrs)
    if "grokscope" not in attrs:
        raise DumpError(f"{out} is a zarr store but not a grokscope dump; choose another --out")
    differences = _differences(attrs, identity)
    if differences:
        raise DumpError(f"{out} was written by a different dump; not resuming:\n  " + "\n  ".join(differences))
    return group


def dump(prompts_file: str | Path, out: str | Path, *, checkpoint: str | Path | None = None,
         tokenizer: str | Path | None = None, config=None, record: RecordSpec = RecordSpec(),
         batch_size: int = 8, max_len: int | None = None, truncate: str | None = None,
         compute_dtype: str = "float32", mesh=None, progress: bool = True, model=None) -> DumpSummary:
    """Dumps the recorded activations of every prompt in `prompts_file` into the store `out`.

    Args:
      prompts_file: `.txt` (a prompt per line) or `.jsonl` (`{"text": ..., "label": ...}`).
      out: the store's path (a new path, or an unfinished/finished dump of the same settings).
      checkpoint, tokenizer, config: the model (default: the bundled one); see `load_model`.
      record: what to record.
      batch_size: sequences per forward (and the store's chunk along `sequence`).
      max_len: the store's `position` size; default the config's `sequence_len`.
      truncate: None (too-long prompts are an error), "left" or "right".
      compute_dtype: "float32" or "bfloat16".
      mesh: run sharded on this mesh. In a multi-process job (after
        `grokscope.distributed.initialize`) the mesh spans every process's devices (default:
        data = processes, model = each process's devices); each process writes the rows its
        devices hold, process 0 creates the store and marks it complete.
      progress: show a progress line on stderr.
      model: an already loaded `LoadedModel` (instead of checkpoint/tokenizer/config).

    Returns:
      A DumpSummary (printable).
    """
    from grokscope import distributed
    from grokscope.session import bucket_length, load_model, resolve_model

    t0 = time.perf_counter()
    multi = jax.process_count() > 1
    leader = jax.process_index() == 0
    if multi and mesh is None:
        from grokscope.sharding import make_mesh

        mesh = make_mesh(jax.process_count(), jax.local_device_count())
    prompts_file, out = Path(prompts_file), Path(out)
    if batch_size < 1:
        raise DumpError(f"batch_size: expected >= 1, got {batch_size}")
    prompts, blank = read_prompts(prompts_file)
    if blank and progress:
        print(f"skipped {blank} blank line{'s' if blank > 1 else ''} in {prompts_file}", file=sys.stderr)
    described = model or resolve_model(checkpoint, tokenizer, config)  # parameters not loaded yet
    config = described.config
    max_len = max_len or config.sequence_len
    if max_len > config.sequence_len:
        raise DumpError(f"max_len {max_len} exceeds the model's sequence_len {config.sequence_len}")
    ids = encode_prompts(described.tokenizer, [p.text for p in prompts], max_len, truncate,
                         [p.line for p in prompts], str(prompts_file))
    record.resolved(config)  # validates layer/head selections against the model
    identity = _identity(described, record, prompts_file, batch_size, max_len, truncate, compute_dtype)
    # Rows of each batch this process writes (None: all), and the store's chunk along
    # `sequence`: it divides every process's row block, so no two processes share a chunk.
    owned, chunk_rows = None, batch_size
    if multi:
        sharding = batch_sharding(mesh, (batch_size, 1))
        owned = distributed.owned_rows(sharding, (batch_size, 1))
        chunk_rows = distributed.rows_per_writer(sharding, (batch_size, 1))

    # Every check that can fail on input runs before the parameters are loaded.
    distributed.barrier("grokscope-dump: start")  # nobody creates the store before all have looked
    resumed = out.exists()
    group = _open_for_resume(out, identity) if resumed else None
    if resumed and multi and chunk_rows % group["done"].chunks[0]:
        raise DumpError(f"{out}: its chunks of {group['done'].chunks[0]} sequences do not divide the "
                        f"{chunk_rows} rows each process writes here; resume it with the process layout "
                        f"(--mesh, --num-processes, --batch-size) it was started with")
    model = described if described.params else load_model(mesh=mesh, resolved=described)
    if not resumed and leader:
        meta_types = {k: column_dtype([p.metadata[k] for p in prompts]) for k in prompts[0].metadata}
        variables, coords = layout(config, record, len(prompts), max_len, chunk_rows, meta_types,
                                   model.tokenizer.vocab_size)
        attrs = {"grokscope": {"version": grokscope.__version__, "schema": 1}, **identity,
                 "created": _now(), "finished": None, "status": "in_progress", "num_sequences": len(prompts)}
        # Created whole beside `out`, then renamed into place: a run killed while creating
        # leaves no half-made store at `out`, only a `.creating` directory the next run replaces.
        staging = out.with_name(out.name + ".creating")
        try:
            if staging.exists():
                shutil.rmtree(staging)
            staged = create(staging, variables, coords, attrs)
            staged["vocab_piece"][:] = np.array(model.tokenizer.pieces(range(model.tokenizer.vocab_size)),
                                                dtype=object)
            os.replace(staging, out)
        except OSError as e:
            raise DumpError(f"cannot create {out}: {e}") from None
    if not resumed:
        distributed.barrier("grokscope-dump: created")  # the others wait for process 0's store
        group = zarr.open_group(store=str(out), mode="r+", zarr_format=3)

    done = np.asarray(group["done"][:])
    todo = [b for b in range(-(-len(prompts) // batch_size))
            if not done[b * batch_size: (b + 1) * batch_size].all()]
    bar = _Progress(sum(min(batch_size, len(prompts) - b * batch_size) for b in todo), progress and leader)
    writer = StoreWriter(group)
    written = 0
    try:
        for b in todo:
            row0 = b * batch_size
            batch_ids = ids[row0: row0 + batch_size]
            n = len(batch_ids)
            length = bucket_length(max(len(i) for i in batch_ids), max_len)
            tokens, outputs = run_batch(model, record, batch_ids, length, compute_dtype, batch_size)
            host = {"tokens": tokens, "length": np.array([len(i) for i in batch_ids] + [0] * (batch_size - n), np.int32),
                    "prompt": np.array([p.text for p in prompts[row0: row0 + n]], dtype=object)}
            for key in prompts[0].metadata:
                host[key] = np.array([p.metadata[key] for p in prompts[row0: row0 + n]], dtype=object)
            writer.put(row0, n, {**host, **outputs}, rows=owned)
            written += n if owned is None else sum(max(0, min(r1, n) - r0) for r0, r1 in owned)
            bar.update(n, sum(len(i) for i in batch_ids))
    finally:
        writer.close()
    bar.update(0, 0, final=True)
    distributed.barrier("grokscope-dump: written")  # every process's writes are done
    if leader and np.asarray(group["done"][:]).all():
        group.attrs.update({"status": "complete", "finished": _now()})
    seconds = time.perf_counter() - t0
    return DumpSummary(str(out), len(prompts), sum(len(i) for i in ids), written, writer.bytes_written,
                       seconds, resumed, writer.seconds_writing)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
