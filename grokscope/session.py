"""Interactive use: load a model once, run prompts, get the store's Dataset back in memory.

`Session()` loads the bundled default model (grok-tiny); `Session(model="grok2-tiny")` the
bundled Grok-2-architecture one; `Session(checkpoint=DIR, tokenizer=FILE, config=...)` any
checkpoint in Grok-1's or Grok-2's release layout (`grokscope.formats`). `session.run(...)` returns the same
`xarray.Dataset` (names, dims, dtypes) that `open_store` gives for a dump.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import functools
import json
import logging
import queue
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from jax.sharding import Mesh

from grokscope.config import ModelConfig, load_config
from grokscope.record import RecordSpec
from grokscope.runner import bucket_length
from grokscope.tokenizer import Tokenizer

__all__ = ["Session", "Generation", "LoadedModel", "load_model", "resolve_model", "default_model_dir", "bucket_length",
           "BUNDLED_MODELS", "bundled_model_dir"]

BUNDLED = "grok-tiny"
BUNDLED_MODELS = ("grok-tiny", "grok2-tiny")
"""The small trained models in the package: Grok-1's architecture (the default) and Grok-2's."""

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.tok.json")
"""The tokenizer file a checkpoint directory may hold: SentencePiece (Grok-1), xAI's tiktoken JSON (Grok-2)."""


def bundled_model_dir(name: str = BUNDLED) -> Path:
    """The directory of a bundled model (`BUNDLED_MODELS`)."""
    if name not in BUNDLED_MODELS:
        raise ValueError(f"--model {name!r}: expected one of the bundled models {', '.join(BUNDLED_MODELS)}")
    return Path(__file__).resolve().parent / "assets" / name


def default_model_dir() -> Path:
    """The bundled default model's directory (checkpoint, tokenizer.model, config.json)."""
    return bundled_model_dir(BUNDLED)


@dataclasses.dataclass
class LoadedModel:
    config: ModelConfig
    params: dict
    tokenizer: Tokenizer
    checkpoint_identity: dict
    mesh: Mesh | None
    directory: Path
    # {param path: xxh3_128 hex digest of its tensor file}, filled by load_model
    tensor_digests: dict = dataclasses.field(default_factory=dict)
    # None, or "int8": a bfloat16 checkpoint's matmul weights quantized as they were loaded
    quantize: str | None = None


def resolve_model(checkpoint: str | Path | None = None, tokenizer: str | Path | None = None,
                  config: ModelConfig | str | None = None, model: str | None = None) -> LoadedModel:
    """Config, tokenizer and checkpoint identity, without loading any parameter (params={}).

    `model` names a bundled model (`BUNDLED_MODELS`) instead of a `checkpoint` directory.
    """
    from grokscope.formats import checkpoint_identity, detect_format

    if model is not None and checkpoint is not None:
        raise ValueError("give a bundled model name or a checkpoint directory, not both")
    bundled = checkpoint is None
    directory = Path(checkpoint) if checkpoint is not None else bundled_model_dir(model or BUNDLED)
    if detect_format(directory) is None:
        if bundled:
            raise FileNotFoundError(f"the bundled model is missing at {directory}; pass a checkpoint directory")
        raise FileNotFoundError(f"{directory}: no checkpoint (expected the directory that holds Grok-1's ckpt-0/ "
                                f"or Grok-2's safetensors)")
    if config is None:
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(f"{directory}: no config.json; pass config= (a preset name, JSON file or ModelConfig)")
        config = load_config(str(directory / "config.json"))
    elif isinstance(config, str):
        config = load_config(config)
    if tokenizer is not None:
        tokenizer_file = Path(tokenizer)
    else:
        tokenizer_file = next((directory / name for name in TOKENIZER_FILES if (directory / name).is_file()),
                              directory / TOKENIZER_FILES[0])
    tok = Tokenizer(tokenizer_file)
    if tok.vocab_size > config.vocab_size:
        raise ValueError(f"tokenizer {tokenizer_file} has {tok.vocab_size} pieces, more than the model's "
                         f"vocab_size {config.vocab_size}")
    return LoadedModel(config, {}, tok, checkpoint_identity(directory), None, directory)


