"""The one place that runs the model on text.

`Session`, `dump`, `effects` and the views (through `Session`) all go through here: prompts
are encoded, padded to a length bucket, placed on the mesh, and run by one jitted program per
(config, RecordSpec, compute dtype, MoE dispatch, interventions, outputs). The program returns
the records and, computed on the device, only the reductions of the logits that were asked
for, so a [B, T, vocab] array crosses to the host only when `"logits"` is asked for:

  logits          [B, T, V] float32: the logits themselves
  token_logprob   [B, T] log p(x_{t+1} | x_{<=t}) of the next token in the batch (0 at the
                  last position; meaningless at padding)
  argmax          [B, T] int32: the most likely next token
  last_logprobs   [B, V] float32: the next-token log-probabilities after position `at[b]`

`decode` runs the next tokens of sequences held in a key/value cache (`new_cache`), for
generation. `compare` runs an intervened model against a baseline computed once (`baseline`), on device:
the per-position change of loss, the KL divergence, and whether the top-1 token and the
first-choice expert changed.

`forward(params, config, tokens, ...)` is the public entry for arbitrary token arrays (and
positions). A model here is anything with `config`, `params` and `mesh`: a `Model`, or the
`grokscope.session.LoadedModel` a Session holds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from grokscope.config import ModelConfig
from grokscope.forward import make_forward
from grokscope.record import RecordSpec
from grokscope.sharding import shard_params
from grokscope.tokenizer import lone_surrogate

__all__ = ["forward", "ForwardOutput", "Model", "OUTPUTS", "bucket_length", "encode", "pad", "run", "run_ids", "new_cache", "decode",
           "Baseline", "baseline", "compare"]

OUTPUTS = ("logits", "token_logprob", "argmax", "last_logprobs")


class Model(NamedTuple):
    """What the runner runs: a config, its parameters, and the mesh they are on (None: one device)."""

    config: Any
    params: Any
    mesh: Any = None


def bucket_length(n: int, max_len: int, multiple: int = 16) -> int:
    """Pads a batch's length up to a multiple of `multiple` (fewer recompilations), at most max_len."""
    return min(max_len, max(multiple, -(-n // multiple) * multiple))


def encode(tokenizer, texts: Sequence[str], max_len: int, truncate: str | None, lines: Sequence[int],
           source: str, error: type[Exception] = ValueError) -> list[list[int]]:
    """Token ids of every text; a text longer than `max_len` is an `error` unless truncated
    ("left" keeps the end, "right" the start). Errors name `source:line`."""
    if truncate not in (None, "left", "right"):
        raise error(f"truncate: expected 'left' or 'right', got {truncate!r}")
    if max_len < 1:
        raise error(f"max_len: expected >= 1, got {max_len}")
    out = []
    for text, line in zip(texts, lines):
        surrogate = lone_surrogate(text)
        if surrogate:
            raise error(f"{source}:{line}: the text is not valid Unicode ({surrogate})")
        ids = tokenizer.encode(text)
        if not ids:
            raise error(f"{source}:{line}: the prompt encodes to no tokens")
        if len(ids) > max_len:
            if truncate is None:
                raise error(f"{source}:{line}: {len(ids)} tokens, longer than max_len {max_len} "
                            f"(raise --max-len, or pass --truncate left|right)")
            ids = ids[-max_len:] if truncate == "left" else ids[:max_len]
        out.append(ids)
    return out


def pad(ids: Sequence[Sequence[int]], length: int, rows: int | None = None) -> np.ndarray:
    """int32 tokens [rows, length]: each sequence right-padded with 0 (rows default len(ids))."""
    tokens = np.zeros((rows or len(ids), length), np.int32)
    for i, seq in enumerate(ids):
        tokens[i, : len(seq)] = seq
    return tokens


def _positions(shape: tuple[int, int], start: int = 0) -> np.ndarray:
    """int32 [B, T]: positions start..start+T-1 in every row."""
    return np.ascontiguousarray(np.broadcast_to(np.arange(start, start + shape[1], dtype=np.int32), shape))


def _next_tokens(tokens: jax.Array) -> jax.Array:
    """[B, T]: the token after each position (the last position repeats its own)."""
    return jnp.concatenate([tokens[:, 1:], tokens[:, -1:]], axis=1)


def _reductions(logits: jax.Array, tokens: jax.Array, at: jax.Array, outputs: tuple[str, ...]) -> dict:
    out = {}
    if "logits" in outputs:
        out["logits"] = logits
    if "argmax" in outputs:
        out["argmax"] = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if "token_logprob" in outputs:
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B, T, V]
        picked = jnp.take_along_axis(logp, _next_tokens(tokens)[..., None], axis=-1)[..., 0]
        out["token_logprob"] = picked.at[:, -1].set(0.0)
    if "last_logprobs" in outputs:
        rows = jnp.take_along_axis(logits, at[:, None, None], axis=1)[:, 0]  # [B, V]
        out["last_logprobs"] = jax.nn.log_softmax(rows.astype(jnp.float32), axis=-1)
    return out


@functools.lru_cache(maxsize=64)
def _program(config, record: RecordSpec, compute_dtype: str, dispatch: str, interventions: tuple,
             outputs: tuple[str, ...]):
    apply = make_forward(config, record, compute_dtype, dispatch, interventions)

    def program(params, tokens, positions, at, ban_mask=None, dense_off=None):
        logits, rec = apply(params, tokens, positions, ban_mask, dense_off)
        return rec, _reductions(logits, tokens, at, outputs)

    return jax.jit(program)


def _on_mesh(mesh):
    return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


def _place(mesh, *arrays):
    if mesh is None:
        return arrays
    from grokscope.sharding import batch_sharding, place

    return tuple(place(a, batch_sharding(mesh, a.shape)) for a in arrays)


def run(model, tokens: np.ndarray, record: RecordSpec = RecordSpec(), *, compute_dtype: str = "float32",
        interventions: Sequence = (), outputs: Sequence[str] = (), at: np.ndarray | None = None,
        dispatch: str = "sparse", positions: np.ndarray | None = None, layer_masks: bool = False
        ) -> tuple[dict, dict]:
    """Runs `model` on padded `tokens` [B, T] (`positions` default 0..T-1 in every row).

    Returns (record, outputs): the recorded quantities and the asked-for reductions of the
    logits (see the module docstring), all device arrays, split over the mesh's `data` axis.
    `at` [B]: the position of each row whose next-token distribution `last_logprobs` gives
    (default the last).

    `layer_masks`: whole-layer bans and dense-MLP zeroing (and no intervention at all) go to
    the program as masks, traced data, so that one compiled program per shape serves all of
    them (the numbers are those of the compiled-in interventions); other interventions are
    compiled in as usual.
    """
    outputs = tuple(outputs)
    unknown = sorted(set(outputs) - set(OUTPUTS))
    if unknown:
        raise ValueError(f"outputs: expected some of {OUTPUTS}, got {unknown}")
    tokens = np.asarray(tokens, np.int32)
    positions = _positions(tokens.shape) if positions is None else np.ascontiguousarray(positions, np.int32)
    at = np.full(tokens.shape[0], tokens.shape[1] - 1, np.int32) if at is None else np.asarray(at, np.int32)
    interventions = tuple(interventions)
    for iv in interventions:
        iv.check(model.config)
    masks = _layer_masks(interventions, model.config) if layer_masks else None
    program = _program(model.config, record, compute_dtype, dispatch, () if masks is not None else interventions,
                       outputs)
    tokens_in, positions_in, at_in = _place(model.mesh, tokens, positions, at)
    with _on_mesh(model.mesh):
        return program(model.params, tokens_in, positions_in, at_in, *(masks or ()))


def _layer_masks(interventions: tuple, config) -> tuple[np.ndarray, np.ndarray | None] | None:
    """`_as_layer_masks`, and masks that ban nothing for no intervention."""
    if not interventions:
        return (np.zeros((config.num_layers, config.num_experts), bool),
                np.zeros(config.num_layers, bool) if config.has_dense_mlp else None)
    return _as_layer_masks(interventions, config)


def run_ids(model, ids: Sequence[Sequence[int]], length: int, record: RecordSpec = RecordSpec(),
            rows: int | None = None, **kwargs) -> tuple[np.ndarray, dict, dict]:
    """`run` on token id lists padded to [rows, length]; returns (tokens, record, outputs)."""
    tokens = pad(ids, length, rows)
    record_out, outputs = run(model, tokens, record, **kwargs)
    return tokens, record_out, outputs


def new_cache(model, batch: int, length: int, compute_dtype: str = "float32") -> dict:
    """An empty key/value cache for `batch` sequences of up to `length` positions (`decode`)."""
    from grokscope.forward import init_cache

    return init_cache(model.config, batch, length, compute_dtype)


def decode(model, tokens: np.ndarray, start: int, cache: dict, record: RecordSpec = RecordSpec(), *,
           compute_dtype: str = "float32", logits_at: np.ndarray | None = None) -> tuple[jax.Array, dict, dict]:
    """Runs the next tokens [B, T] of sequences whose first `start` positions are in `cache`
    (from `new_cache`, then from the previous call). Returns (logits [B, T, V], record, the
    updated cache); the cache passed in is consumed. With `logits_at` [B] (an index into each
    row of `tokens`), the logits are [B, V], of those positions only (a prompt's last token)."""
    from grokscope.forward import jitted_decoder

    tokens = np.asarray(tokens, np.int32)
    step = jitted_decoder(model.config, record, compute_dtype, "sparse")
    args = (model.params, tokens, _positions(tokens.shape, start), cache)
    if logits_at is not None:
        args += (np.asarray(logits_at, np.int32),)
    with _on_mesh(model.mesh):
        return step(*args)


@dataclasses.dataclass(frozen=True)
class Baseline:
    """The unintervened model's next-token log-probabilities, top-1 tokens and first-choice
    experts for a list of prompts, kept on the device, batch by batch, for `compare`."""

    ids: tuple[tuple[int, ...], ...]
    batch_size: int
    compute_dtype: str
    batches: tuple[dict[str, Any], ...]  # per batch: tokens [b, T] (host), logp [b, T, V], argmax, first


@functools.lru_cache(maxsize=8)
def _baseline_program(config, compute_dtype: str):
    apply = make_forward(config, RecordSpec(), compute_dtype, "sparse", ())

    def program(params, tokens, positions):
        logits, rec = apply(params, tokens, positions)
        return {"logp": jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1),
                "argmax": jnp.argmax(logits, axis=-1).astype(jnp.int32),
                "first": rec["expert_index"][..., 0]}

    return jax.jit(program)


@functools.lru_cache(maxsize=64)
def _compare_program(config, compute_dtype: str, interventions: tuple):
    """The comparison against a baseline; with interventions () the program takes a ban mask
    [layers, experts] (and, for models with a dense MLP, a dense-off mask [layers]) as traced data
    instead: one program for every whole-layer ban and dense-MLP zeroing."""
    apply = make_forward(config, RecordSpec(), compute_dtype, "sparse", interventions)

    def program(params, tokens, positions, base, ban_mask=None, dense_off=None):
        logits, rec = apply(params, tokens, positions, ban_mask, dense_off)
        logq = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B, T, V]
        logp = base["logp"]
        following = _next_tokens(tokens)[..., None]
        delta = (jnp.take_along_axis(logp, following, -1) - jnp.take_along_axis(logq, following, -1))[..., 0]
        # float32 on the device: accurate to ~1e-7 nats; rounding can make a vanishing KL
        # slightly negative, so it is clipped at 0 (KL >= 0).
        kl = jnp.maximum((jnp.exp(logp) * (logp - logq)).sum(-1), 0.0)
        return {"delta_loss": delta, "kl": kl,
                "top1_changed": jnp.argmax(logits, axis=-1).astype(jnp.int32) != base["argmax"],
                "routing_changed": rec["expert_index"][..., 0] != base["first"]}

    return jax.jit(program)


