"""What an intervention does to the model's predictions and to routing downstream.

`effects(session, prompts, interventions)` compares the intervened model with the model as it
is on every prompt and returns per position:

  delta_loss       next-token loss of the intervened model minus the original's, in nats:
                   -log p'(x_{t+1}) + log p(x_{t+1}) (NaN at the last token and at padding)
  kl               KL(original || intervened) of the next-token distributions, in nats
  top1_changed     the most likely next token differs
  routing_changed  (per layer) the token's first-choice expert differs

as an `xarray.Dataset` (sequence, position[, layer]) with the prompts' tokens, lengths, text
and metadata, in the store's naming; `out=` also writes it as a zarr store.

Everything is reduced on the device (`grokscope.runner.compare`): per batch only [B, T] and
[B, T, layers] arrays reach the host. The unintervened model's side is computed once per
prompt set: pass `baseline=effects_baseline(session, prompts)` to reuse it across many
interventions (it stays on the device: B x T x vocab float32 per batch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["effects", "effects_baseline"]


def _ids(session, texts: Sequence[str], source: str) -> list[list[int]]:
    from grokscope.runner import encode

    return encode(session.tokenizer, texts, session.config.sequence_len, None, list(range(1, len(texts) + 1)),
                  source)


def effects_baseline(session, prompts: str | Sequence[str], batch_size: int = 8):
    """The model as it is on `prompts`, kept on the device, for `effects(..., baseline=)`."""
    from grokscope.runner import baseline

    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not texts:
        raise ValueError("effects_baseline: no prompts")
    return baseline(session.loaded_model, _ids(session, texts, "effects_baseline"), batch_size,
                    session.compute_dtype)


def effects(session, prompts: str | Sequence[str], interventions: Sequence, batch_size: int = 8,
            metadata: dict[str, Sequence[Any]] | None = None, out: str | Path | None = None, baseline=None):
    """Effects of `interventions` (applied together) on each prompt, per position.

    Args:
      session: a `grokscope.Session`.
      prompts: a string or a list of strings.
      interventions: `grokscope.interventions` objects (ban, zero, force, swap, ...).
      batch_size: prompts per forward (ignored when `baseline` is given: its batches are used).
      metadata: per-prompt columns kept in the result (e.g. {"label": [...]}).
      out: also write the result to this zarr store (refuses an existing path).
      baseline: `effects_baseline(session, prompts)` of these same prompts, to reuse.
    """
    import xarray as xr

    from grokscope.runner import compare

    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not texts:
        raise ValueError("effects: no prompts")
    interventions = tuple(interventions)
    if not interventions:
        raise ValueError("effects: no interventions given")
    config = session.config
    for iv in interventions:
        iv.check(config)
    N = len(texts)
    for name, values in (metadata or {}).items():
        if len(values) != N:
            raise ValueError(f"effects: metadata {name!r} has {len(values)} values for {N} prompts")
    if out is not None and Path(out).exists():
        raise FileExistsError(f"effects: {out} exists; choose another path")
    ids = _ids(session, texts, "effects")
    if baseline is None:
        baseline = effects_baseline(session, texts, batch_size)
    elif [list(i) for i in baseline.ids] != ids or baseline.compute_dtype != session.compute_dtype:
        raise ValueError("effects: the baseline was computed for other prompts (or another compute dtype)")
    changes = compare(session.loaded_model, baseline, interventions)
    lengths = np.array([len(i) for i in ids], np.int32)
    P = int(lengths.max())
    position = np.arange(P)[None, :]
    has_next = position < (lengths - 1)[:, None]  # [N, P]: positions with a next token
    valid = position < lengths[:, None]
    delta = np.where(has_next, changes["delta_loss"], np.nan).astype(np.float32)
    kl = np.where(has_next, changes["kl"], np.nan).astype(np.float32)
    top1 = changes["top1_changed"] & valid
    routing = changes["routing_changed"] & valid[..., None]
    tokens_out = np.zeros((N, P), np.int32)
    for row, seq in enumerate(ids):
        tokens_out[row, :len(seq)] = seq
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
        values = np.asarray(values)
        data[name] = (("sequence",), values.astype(np.dtypes.StringDType()) if values.dtype.kind in "UO" else values)
    ds = xr.Dataset(data, coords={"layer": np.arange(config.num_layers, dtype=np.int32)},
                    attrs={"grokscope": {"kind": "effects"}, "interventions": [iv.describe() for iv in interventions],
                           "model_config": config.to_dict()})
    if out is not None:
        ds.to_zarr(Path(out), zarr_format=3, consolidated=False)
    return ds