def load_model(checkpoint: str | Path | None = None, tokenizer: str | Path | None = None,
               config: ModelConfig | str | None = None, mesh: Mesh | None = None,
               resolved: LoadedModel | None = None, model: str | None = None,
               quantize: str | None = None) -> LoadedModel:
    """Loads params (validated, on `mesh`), tokenizer and config.

    With no `checkpoint`, a bundled model (`model`, default grok-tiny). `config` defaults to
    `CHECKPOINT/config.json`; `tokenizer` to `CHECKPOINT/tokenizer.model` or
    `CHECKPOINT/tokenizer.tok.json`. `resolved` (from `resolve_model`) skips the resolution.
    `quantize="int8"` quantizes a bfloat16 (Grok-2) checkpoint's matmul weights as they load.
    The tensors' content digests, hashed while they are read, go to `tensor_digests`.
    """
    from grokscope.formats import load_params

    described = resolved or resolve_model(checkpoint, tokenizer, config, model)
    digests: dict[str, str] = {}
    params = load_params(described.directory, described.config, mesh=mesh, quantize=quantize, digests=digests)
    return dataclasses.replace(described, params=params, mesh=mesh, tensor_digests=digests, quantize=quantize)


class Session:
    """A loaded model for interactive exploration.

    Attributes:
      config: the model's ModelConfig.
      tokenizer: its Tokenizer.
      params: its parameters (on `mesh` if given).
    """

    def __init__(self, checkpoint: str | Path | None = None, tokenizer: str | Path | None = None,
                 config: ModelConfig | str | None = None, mesh: Mesh | None = None,
                 record: RecordSpec = RecordSpec(), compute_dtype: str = "float32", model: str | None = None,
                 quantize: str | None = None):
        self._model = load_model(checkpoint, tokenizer, config, mesh, model=model, quantize=quantize)
        self.record = record
        self.compute_dtype = compute_dtype
        self._vocab_pieces = self._model.tokenizer.pieces(range(self._model.tokenizer.vocab_size))
        self._recent: collections.OrderedDict = collections.OrderedDict()  # _run_one's last results
        self._recent_lock = threading.Lock()
        self._warmed: set = set()

    @property
    def config(self) -> ModelConfig:
        return self._model.config

    @property
    def tokenizer(self) -> Tokenizer:
        return self._model.tokenizer

    @property
    def params(self) -> dict:
        return self._model.params

    @property
    def mesh(self):
        """The device mesh the parameters are on (None: one device)."""
        return self._model.mesh

    @property
    def loaded_model(self) -> LoadedModel:
        """The loaded model (config, params, tokenizer, mesh) that `grokscope.runner` runs."""
        return self._model

    def next_token_distributions(self, token_ids: Sequence[int], position: int, interventions=(),
                                 n: int = 10) -> tuple[list[int], np.ndarray, np.ndarray]:
        """The next-token distribution after `position` of `token_ids`, as the model has it and
        under `interventions`, computed on this session's mesh and compute dtype.

        Returns (token ids, p_original, p_intervened) over the union of both top-`n` tokens,
        ordered by the original probability.
        """
        token_ids = [int(t) for t in token_ids]
        if not 0 <= position < len(token_ids):
            raise ValueError(f"next_token_distributions: position {position} outside the {len(token_ids)} tokens")
        p = np.exp(self._run_one(token_ids, (), position)[1])
        q = np.exp(self._run_one(token_ids, tuple(interventions), position)[1])
        ids = list(dict.fromkeys([int(i) for i in np.argsort(-p)[:n]] + [int(i) for i in np.argsort(-q)[:n]]))
        ids.sort(key=lambda i: -p[i])
        return ids, p[ids], q[ids]

    def _run_one(self, token_ids: Sequence[int], interventions: tuple = (), position: int | None = None,
                 record: RecordSpec | None = None, text: str | None = None):
        """One sequence of token ids under `interventions`: its Dataset (recording `record`,
        default the session's; `text` its prompt, default the decoded ids) and the next-token
        log-probabilities after `position` (default the last token), float64 [V].

        Whole-layer bans (and no intervention) run as data, in one compiled program per length
        bucket; the last few results are kept, so going back to a state costs nothing.
        """
        import jax

        from grokscope.record import to_store_dtypes
        from grokscope.runner import run_ids

        ids, interventions, position, record = self._one_key(token_ids, interventions, position, record)
        key = (ids, interventions, record)
        with self._recent_lock:
            entry = self._recent.get(key)
            if entry is not None:
                self._recent.move_to_end(key)
        if entry is None or position not in entry["logprobs"]:
            length = bucket_length(len(ids), self.config.sequence_len)
            tokens, rec, out = run_ids(self._model, [list(ids)], length, record, compute_dtype=self.compute_dtype,
                                       interventions=interventions, outputs=("last_logprobs",),
                                       at=np.array([position], np.int32), layer_masks=True)
            logprobs = np.asarray(jax.device_get(out["last_logprobs"][0]), np.float64)
            if entry is None:
                rec = jax.device_get(to_store_dtypes(rec, self.config))
                entry = {"dataset": self._dataset([self.tokenizer.decode(list(ids))], [list(ids)], tokens, rec, record),
                         "logprobs": {}}
            entry["logprobs"][position] = logprobs
            with self._recent_lock:
                self._recent[key] = entry
                while len(self._recent) > 32:
                    self._recent.popitem(last=False)
        ds = entry["dataset"]
        if text is not None and ds["prompt"].values[0] != text:
            ds = ds.assign(prompt=ds["prompt"].copy(data=np.array([text], dtype=ds["prompt"].dtype)))
        return ds, entry["logprobs"][position]

    def _has_run(self, token_ids: Sequence[int], interventions: tuple = (), position: int | None = None,
                 record: RecordSpec | None = None) -> bool:
        """Whether `_run_one` has this result at hand (then it returns at once)."""
        ids, interventions, position, record = self._one_key(token_ids, interventions, position, record)
        with self._recent_lock:
            entry = self._recent.get((ids, interventions, record))
            return entry is not None and position in entry["logprobs"]

    def _one_key(self, token_ids, interventions, position, record):
        ids = tuple(int(t) for t in token_ids)
        if not ids:
            raise ValueError("the sequence has no tokens")
        position = len(ids) - 1 if position is None else int(position)
        if not 0 <= position < len(ids):
            raise ValueError(f"position {position} outside the {len(ids)} tokens")
        return ids, tuple(interventions), position, record or self.record

    def _warm_up(self, kind: str, record: RecordSpec | None = None, lengths: Sequence[int] = (16, 32, 48, 64),
                 total: int | None = None) -> None:
        """Compiles, in a background thread, the programs that prompts of these lengths will run,
        so that a new prompt does not wait for a compilation: `kind` "one" (`_run_one`), "run"
        (`run` of one prompt) or "generate" (`generate` of prompts of these lengths with `total`
        positions in all). Each program is compiled once per session."""
        record = record or self.record
        rows = None if total is None else bucket_length(total, self.config.sequence_len)
        if kind == "generate" and rows is None:
            raise ValueError("_warm_up('generate'): give the total length")
        for n in lengths:
            n = bucket_length(n, self.config.sequence_len)
            key = (kind, record, n if rows is None else min(n, rows), rows)
            if key in self._warmed:
                continue
            self._warmed.add(key)
            _warm_pool().submit(functools.partial(self._compile, key))

    def _compile(self, key) -> None:
        import jax

        from grokscope.runner import decode, new_cache, run_ids

        kind, record, n, total = key
        ids = [[1] * n]
        if kind == "one":
            out = run_ids(self._model, ids, n, record, compute_dtype=self.compute_dtype, outputs=("last_logprobs",),
                          at=np.array([n - 1], np.int32), layer_masks=True)
        elif kind == "run":
            out = run_ids(self._model, ids, n, record, compute_dtype=self.compute_dtype)
        else:
            cache = new_cache(self._model, 1, total, self.compute_dtype)
            _, _, cache = decode(self._model, np.asarray(ids, np.int32), 0, cache, record,
                                 compute_dtype=self.compute_dtype, logits_at=[n - 1])
            cache = _continue_at(cache, n)
            out = decode(self._model, np.ones((1, 1), np.int32), n, cache, record, compute_dtype=self.compute_dtype,
                         logits_at=[0])
        jax.block_until_ready(out)

    def run(self, prompts: str | Sequence[str], record: RecordSpec | None = None,
            metadata: dict[str, Sequence[Any]] | None = None):
        """Runs one prompt or a list of them; returns the store's Dataset, in memory.

        Args:
          prompts: a string or a list of strings.
          record: what to record (default: the session's RecordSpec).
          metadata: optional per-prompt columns, e.g. {"label": ["code", "prose"]}.
        """
        from grokscope.record import to_store_dtypes
        from grokscope.runner import encode, run_ids

        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not texts:
            raise ValueError("Session.run: no prompts")
        record = record or self.record
        _check_metadata(metadata, len(texts))
        ids = encode(self.tokenizer, texts, self.config.sequence_len, truncate=None,
                     lines=list(range(1, len(texts) + 1)), source="Session.run")
        max_len = max(1, max(len(i) for i in ids))
        tokens, outputs, _ = run_ids(self._model, ids, bucket_length(max_len, self.config.sequence_len), record,
                                     compute_dtype=self.compute_dtype)
        return self._dataset(texts, ids, tokens, to_store_dtypes(outputs, self.config), record, metadata)

    def _dataset(self, texts, ids, tokens, outputs, record: RecordSpec, metadata=None, extra=None):
        """The store's Dataset for these sequences: `tokens` [N, >= longest], `outputs` the
        recorded arrays [N, ...] (cut to the longest sequence), `extra` {name: (Variable, values)}."""
        from grokscope.store import column_dtype, dataset_from_arrays, layout, mask_padding

        max_len = max(1, max(len(i) for i in ids))
        metadata = dict(metadata or {})
        meta_types = {k: column_dtype(v) for k, v in metadata.items()}
        variables, coords = layout(self.config, record, len(texts), max_len, len(texts), meta_types,
                                   self.tokenizer.vocab_size)
        arrays = {name: np.zeros(v.shape, dtype=object if v.dtype is str else v.dtype)
                  for name, v in variables.items()}
        arrays["tokens"][:] = np.asarray(tokens)[:, :max_len]
        arrays["length"][:] = [len(i) for i in ids]
        arrays["prompt"][:] = texts
        arrays["done"][:] = True
        arrays["vocab_piece"][:] = self._vocab_pieces
        for name, values in metadata.items():
            arrays[name][:] = values
        lengths = arrays["length"]
        for name, value in outputs.items():
            target = arrays[name]
            target[...] = variables[name].fill_value
            region = tuple(slice(0, min(a, b)) for a, b in zip(target.shape, value.shape))
            block = np.asarray(value)[region].astype(target.dtype)
            target[region] = mask_padding(name, block, lengths, [0] * block.ndim)
        for name, (variable, values) in (extra or {}).items():
            variables[name] = variable
            arrays[name] = values
        attrs = {"grokscope": {"kind": "session"}, "model_config": self.config.to_dict(),
                 "checkpoint": self._model.checkpoint_identity, "tokenizer": self.tokenizer.identity(),
                 "record_spec": record.resolved(self.config).to_dict(), "compute_dtype": self.compute_dtype,
                 "status": "complete"}
        if self._model.quantize is not None:
            attrs["quantize"] = self._model.quantize
        return dataset_from_arrays(variables, coords, arrays, json.loads(json.dumps(attrs)))

    def generate(self, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, record: RecordSpec | None = None, stop_at_eos: bool = True,
                 on_token=None) -> "Generation":
        """Writes a continuation of `prompt` with a key/value cache, recording as it goes.

        Every generated token is fed through the model once more, so that its own routing
        (and attention) is recorded too. `temperature` 0 is greedy (argmax); otherwise tokens
        are sampled from softmax(logits / temperature) cut to the smallest set of tokens whose
        probability reaches `top_p` (nucleus sampling), with a seeded generator.

        Returns a `Generation`: the text, the token ids, the logits each new token was chosen
        from, and the store's Dataset of the whole sequence (prompt and generated positions
        marked by `generated`).

        `on_token(position, token_id, record)`, if given, is called as each generated token's
        record arrives (the record's arrays hold that one position), e.g. to show it live.
        """
        import jax

        from grokscope.record import QUANTITIES, to_store_dtypes
        from grokscope.runner import decode, new_cache
        from grokscope.store import Variable

        if max_new_tokens < 1:
            raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
        if not (np.isfinite(temperature) and temperature >= 0) or not 0 < top_p <= 1:
            raise ValueError(f"generate: temperature must be >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        record = record or self.record
        ids = list(self.tokenizer.encode(prompt))
        if not ids:
            raise ValueError("generate: the prompt encodes to no tokens")
        total = len(ids) + max_new_tokens
        if total > self.config.sequence_len:
            raise ValueError(f"generate: {len(ids)} prompt tokens + {max_new_tokens} new tokens exceed the model's "
                             f"sequence_len {self.config.sequence_len}")
        rows = bucket_length(total, self.config.sequence_len)
        cache = new_cache(self._model, 1, rows, self.compute_dtype)
        rng = np.random.default_rng(seed)
        records, step_logits, new = [], [], []

        def run(tokens, start, cache, keep):
            # the logits of the last kept position only: a long prompt's [T, V] logits never exist
            logits, rec, cache = decode(self._model, np.asarray([tokens], np.int32), start, cache, record,
                                        compute_dtype=self.compute_dtype, logits_at=[keep - 1])
            rec = jax.device_get(to_store_dtypes(rec, self.config))
            if keep < len(tokens):
                rec = {name: np.take(value, np.arange(keep), axis=QUANTITIES[name].position_axis)
                       for name, value in rec.items()}
            records.append(rec)
            return np.asarray(logits[0], np.float32), cache

        # The prompt runs padded to its length bucket (one compiled program per bucket, not per
        # length): padding is never attended to, and the cache then continues after the prompt.
        padded = ids + [self.config.pad_token] * (min(bucket_length(len(ids), self.config.sequence_len), rows)
                                                  - len(ids))
        logits, cache = run(padded, 0, cache, keep=len(ids))
        cache = _continue_at(cache, len(ids))
        for i in range(max_new_tokens):
            token = _choose(logits, temperature, top_p, rng)
            step_logits.append(logits)
            new.append(token)
            logits, cache = run([token], len(ids) + i, cache, 1)
            if on_token is not None:
                on_token(len(ids) + i, token, records[-1])
            if stop_at_eos and token == self.tokenizer.eos_id:
                break
        all_ids = ids + new
        outputs = {}
        for name in records[0]:
            outputs[name] = np.concatenate([r[name] for r in records], axis=QUANTITIES[name].position_axis)
        generated = np.zeros((1, len(all_ids)), bool)
        generated[0, len(ids):] = True
        extra = {"generated": (Variable("generated", ("sequence", "position"), generated.shape, bool,
                                        generated.shape, {"long_name": "generated", "units": "flag",
                                                          "description": "True at tokens the model wrote"}, False),
                               generated)}
        text = self.tokenizer.decode(new)
        ds = self._dataset([prompt + text], [all_ids], np.asarray([all_ids]), outputs, record, extra=extra)
        return Generation(text=text, prompt=prompt, token_ids=all_ids, prompt_length=len(ids),
                          logits=np.stack(step_logits), dataset=ds)


def _continue_at(cache: dict, length: int) -> dict:
    """The cache after a padded prompt: the next tokens go to row `length` (where the padding
    starts)."""
    import jax

    # placed as the decoder returns it, so that every step after the prompt runs one program
    return {**cache, "length": jax.device_put(np.asarray(length, cache["length"].dtype), cache["length"].sharding)}


class _Background:
    """One background thread that runs jobs in order (`Session._warm_up`'s compilations). At
    exit the jobs not started are dropped and the running one is waited for."""

    def __init__(self):
        self.jobs: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="grokscope-warm-up", daemon=True)
        self.thread.start()
        atexit.register(self.stop)

    def submit(self, job) -> None:
        self.jobs.put(job)

    def wait(self) -> None:
        """Returns when every job submitted so far has run."""
        self.jobs.join()

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            try:
                if job is None:
                    return
                job()
            except Exception:  # noqa: BLE001 - a warm-up is only ahead of time; the real call reports
                logging.getLogger(__name__).debug("warm-up failed", exc_info=True)
            finally:
                self.jobs.task_done()

    def stop(self) -> None:
        while True:
            try:
                self.jobs.get_nowait()
            except queue.Empty:
                break
            self.jobs.task_done()
        self.jobs.put(None)
        self.thread.join(timeout=60)