def _as_layer_masks(interventions: tuple, config) -> tuple[np.ndarray, np.ndarray | None] | None:
    """(ban mask [layers, experts] bool, dense-off mask [layers] bool or None for a model without a
    dense MLP) when every intervention bans experts or zeroes the dense MLP at every position of
    chosen layers (then one compiled program serves them all); None otherwise."""
    if not interventions or any(iv.kind not in ("ban", "zero_dense") or iv.positions is not None
                                for iv in interventions):
        return None
    bans = np.zeros((config.num_layers, config.num_experts), bool)
    dense_off = np.zeros(config.num_layers, bool) if config.has_dense_mlp else None
    for iv in interventions:
        for layer in range(config.num_layers) if iv.layers is None else iv.layers:
            if iv.kind == "ban":
                bans[layer, list(iv.experts)] = True
            else:
                dense_off[layer] = True
    return bans, dense_off


def baseline(model, ids: Sequence[Sequence[int]], batch_size: int, compute_dtype: str = "float32") -> Baseline:
    """The unintervened model on `ids`, in batches of `batch_size`, kept on the device."""
    program = _baseline_program(model.config, compute_dtype)
    batches = []
    for row0 in range(0, len(ids), batch_size):
        chunk = ids[row0:row0 + batch_size]
        tokens = pad(chunk, bucket_length(max(len(i) for i in chunk), model.config.sequence_len), batch_size)
        tokens_in, positions_in = _place(model.mesh, tokens, _positions(tokens.shape))
        with _on_mesh(model.mesh):
            batches.append({"tokens": tokens, **program(model.params, tokens_in, positions_in)})
    return Baseline(tuple(tuple(i) for i in ids), batch_size, compute_dtype, tuple(batches))


