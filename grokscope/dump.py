"""Batch activation dumps: prompts -> batches -> forward -> background writer -> zarr store.

`dump(prompts_file, out, ...)` (and `grokscope dump`) runs every prompt through the model
and records what the RecordSpec asks for. Running the same command again after Ctrl-C or
`kill -9` resumes: batches already marked `done` are skipped, the others are computed and
written again, so each sequence is written exactly once and the finished store equals an
uninterrupted run's.

Bad input (prompts, flags, tokenizer, a store of another dump) is refused, naming the problem,
before any store is created or changed. A new store is built whole in a staging directory
beside `out` and renamed into place; the run that writes a store holds a lock on it, and
another dump of it is refused meanwhile (`grokscope.store.staging`). A resumed store is
checked against the checkpoint's contents (a digest of every tensor) before anything is
written.

Here: reading prompt files (`read_prompts`, `encode_prompts`), the checks that decide whether
an existing store can be resumed, and the run loop (`dump`).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import jax
import numpy as np
import zarr

from grokscope._version import __version__
from grokscope.record import QUANTITIES, RecordSpec, to_store_dtypes
from grokscope.runner import encode, run_ids
from grokscope.sharding import batch_sharding
from grokscope.store import (StoreWriter, column_dtype, layout, metadata_column_problem, metadata_name_problem,
                             metadata_value_problem)
from grokscope.store.staging import create_store, lock_store, remove_stale_staging

__all__ = ["dump", "DumpError", "DumpSummary", "Prompt", "read_prompts", "encode_prompts"]


class DumpError(ValueError):
    """Bad input to a dump (prompts, lengths, output path), named precisely."""


@dataclasses.dataclass(frozen=True)
class Prompt:
    text: str
    metadata: dict
    line: int


def read_prompts(path: str | Path) -> tuple[list[Prompt], int]:
    """Reads a `.txt` (one prompt per line) or `.jsonl` (`{"text": ..., other fields}`) file.

    Returns (prompts, number of blank lines skipped). A UTF-8 byte order mark at the start of
    the file is ignored.

    Raises:
      DumpError: missing, unreadable or empty file, a directory, a line that is not UTF-8 or
        not valid JSON, a JSON line without a string "text", text that is not valid Unicode (a
        lone surrogate), a metadata field whose name cannot be an array of the store or whose
        value the store cannot hold exactly, or inconsistent metadata fields (naming the line
        and the field).
    """
    prompts, blank, _ = _read_prompt_file(path)
    return prompts, blank


def _read_prompt_file(path: str | Path) -> tuple[list[Prompt], int, str]:
    """`read_prompts`, and the sha256 of exactly the bytes the prompts were read from."""
    path = Path(path)
    if path.is_dir():
        raise DumpError(f"{path}: is a directory; expected a .txt or .jsonl prompts file")
    if not path.exists():
        raise DumpError(f"prompts file not found: {path}")
    jsonl = path.suffix == ".jsonl"
    if not jsonl and path.suffix != ".txt":
        raise DumpError(f"{path}: expected a .txt (one prompt per line) or .jsonl file")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DumpError(f"{path}: cannot read the prompts file ({e.strerror or e})") from None
    raws = data.split(b"\n")
    if raws[-1] == b"":
        raws.pop()
    prompts, blank, names, accepted = [], 0, {}, set()
    for number, raw in enumerate(raws, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DumpError(f"{path}:{number}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
        if number == 1 and line.startswith("\ufeff"):
            line = line[1:]  # a byte order mark, not text
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
        for key, value in record.items():
            if key != "text" and key not in accepted:
                problem = metadata_name_problem(key, names)
                if problem:
                    raise DumpError(f"{path}:{number}: field name {key!r}: {problem}; rename the field")
                names[key.casefold()] = key
                accepted.add(key)
            problem = metadata_value_problem(value)
            if problem:
                raise DumpError(f"{path}:{number}: field {key!r}: {problem}")
        metadata = {k: v for k, v in record.items() if k != "text"}
        prompts.append(Prompt(record["text"], metadata, number))
    if not prompts:
        raise DumpError(f"{path}: no prompts (the file is empty or blank)")
    fields = set().union(*(p.metadata for p in prompts))
    for p in prompts:
        missing = sorted(fields - set(p.metadata))
        if missing:
            raise DumpError(f"{path}:{p.line}: missing metadata fields {missing} that other lines have")
    for key in sorted(fields):
        problem = metadata_column_problem([p.metadata[key] for p in prompts])
        if problem:
            raise DumpError(f"{path}:{prompts[problem[0]].line}: field {key!r}: {problem[1]}")
    return prompts, blank, hashlib.sha256(data).hexdigest()


def encode_prompts(tokenizer, texts: Sequence[str], max_len: int, truncate: str | None,
                   lines: Sequence[int], source: str) -> list[list[int]]:
    """Token ids of every text (`grokscope.runner.encode`), errors as `DumpError`."""
    return encode(tokenizer, texts, max_len, truncate, lines, source, error=DumpError)


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
    """The dump's progress on stderr (tqdm): sequences done of those to write, tokens/s, time left."""

    def __init__(self, total: int, enabled: bool):
        from tqdm import tqdm

        self._bar = tqdm(total=total, unit="seq", desc="dump", disable=not enabled, file=sys.stderr,
                         mininterval=0.2 if sys.stderr.isatty() else 5.0, dynamic_ncols=True)
        self._tokens, self._start = 0, time.perf_counter()

    def update(self, sequences: int, tokens: int) -> None:
        self._tokens += tokens
        rate = self._tokens / max(time.perf_counter() - self._start, 1e-9)
        self._bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)
        self._bar.update(sequences)

    def close(self) -> None:
        self._bar.close()


