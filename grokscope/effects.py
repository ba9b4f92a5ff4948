"""What an intervention does to the model's predictions and to routing downstream.

`effects(session, prompts, interventions)` runs every prompt twice (as is and intervened), in
batches, and returns per position:

  delta_loss       next-token loss of the intervened model minus the original's, in nats:
                   -log p'(x_{t+1}) + log p(x_{t+1}) (NaN at the last token and at padding)
  kl               KL(original || intervened) of the next-token distributions, in nats
  top1_changed     the most likely next token differs
  routing_changed  (per layer) the token's first-choice expert differs

as an `xarray.Dataset` (sequence, position[, layer]) with the prompts' tokens, lengths, text
and metadata, in the store's naming; `out=` also writes it as a zarr store.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["effects"]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def effects(session, prompts: str | Sequence[str], interventions: Sequence, batch_size: int = 8,
            metadata: dict[str, Sequence[Any]] | None = None, out: str | Path | None = None):
    """Effects of `interventions` (applied together) on each prompt, per position.

    Args:
      session: a `grokscope.Session`.
      prompts: a string or a list of strings.
      interventions: `grokscope.interventions` objects (ban, zero, force, swap, ...).
      batch_size: prompts per forward.
      metadata: per-prompt columns kept in the result (e.g. {"label": [...]}).
      out: also write the result to this zarr store (refuses an existing path).
    """
    import jax
    import xarray as xr

    from grokscope.dump import encode_prompts
    from grokscope.forward import jitted_forward
    from grokscope.record import RecordSpec
    from grokscope.session import bucket_length

    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not texts:
        raise ValueError("effects: no prompts")
    interventions = tuple(interventions)
    if not interventions:
        raise ValueError("effects: no interventions given")
    config = session.config
    for iv in interventions:
        iv.check(config)
    ids = encode_prompts(session.tokenizer, texts, config.sequence_len, None, list(range(1, len(texts) + 1)),
                         "effects")
    N, P, L = len(texts), max(len(i) for i in ids), config.num_layers
    delta = np.full((N, P), np.nan, np.float32)
    kl = np.full((N, P), np.nan, np.float32)
    top1 = np.zeros((N, P), bool)
    routing = np.zeros((N, P, L), bool)
    tokens_out = np.zeros((N, P), np.int32)
    spec = RecordSpec()
    original = jitted_forward(config, spec, session.compute_dtype, "sparse")
    intervened = jitted_forward(config, spec, session.compute_dtype, "sparse", interventions)
    for row0 in range(0, N, batch_size):
        batch = ids[row0:row0 + batch_size]
        length = bucket_length(max(len(i) for i in batch), config.sequence_len)
        tokens = np.zeros((batch_size, length), np.int32)
        for r, seq in enumerate(batch):
            tokens[r, :len(seq)] = seq
        positions = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape)
        mesh = session.mesh
        if mesh is not None:
            from grokscope.sharding import batch_sharding, place

            tokens_in = place(tokens, batch_sharding(mesh, tokens.shape))
            positions_in = place(positions, batch_sharding(mesh, positions.shape))
            with jax.set_mesh(mesh):
                results = (original(session.params, tokens_in, positions_in),
                           intervened(session.params, tokens_in, positions_in))
        else:
            results = (original(session.params, tokens, positions), intervened(session.params, tokens, positions))
        (logits_a, rec_a), (logits_b, rec_b) = jax.device_get(results)
        logp_a, logp_b = _log_softmax(logits_a), _log_softmax(logits_b)
        for r, seq in enumerate(batch):
            n, row = len(seq), row0 + r
            tokens_out[row, :n] = seq
            if n > 1:
                nxt = np.asarray(seq[1:])
                at = np.arange(n - 1)
                delta[row, :n - 1] = logp_a[r, at, nxt] - logp_b[r, at, nxt]
                p = np.exp(logp_a[r, :n - 1])
                kl[row, :n - 1] = (p * (logp_a[r, :n - 1] - logp_b[r, :n - 1])).sum(-1)
            top1[row, :n] = logits_a[r, :n].argmax(-1) != logits_b[r, :n].argmax(-1)
            routing[row, :n] = rec_a["expert_index"][r, :n, :, 0] != rec_b["expert_index"][r, :n, :, 0]
    lengths = np.array([len(i) for i in ids], np.int32)
    data = {
        "tokens": (("sequence", "position"), tokens_out),
        "length": (("sequence",), lengths),
        "prompt": (("sequence",), np.array(texts, dtype=np.dtypes.StringDType())),
        "delta_loss": (("sequence", "position"), delta, {"long_name": "change in next-token loss", "units": "nats"}),
        "kl": (("sequence", "position"), kl, {"long_name": "KL(original || intervened)", "units": "nats"}),
        "top1_changed": (("sequence", "position"), top1, {"long_name": "most likely next token changed"}),
        "routing_changed": (("sequence", "position", "layer"), routing,
                            {"long_name": "first-choice expert changed"}),
        "vocab_piece": (("vocab",), np.array(session.tokenizer.pieces(range(session.tokenizer.vocab_size)),
                                             dtype=np.dtypes.StringDType())),
    }
    for name, values in (metadata or {}).items():
        if len(values) != N:
            raise ValueError(f"effects: metadata {name!r} has {len(values)} values for {N} prompts")
        values = np.asarray(values)
        data[name] = (("sequence",), values.astype(np.dtypes.StringDType()) if values.dtype.kind in "UO" else values)
    ds = xr.Dataset(data, coords={"layer": np.arange(L, dtype=np.int32)},
                    attrs={"grokscope": {"kind": "effects"}, "interventions": [iv.describe() for iv in interventions],
                           "model_config": config.to_dict()})
    if out is not None:
        out = Path(out)
        if out.exists():
            raise FileExistsError(f"effects: {out} exists; choose another path")
        ds.to_zarr(out, zarr_format=3, consolidated=False)
    return ds