def compare(model, base: Baseline, interventions: Sequence) -> dict[str, np.ndarray]:
    """Per position of every prompt of `base` (rows as `base.ids`, [N, longest]): the change of
    next-token loss (`delta_loss`, intervened minus original, nats), `kl` (original ||
    intervened, nats), `top1_changed` and, per layer, `routing_changed` (first choice). Values
    at padding are left as computed; callers mask them."""
    interventions = tuple(interventions)
    for iv in interventions:
        iv.check(model.config)
    masks = _as_layer_masks(interventions, model.config)
    program = _compare_program(model.config, base.compute_dtype, () if masks is not None else interventions)
    parts = []
    for batch in base.batches:
        tokens = batch["tokens"]
        tokens_in, positions_in = _place(model.mesh, tokens, _positions(tokens.shape))
        with _on_mesh(model.mesh):
            device = {k: v for k, v in batch.items() if k != "tokens"}
            extra = () if masks is None else masks
            parts.append(jax.device_get(program(model.params, tokens_in, positions_in, device, *extra)))
    n, longest = len(base.ids), max(len(i) for i in base.ids)
    out = {}
    for name in parts[0]:
        rows = []
        for part in parts:
            value = part[name][:, :longest]
            if value.shape[1] < longest:
                width = [(0, 0), (0, longest - value.shape[1])] + [(0, 0)] * (value.ndim - 2)
                value = np.pad(value, width)
            rows.append(value)
        out[name] = np.concatenate(rows)[:n]
    return out