def _identity(model, record, prompts_path, prompts_sha256, batch_size, max_len, truncate, compute_dtype,
              quantize=None) -> dict:
    """What must match for a store to be resumed (and is kept as provenance). `batch_size` is
    the effective one; `prompts_sha256` hashes the bytes the prompts were read from; `quantize`
    ("int8": weights quantized as they loaded) is kept only when set."""
    quantized = {} if quantize is None else {"quantize": quantize}
    return {**quantized,
        "model_config": model.config.to_dict(),
        "checkpoint": model.checkpoint_identity,
        "tokenizer": model.tokenizer.identity(),
        "record_spec": record.resolved(model.config).to_dict(),
        "prompts": {"path": str(Path(prompts_path).resolve()), "sha256": prompts_sha256},
        "batch_size": batch_size, "max_len": max_len, "truncate": truncate, "compute_dtype": compute_dtype,
    }


_COMPARED = ("model_config", "record_spec", "tokenizer", "max_len", "truncate", "compute_dtype", "quantize")


def _as_compared(key: str, value):
    """A stored identity field as this version writes it: a model config written before a
    field existed gains that field's default (the architecture it then had)."""
    if key == "model_config" and isinstance(value, dict):
        from grokscope.config import ModelConfig

        try:
            value = ModelConfig.from_dict(value).to_dict()
        except (TypeError, ValueError):
            pass
    return json.loads(json.dumps(value))


def _differences(stored: dict, wanted: dict, num_sequences: int) -> list[str]:
    out = []
    for key in _COMPARED:
        if _as_compared(key, stored.get(key)) != _as_compared(key, wanted.get(key)):
            out.append(f"{key}: store has {stored.get(key)!r}, this run has {wanted.get(key)!r}")
    # Any batch size of at least the prompt count makes the same single batch.
    batch = stored.get("batch_size")
    if not isinstance(batch, int) or min(batch, num_sequences) != min(wanted["batch_size"], num_sequences):
        out.append(f"batch_size: store has {batch!r}, this run has {wanted['batch_size']!r}")
    if stored.get("checkpoint", {}).get("index_sha256") != wanted["checkpoint"]["index_sha256"]:
        out.append(f"checkpoint: store was written from {stored.get('checkpoint', {}).get('path')}, "
                   f"this run uses {wanted['checkpoint']['path']} (different tensor files)")
    if stored.get("prompts", {}).get("sha256") != wanted["prompts"]["sha256"]:
        out.append("prompts: the prompts file's contents differ from the store's")
    return out