@functools.lru_cache(maxsize=1)
def _warm_pool() -> _Background:
    return _Background()


def _check_metadata(metadata: dict | None, n: int) -> None:
    """Raises ValueError unless `metadata` maps names a store can hold to one value per prompt
    that it can hold exactly (the rules of a dump's prompt file, `grokscope.store`)."""
    from grokscope.store import metadata_column_problem, metadata_name_problem, metadata_value_problem

    seen: dict[str, str] = {}
    for name, values in (metadata or {}).items():
        problem = "reserved for generated tokens" if name == "generated" else \
            metadata_name_problem(name, seen) if isinstance(name, str) else "not a string"
        if problem:
            raise ValueError(f"Session.run: metadata name {name!r}: {problem}")
        seen[name.casefold()] = name
        if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
            raise ValueError(f"Session.run: metadata[{name!r}]: expected one value per prompt ({n}), "
                             f"got {type(values).__name__}")
        if len(values) != n:
            raise ValueError(f"Session.run: metadata[{name!r}]: expected {n} values (one per prompt), "
                             f"got {len(values)}")
        values = [value.item() if isinstance(value, np.generic) else value for value in values]
        problem = next(filter(None, map(metadata_value_problem, values)), None)
        column = metadata_column_problem(values)
        if problem or column:
            raise ValueError(f"Session.run: metadata[{name!r}]: {problem or column[1]}")


def _choose(logits: np.ndarray, temperature: float, top_p: float, rng) -> int:
    """Greedy (temperature 0) or nucleus sampling from float logits [V]."""
    if temperature == 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    keep = np.searchsorted(np.cumsum(probs[order]), top_p) + 1
    chosen = order[:keep]
    return int(rng.choice(chosen, p=probs[chosen] / probs[chosen].sum()))


@dataclasses.dataclass(frozen=True)
class Generation:
    """What `Session.generate` wrote.

    Attributes:
      text: the generated text (without the prompt).
      prompt: the prompt.
      token_ids: prompt and generated token ids.
      prompt_length: how many of them are the prompt's.
      logits: [new tokens, vocab] the logits each generated token was chosen from.
      dataset: the store's Dataset of the whole sequence, with `generated` (sequence, position).
    """

    text: str
    prompt: str
    token_ids: list[int]
    prompt_length: int
    logits: np.ndarray
    dataset: Any