class ForwardOutput(NamedTuple):
    """Logits [B, T, V] float32 and the record dict (see `grokscope.record`)."""

    logits: jax.Array
    record: dict[str, jax.Array]


def forward(params: dict, config: ModelConfig, tokens, record: RecordSpec = RecordSpec(),
            mesh: Mesh | None = None, positions=None, compute_dtype: str = "float32",
            moe_dispatch: str = "sparse", interventions=()) -> ForwardOutput:
    """Runs the model on `tokens` (int [batch, seq]) and returns logits and records.

    Any batch size works. `positions` (int [batch, seq]) defaults to 0..seq-1 per row.
    `compute_dtype` is "float32" (the release's outputs) or "bfloat16" (see
    `grokscope.model.lm.forward_fn`). `moe_dispatch` is "sparse" (default) or "dense", the
    reference formulation (see `grokscope.model.moe`). `interventions`: a sequence of
    `grokscope.interventions.Intervention` (ban, zero, force, swap, renormalize, ablate_head)
    applied inside the forward; logits and records are those of the intervened model.

    With a `mesh`, parameters are placed by the release's rules (no copy if `load_params`
    already placed them there) and the batch is split over `data` when it divides.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"forward: tokens must be an int array [batch, seq], got {tokens.dtype}{list(tokens.shape)}")
    if 0 in tokens.shape:
        raise ValueError(f"forward: tokens must hold at least one sequence of at least one token, "
                         f"got shape {list(tokens.shape)}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= config.vocab_size):
        raise ValueError(f"forward: token ids must lie in [0, {config.vocab_size}), "
                         f"got [{tokens.min()}, {tokens.max()}]")
    tokens = tokens.astype(np.int32)
    if positions is None:
        positions = _positions(tokens.shape)
    positions = np.asarray(positions)
    if positions.shape != tokens.shape or not np.issubdtype(positions.dtype, np.integer):
        raise ValueError(f"forward: positions must be an int array shaped like tokens {list(tokens.shape)}, "
                         f"got {positions.dtype}{list(positions.shape)}")
    positions = positions.astype(np.int32)
    if mesh is not None:
        params = shard_params(params, mesh)
    record_out, outputs = run(Model(config, params, mesh), tokens, record, compute_dtype=compute_dtype,
                              interventions=interventions, outputs=("logits",), dispatch=moe_dispatch,
                              positions=positions)
    return ForwardOutput(outputs["logits"], record_out)