def _open_for_resume(out: Path, identity: dict, expected: dict[str, tuple], num_sequences: int):
    """Opens an existing `out` to resume it, after checking (reading only) that it is a whole
    store of this very dump."""
    if not (out / "zarr.json").is_file():
        raise DumpError(f"{out} exists and is not a zarr store; choose another --out (nothing was changed)")
    try:
        group = zarr.open_group(store=str(out), mode="r+", zarr_format=3)
        attrs = dict(group.attrs)
    except Exception as e:  # noqa: BLE001 - a damaged zarr.json raises a variety of errors
        raise DumpError(f"{out}: cannot open it as a zarr store ({type(e).__name__}: {e}); "
                        f"nothing was changed") from None
    if "grokscope" not in attrs:
        raise DumpError(f"{out} is a zarr store but not a grokscope dump; choose another --out")
    differences = _differences(attrs, identity, num_sequences)
    if differences:
        raise DumpError(f"{out} was written by a different dump; not resuming: " + "; ".join(differences))
    present = {name: tuple(group[name].shape) for name in group.array_keys()}
    missing = [name for name in expected if name not in present]
    reshaped = [f"{name} {present[name]} (expected {shape})" for name, shape in expected.items()
                if name in present and present[name] != tuple(shape)]
    if missing or reshaped:
        what = "; ".join(([f"missing arrays {missing}"] if missing else []) +
                         ([f"arrays of other shapes: {', '.join(reshaped)}"] if reshaped else []))
        raise DumpError(f"{out} is not a whole store of this dump ({what}); it cannot be resumed "
                        f"(nothing was changed)")
    return group


def _check_chunks(group, chunk_rows: int, multi: bool, out: Path) -> None:
    if multi and chunk_rows % group["done"].chunks[0]:
        raise DumpError(f"{out}: its chunks of {group['done'].chunks[0]} sequences do not divide the "
                        f"{chunk_rows} rows each process writes here; resume it with the process layout "
                        f"(--mesh, --num-processes, --batch-size) it was started with")


def _checkpoint_content(model) -> dict | None:
    """The root attribute `checkpoint_content`: a digest of every tensor's bytes and their
    combination (None when the model carries no digests)."""
    from grokscope.checkpoint import DIGEST_ALGORITHM, combine_digests

    digests = dict(model.tensor_digests or {})
    if not digests:
        return None
    return {"algorithm": DIGEST_ALGORITHM, "digest": combine_digests(digests), "tensors": digests}


def _check_checkpoint_content(stored: dict, model, out: Path, work_left: bool) -> None:
    """Refuses to resume a store from weights other than those its sequences were written with.

    A store that records no contents (made before they were recorded) is refused when
    anything is left to write: its finished sequences cannot be checked against this
    checkpoint. Runs after the parameters are loaded, before anything is written.
    """
    if not work_left:
        return
    from grokscope.checkpoint import DIGEST_ALGORITHM, combine_digests, first_difference
    from grokscope.layout import param_shapes

    recorded = stored.get("checkpoint_content")
    current = dict(model.tensor_digests or {})
    untouched = "not resuming (the store is untouched)"
    if not isinstance(recorded, dict) or not recorded.get("digest"):
        raise DumpError(f"{out} does not record the contents of the checkpoint it was written with (it was made "
                        f"by an older grokscope), so its finished sequences cannot be checked against this "
                        f"checkpoint; {untouched}; dump to a new --out")
    if recorded.get("algorithm") != DIGEST_ALGORITHM:
        raise DumpError(f"{out} records {recorded.get('algorithm')} digests of its checkpoint, this grokscope "
                        f"computes {DIGEST_ALGORITHM}; they cannot be compared; {untouched}")
    if not current:
        raise DumpError(f"{out}: the model given carries no tensor digests to check against the store's; {untouched}")
    if combine_digests(current) != recorded["digest"]:
        first = first_difference(recorded.get("tensors") or {}, current, list(param_shapes(model.config)))
        what = f"tensor {first} differs" if first else "the tensors' combined digest differs"
        raise DumpError(f"{out} was written from other weights than {model.checkpoint_identity['path']} holds "
                        f"now: {what} ({DIGEST_ALGORITHM}); {untouched}")


def dump(prompts_file: str | Path, out: str | Path, *, checkpoint: str | Path | None = None,
         tokenizer: str | Path | None = None, config=None, record: RecordSpec = RecordSpec(),
         batch_size: int = 8, max_len: int | None = None, truncate: str | None = None,
         compute_dtype: str = "float32", mesh=None, progress: bool = True, model=None,
         quantize: str | None = None) -> DumpSummary:
    """Dumps the recorded activations of every prompt in `prompts_file` into the store `out`.

    Args:
      prompts_file: `.txt` (a prompt per line) or `.jsonl` (`{"text": ..., "label": ...}`).
      out: the store's path (a new path, or an unfinished/finished dump of the same settings).
      checkpoint, tokenizer, config: the model (default: the bundled one); see `load_model`.
      record: what to record.
      batch_size: sequences per forward (and the store's chunk along `sequence`); in a
        one-process job at most the number of prompts (the store records the size used).
      max_len: the store's `position` size (>= 1); default the config's `sequence_len`.
      truncate: None (too-long prompts are an error), "left" or "right".
      compute_dtype: "float32" or "bfloat16".
      mesh: run sharded on this mesh. In a multi-process job (after
        `grokscope.distributed.initialize`) the mesh spans every process's devices (default:
        data = processes, model = each process's devices); each process writes the rows its
        devices hold, process 0 creates the store and marks it complete.
      progress: show a progress line on stderr.
      model: a bundled model's name (`grokscope.session.BUNDLED_MODELS`, e.g. "grok2-tiny"), or
        an already loaded `LoadedModel` (instead of checkpoint/tokenizer/config).
      quantize: "int8" quantizes a bfloat16 (Grok-2) checkpoint's matmul weights as they load
        (recorded in the store; a resume must use the same).

    Returns:
      A DumpSummary (printable).

    Raises:
      DumpError: bad input (named), before anything is written: nothing is left behind. A new
        store is built beside `out` and renamed into place whole; a run holds a lock on the
        store until it ends, and another dump of the same store is refused meanwhile.
        Resuming checks every tensor's digest against the store's before writing.
    """
    from grokscope import distributed
    from grokscope.runner import bucket_length
    from grokscope.session import LoadedModel, load_model, resolve_model

    t0 = time.perf_counter()
    multi = jax.process_count() > 1
    leader = jax.process_index() == 0
    if multi and mesh is None:
        from grokscope.sharding import make_mesh

        mesh = make_mesh(jax.process_count(), jax.local_device_count())
    prompts_file, out = Path(prompts_file), Path(out)
    if batch_size < 1:
        raise DumpError(f"batch_size: expected >= 1, got {batch_size}")
    if max_len is not None and max_len < 1:
        raise DumpError(f"max_len: expected >= 1, got {max_len}")
    prompts, blank, prompts_sha256 = _read_prompt_file(prompts_file)
    if blank and progress:
        print(f"skipped {blank} blank line{'s' if blank > 1 else ''} in {prompts_file}", file=sys.stderr)
    if not multi:
        batch_size = min(batch_size, len(prompts))  # never a batch of padding rows beyond the prompts
    if quantize not in (None, "int8"):
        raise DumpError(f"quantize: expected None or 'int8', got {quantize!r}")
    if isinstance(model, LoadedModel):
        described = model
    else:  # parameters not loaded yet
        described = resolve_model(checkpoint, tokenizer, config, model=model)
    config = described.config
    max_len = config.sequence_len if max_len is None else max_len
    if max_len > config.sequence_len:
        raise DumpError(f"max_len {max_len} exceeds the model's sequence_len {config.sequence_len}")
    ids = encode_prompts(described.tokenizer, [p.text for p in prompts], max_len, truncate,
                         [p.line for p in prompts], str(prompts_file))
    record.resolved(config)  # validates layer/head selections against the model
    identity = _identity(described, record, prompts_file, prompts_sha256, batch_size, max_len, truncate,
                         compute_dtype, quantize if not described.params else described.quantize)
    # Rows of each batch this process writes (None: all), and the store's chunk along
    # `sequence`: it divides every process's row block, so no two processes share a chunk.
    owned, chunk_rows = None, batch_size
    if multi:
        sharding = batch_sharding(mesh, (batch_size, 1))
        owned = distributed.owned_rows(sharding, (batch_size, 1))
        chunk_rows = distributed.rows_per_writer(sharding, (batch_size, 1))
    meta_types = {k: column_dtype([p.metadata[k] for p in prompts]) for k in prompts[0].metadata}
    variables, coords = layout(config, record, len(prompts), max_len, chunk_rows, meta_types,
                               described.tokenizer.vocab_size)
    expected = {**{name: v.shape for name, v in variables.items()},
                **{name: values.shape for name, values in coords.items()}}

    # Every check that can fail on input runs before the parameters are loaded, and before
    # anything is written. Process 0 creates the store and holds its lock for the whole run.
    distributed.barrier("grokscope-dump: start")  # nobody creates the store before all have looked
    existed = os.path.lexists(out)
    resumed, group, lock = existed, None, None
    try:
        if existed:
            group = _open_for_resume(out, identity, expected, len(prompts))
            if leader:
                lock = lock_store(out, progress, error=DumpError)
            _check_chunks(group, chunk_rows, multi, out)
        if leader:
            remove_stale_staging(out)
        model = described if described.params else load_model(mesh=mesh, resolved=described, quantize=quantize)
        if not existed and leader:
            attrs = {"grokscope": {"version": __version__, "schema": 1}, **identity,
                     "checkpoint_content": _checkpoint_content(model), "created": _now(), "finished": None,
                     "status": "in_progress", "num_sequences": len(prompts)}
            pieces = np.array(model.tokenizer.pieces(range(model.tokenizer.vocab_size)), dtype=object)
            try:
                published, lock = create_store(out, variables, coords, attrs, pieces)
            except OSError as e:
                raise DumpError(f"cannot create {out}: {e}") from None
            if not published:
                # Another dump created `out` first: resume it as a later run would (refused
                # while that dump holds its lock).
                resumed = True
                group = _open_for_resume(out, identity, expected, len(prompts))
                lock = lock_store(out, progress, error=DumpError)
                _check_chunks(group, chunk_rows, multi, out)
        if not existed:
            distributed.barrier("grokscope-dump: created")  # the others wait for process 0's store
        if group is None:
            group = zarr.open_group(store=str(out), mode="r+", zarr_format=3)

        done = np.asarray(group["done"][:])
        todo = [b for b in range(-(-len(prompts) // batch_size))
                if not done[b * batch_size: (b + 1) * batch_size].all()]
        _check_checkpoint_content(dict(group.attrs), model, out, bool(todo))
        bar = _Progress(sum(min(batch_size, len(prompts) - b * batch_size) for b in todo), progress and leader)
        writer = StoreWriter(group)
        written = 0
        try:
            for b in todo:
                row0 = b * batch_size
                batch_ids = ids[row0: row0 + batch_size]
                n = len(batch_ids)
                length = bucket_length(max(len(i) for i in batch_ids), max_len)
                tokens, outputs, _ = run_ids(model, batch_ids, length, record, batch_size,
                                             compute_dtype=compute_dtype)
                outputs = to_store_dtypes(outputs, config)
                host = {"tokens": tokens,
                        "length": np.array([len(i) for i in batch_ids] + [0] * (batch_size - n), np.int32),
                        "prompt": np.array([p.text for p in prompts[row0: row0 + n]], dtype=object)}
                for key in prompts[0].metadata:
                    host[key] = np.array([p.metadata[key] for p in prompts[row0: row0 + n]], dtype=object)
                writer.put(row0, n, {**host, **outputs}, rows=owned)
                written += n if owned is None else sum(max(0, min(r1, n) - r0) for r0, r1 in owned)
                bar.update(n, sum(len(i) for i in batch_ids))
        finally:
            writer.close()
            bar.close()
        distributed.barrier("grokscope-dump: written")  # every process's writes are done
        if leader and np.asarray(group["done"][:]).all():
            group.attrs.update({"status": "complete", "finished": _now()})
    finally:
        if lock is not None:
            os.close(lock)
    seconds = time.perf_counter() - t0
    return DumpSummary(str(out), len(prompts), sum(len(i) for i in ids), written, writer.bytes_written,
                       seconds, resumed, writer.seconds_writing)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
