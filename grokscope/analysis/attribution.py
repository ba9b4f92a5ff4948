"""Attribution of each token's FFN update: routed experts against the dense MLP, and each
chosen expert's direct contribution to a target token's logit.

A Grok layer ends with `h += rms_norm_3(ffn)` on the normalized input x = rms_norm_2(h):

  Grok-1   ffn = moe(x)                        (the routed experts only)
  Grok-2   ffn = (mlp(x) + moe(x)) / sqrt(2)   (a dense MLP beside the experts, same x)

Write c for the factor on each part: c = 1 without a dense MLP, c = 1/sqrt(2) with one. A
Dataset holds the dense MLP's output as `mlp_output` exactly when the model has one, so its
absence means a Grok-1 model (no dense path).

  ffn_shares                 the norms of the routed part c * moe_output and of the dense
                             part c * mlp_output, the routed share, and both parts'
                             projections on the recorded residual stream
  readout_weights            the parameters the readout uses: the post-FFN norm scales, the
                             final norm, the unembedding, the output multiplier (the only
                             function here that reads parameters)
  direct_logit_attribution   each chosen expert's (and the dense MLP's) direct contribution
                             to a target token's pre-cap logit, by a linearization of the
                             two RMSNorms that stand between it and the logits

Per-token results are (sequence, position, expert_layer[, slot]) with NaN at padding
(positions >= `length`); everything stays lazy on dask-backed Datasets.
"""

from __future__ import annotations

import math
import re
from typing import Any

import ml_dtypes
import numpy as np
import xarray as xr

from grokscope.analysis.common import valid_tokens

__all__ = ["ffn_shares", "readout_weights", "direct_logit_attribution", "TARGETS"]

TARGETS = ("next", "argmax")
"""The named targets of `direct_logit_attribution` (besides explicit token ids)."""

_DIMS = ("sequence", "position", "expert_layer")


def _ffn_multiplier(dense: bool) -> float:
    """c: the factor on the routed and on the dense part of the FFN output."""
    return 1.0 / math.sqrt(2.0) if dense else 1.0


def _norm(x: xr.DataArray) -> xr.DataArray:
    return np.sqrt((x * x).sum("hidden"))


def _per_token(x: xr.DataArray, keep: xr.DataArray, attrs: dict[str, Any]) -> xr.DataArray:
    """x masked to `keep` (NaN elsewhere), in the module's dim order, with `attrs`."""
    out = x.where(keep).transpose(*[d for d in (*_DIMS, "slot") if d in x.dims])
    out.attrs = attrs
    return out


def ffn_shares(ds: xr.Dataset) -> xr.Dataset:
    """How much of each token's FFN output is routed and how much is dense, per layer.

    With c = 1/sqrt(2) when the Dataset holds `mlp_output` (a dense MLP, Grok-2) and c = 1
    otherwise (Grok-1), per (sequence, position, expert_layer):

      routed_norm        ||c * moe_output||, the L2 norm over `hidden`
      dense_norm         ||c * mlp_output|| (0 without a dense MLP)
      routed_share       routed_norm / (routed_norm + dense_norm) (1 without a dense MLP;
                         NaN where both are 0)
      routed_projection  (c * moe_output) . h / ||h||
      dense_projection   (c * mlp_output) . h / ||h|| (0 without a dense MLP)

    where h is the recorded `residual` at the same layer number: the residual stream *after*
    that decoder layer, i.e. already holding both this layer's attention update and its FFN
    update rms_norm_3(ffn). The projections are present only when `residual` was recorded,
    and NaN at expert layers whose residual was not recorded (or is 0). All of these are
    measured before rms_norm_3, on the FFN output itself.

    Requires `moe_output` (`RecordSpec(expert_outputs=...)`).

    Returns:
      A Dataset of float32 (sequence, position, expert_layer) variables, NaN at padding;
      `attrs["dense_mlp"]` and `attrs["ffn_multiplier"]` (c).
    """
    if "moe_output" not in ds:
        raise ValueError("ffn_shares needs moe_output: record it with RecordSpec(expert_outputs='all')")
    dense = "mlp_output" in ds
    c = _ffn_multiplier(dense)
    keep = valid_tokens(ds)
    routed = ds["moe_output"].astype(np.float32) * np.float32(c)
    routed_norm = _norm(routed)
    if dense:
        dense_part = ds["mlp_output"].astype(np.float32) * np.float32(c)
        dense_norm = _norm(dense_part)
    else:
        dense_part = None
        dense_norm = xr.zeros_like(routed_norm)
    total = routed_norm + dense_norm
    where = "the dense MLP" if dense else "no dense MLP: 0"
    out = {
        "routed_norm": _per_token(routed_norm, keep, {
            "long_name": "routed FFN norm", "units": "activation",
            "description": f"||c * moe_output|| with c = {c:.6g}, before rms_norm_3"}),
        "dense_norm": _per_token(dense_norm, keep, {
            "long_name": "dense FFN norm", "units": "activation",
            "description": f"||c * mlp_output|| with c = {c:.6g}, before rms_norm_3 ({where})"}),
        "routed_share": _per_token(routed_norm / total.where(total > 0), keep, {
            "long_name": "routed share of the FFN", "units": "fraction",
            "description": "routed_norm / (routed_norm + dense_norm)",
            "baseline": 0.5 if dense else 1.0,
            "baseline_description": ("routed and dense parts of equal norm" if dense
                                     else "no dense MLP: the FFN is all routed")}),
    }
    if "residual" in ds:
        h = ds["residual"].astype(np.float32).rename(residual_layer="expert_layer")
        h = h.reindex(expert_layer=ds["expert_layer"].values)
        h_norm = _norm(h)
        unit = h / h_norm.where(h_norm > 0)
        routed_projection = xr.dot(routed, unit, dim="hidden")
        dense_projection = (xr.dot(dense_part, unit, dim="hidden") if dense
                            else routed_projection * np.float32(0))
        residual = "the recorded residual after the same layer (NaN where not recorded)"
        out["routed_projection"] = _per_token(routed_projection, keep, {
            "long_name": "routed FFN projection on the residual", "units": "activation",
            "description": f"(c * moe_output) . h / ||h||, h = {residual}"})
        out["dense_projection"] = _per_token(dense_projection, keep, {
            "long_name": "dense FFN projection on the residual", "units": "activation",
            "description": f"(c * mlp_output) . h / ||h||, h = {residual} ({where})"})
    return xr.Dataset(out, attrs={"dense_mlp": dense, "ffn_multiplier": c})


def _param_path(layout, pattern: str, what: str) -> str:
    """The one path of the parameter layout that matches `pattern`."""
    found = [path for path in layout if re.search(pattern, path)]
    if len(found) != 1:
        raise ValueError(f"readout_weights: expected one parameter for {what} in the model's layout, found {found}")
    return found[0]


def _read_param(params, path: str) -> np.ndarray:
    module, name = path.rsplit("/", 1)
    try:
        value = params[module][name]
    except KeyError:
        raise ValueError(f"readout_weights: the params have no {path}") from None
    return np.asarray(value).astype(np.float32)


def _output_multiplier(config) -> float:
    """The output multiplier as the forward applies it: rounded to bfloat16 in Grok-1's
    release (`multipliers_dtype` "bfloat16"), a float32 constant otherwise."""
    value = float(config.output_multiplier_scale)
    if getattr(config, "multipliers_dtype", "bfloat16") == "bfloat16":
        from grokscope.model.lm import as_activation_constant

        return as_activation_constant(value)
    return float(np.float32(value))


def readout_weights(params, config) -> dict[str, np.ndarray]:
    """The parameters between the FFN updates and the logits, as numpy arrays.

    The paths come from `grokscope.layout.param_layout(config)`: the unembedding is the tied
    input embedding `in_out_embed/embeddings` unless `config.tied_embeddings` is False
    (Grok-2's separate `unembed/embeddings`).

    Args:
      params: the haiku params `{module path: {name: array}}` (numpy or jax arrays, on a mesh
        or not).
      config: their ModelConfig.

    Returns:
      {"post_ffn_scale": float32 [num_layers, D], the `rms_norm_3` scale of every layer;
       "final_scale": float32 [D], the final `rms_norm` scale;
       "unembed": float32 [V, D], W_U;
       "output_multiplier": float32 0-d, as the forward applies it (bfloat16-rounded for
         Grok-1, see `multipliers_dtype`);
       "eps": float32 0-d, the RMSNorms' epsilon;
       "dense_mlp": bool 0-d, whether a dense MLP runs beside the experts;
       "final_logit_softcap": float32 0-d, the cap on the output logits (NaN: none);
       "logits_bfloat16": bool 0-d, whether the model rounds its logits through bfloat16}.
    """
    from grokscope.layout import param_layout

    layout = param_layout(config)
    tied = getattr(config, "tied_embeddings", True)
    unembed = _param_path(layout, r"(^|/)in_out_embed/embeddings$" if tied else r"(^|/)unembed/embeddings$",
                          "the unembedding")
    final = _param_path(layout, r"^language_model/rms_norm/scale$", "the final norm")
    post = [_param_path(layout, rf"(^|/)decoder_layer_{i}/rms_norm_3/scale$", f"layer {i}'s post-FFN norm")
            for i in range(config.num_layers)]
    cap = config.final_logit_softcap
    return {
        "post_ffn_scale": np.stack([_read_param(params, path) for path in post]),
        "final_scale": _read_param(params, final),
        "unembed": _read_param(params, unembed),
        "output_multiplier": np.asarray(_output_multiplier(config), np.float32),
        "eps": np.asarray(config.norm_eps, np.float32),
        "dense_mlp": np.asarray(getattr(config, "dense_ffn_size", None) is not None),
        "final_logit_softcap": np.asarray(np.nan if cap is None else cap, np.float32),
        "logits_bfloat16": np.asarray(config.logits_dtype == "bfloat16"),
    }


def _model_argmax(normed: np.ndarray, readout: dict, block: int = 256) -> np.ndarray:
    """The model's top next token for rows `normed` [..., D] (rms_norm(h_final) * final
    scale): the logits recomputed through the readout, capped and rounded as the model
    rounds them, then argmax (ties to the lower id, as jnp.argmax)."""
    unembed = readout["unembed"]
    multiplier = np.float32(readout["output_multiplier"])
    cap = float(readout["final_logit_softcap"])
    rows = normed.reshape(-1, normed.shape[-1]).astype(np.float32)
    out = np.zeros(rows.shape[0], np.int32)
    for start in range(0, rows.shape[0], block):
        logits = (rows[start:start + block] @ unembed.T) * multiplier
        if math.isfinite(cap):
            logits = np.float32(cap) * np.tanh(logits / np.float32(cap))
        if bool(readout["logits_bfloat16"]):
            logits = logits.astype(ml_dtypes.bfloat16).astype(np.float32)
        out[start:start + block] = logits.argmax(-1)
    return out.reshape(normed.shape[:-1])


def _target_ids(ds: xr.Dataset, target, normed: xr.DataArray, readout: dict) -> tuple[xr.DataArray, xr.DataArray]:
    """(token ids (sequence, position), 0 where there is none; True where there is one)."""
    keep = valid_tokens(ds)
    V = readout["unembed"].shape[0]
    if isinstance(target, str):
        if target == "next":
            position = xr.DataArray(np.arange(ds.sizes["position"]), dims="position")
            has = keep & (position + 1 < ds["length"])
            ids = ds["tokens"].shift(position=-1, fill_value=0)
        elif target == "argmax":
            has = keep
            ids = xr.apply_ufunc(_model_argmax, normed, kwargs={"readout": readout}, input_core_dims=[["hidden"]],
                                 dask="parallelized", output_dtypes=[np.int32])
        else:
            raise ValueError(f"direct_logit_attribution: target {target!r}: expected one of {TARGETS} or token ids")
    else:
        if isinstance(target, xr.DataArray):
            ids = target
        elif np.ndim(target) == 0:
            ids = xr.full_like(ds["tokens"], int(target), dtype=np.int64)
        else:
            ids = xr.DataArray(np.asarray(target), dims=("sequence", "position"))
        if set(ids.dims) != {"sequence", "position"} or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"direct_logit_attribution: target ids: expected integers over (sequence, position), "
                             f"got {ids.dtype} over {ids.dims}")
        values = np.asarray(ids.values)
        if values.size and (values.min() < -1 or values.max() >= V):
            raise ValueError(f"direct_logit_attribution: target ids must lie in [0, {V}) (-1: none), "
                             f"got [{values.min()}, {values.max()}]")
        has = keep & (ids >= 0)
    ids = ids.where(has, 0).astype(np.int64)
    return ids.transpose("sequence", "position"), has.transpose("sequence", "position")


def _take_rows(ids: np.ndarray, unembed: np.ndarray) -> np.ndarray:
    return unembed[ids]


def _unembed_rows(ids: xr.DataArray, unembed: np.ndarray) -> xr.DataArray:
    """W_U[ids] (..., hidden), lazily on dask-backed ids."""
    return xr.apply_ufunc(_take_rows, ids, kwargs={"unembed": unembed}, output_core_dims=[["hidden"]],
                          dask="parallelized", output_dtypes=[np.float32],
                          dask_gufunc_kwargs={"output_sizes": {"hidden": unembed.shape[1]}})


def _check_inputs(ds: xr.Dataset, readout: dict) -> int:
    """Raises a one-line ValueError naming what to record; returns the last layer's number."""
    L = readout["post_ffn_scale"].shape[0]
    last = L - 1
    missing = [name for name in ("expert_index", "expert_gate", "expert_output", "moe_output") if name not in ds]
    if "residual" not in ds or last not in set(int(x) for x in ds["residual_layer"].values):
        missing.append(f"residual after the last layer ({last})")
    if missing:
        raise ValueError(f"direct_logit_attribution needs {', '.join(missing)}: record them with "
                         f"RecordSpec(routing=True, residual=({last},), expert_outputs='all')")
    dense = bool(readout["dense_mlp"])
    if dense and "mlp_output" not in ds:
        raise ValueError("direct_logit_attribution: the model has a dense MLP but the Dataset has no mlp_output: "
                         "record it with RecordSpec(expert_outputs='all')")
    if not dense and "mlp_output" in ds:
        raise ValueError("direct_logit_attribution: the Dataset has mlp_output but the readout's model has no dense "
                         "MLP: pass readout_weights(params, config) of the model that wrote the Dataset")
    layers = [int(x) for x in ds["expert_layer"].values]
    D = readout["final_scale"].shape[0]
    if any(not 0 <= x < L for x in layers) or ds.sizes["hidden"] != D or ds.sizes.get("layer", L) != L:
        raise ValueError(f"direct_logit_attribution: the Dataset (layers {layers}, hidden {ds.sizes['hidden']}) "
                         f"does not match the readout's model ({L} layers, hidden {D})")
    return last


def direct_logit_attribution(ds: xr.Dataset, readout: dict, target="next") -> xr.Dataset:
    """Each chosen expert's, and the dense MLP's, direct contribution to a target token's logit.

    The linearization. At layer i the FFN update of the residual stream is

        u_i = rms_norm_3(ffn_i) = scale3_i * ffn_i / r_i,   r_i = sqrt(mean(ffn_i^2) + eps),
        ffn_i = c * (sum_s gate_s * expert_output[e_s] + mlp_output)

    (c = 1/sqrt(2) with a dense MLP, whose term is absent otherwise), and the logits are

        logits = output_mult * (W_U * final_scale) . h_final / R,   R = sqrt(mean(h_final^2) + eps),

    before the optional soft cap. Holding r_i and R fixed at their actual values makes both
    maps linear, so a vector v added to the stream contributes output_mult * (W_U[t] *
    final_scale) . v / R to the logit of token t. The chosen expert e_s in slot s at layer i
    contributes

        expert_dla = output_mult * (W_U[t] * final_scale) . (scale3_i * c * gate_s * expert_output[e_s] / r_i) / R

    and the dense MLP `dense_dla`, the same with mlp_output in place of gate_s *
    expert_output[e_s] (0 without a dense MLP). r_i is computed from the recorded float32
    `moe_output` (and `mlp_output`) with c, R from h_final = the recorded `residual` after the
    last layer (num_layers - 1); eps is the model's. The slots' contributions and the dense
    one sum to the direct contribution of the whole update u_i. The soft cap is not
    linearized: every value here, `target_logit` included, is in pre-cap logits.

    Args:
      ds: a Dataset with `expert_index`, `expert_gate`, `expert_output`, `moe_output`, the
        `residual` after the last layer, and `mlp_output` when the model has a dense MLP,
        e.g. from `Session.run(..., record=RecordSpec(residual="all", expert_outputs="all"))`.
      readout: `readout_weights(params, config)` of the model that wrote `ds`.
      target: which logit, per token: "next" (the next token in `tokens`; none at a
        sequence's last position), "argmax" (the model's own top prediction, from the logits
        recomputed from h_final through the readout, capped and rounded as the model does),
        or token ids: one int for every token, or ints over (sequence, position) (-1: none).

    Returns:
      A Dataset with
        expert_dla (sequence, position, expert_layer, slot) float32;
        dense_dla (sequence, position, expert_layer) float32;
        expert_dla_baseline, dense_dla_baseline: the same contributions to the mean logit
          over the vocabulary (W_U[t] replaced by the mean row of W_U), the null baseline:
          expert_dla - expert_dla_baseline is what the expert adds to the target relative
          to an average token;
        target_logit (sequence, position) float32: the target's pre-cap logit recomputed from
          h_final (the sum of every component's direct contribution);
        target (sequence, position) int32, -1 where there is none;
        expert_index, expert_gate (sequence, position, expert_layer, slot): the chosen experts.
      NaN at padding and where there is no target.
    """
    last = _check_inputs(ds, readout)
    mode = target if isinstance(target, str) else "ids"
    dense = bool(readout["dense_mlp"])
    c = np.float32(_ffn_multiplier(dense))
    eps = np.float32(readout["eps"])
    multiplier = np.float32(readout["output_multiplier"])
    unembed = np.asarray(readout["unembed"], np.float32)
    final_scale = xr.DataArray(np.asarray(readout["final_scale"], np.float32), dims="hidden")
    layers = ds["expert_layer"].values
    scale3 = xr.DataArray(np.asarray(readout["post_ffn_scale"], np.float32)[layers], dims=("expert_layer", "hidden"),
                          coords={"expert_layer": layers})

    h_final = ds["residual"].sel(residual_layer=last, drop=True).astype(np.float32)
    R = np.sqrt((h_final * h_final).mean("hidden") + eps)
    normed = h_final / R * final_scale
    ids, has = _target_ids(ds, target, normed, readout)
    keep = has

    moe = ds["moe_output"].astype(np.float32)
    ffn = c * (moe + ds["mlp_output"].astype(np.float32)) if dense else c * moe
    r = np.sqrt((ffn * ffn).mean("hidden") + eps)  # [S, P, L]
    per_layer = scale3 * c / r  # [S, P, L, D]: d logit / d (gate * expert output), up to the row
    readout_row = _unembed_rows(ids, unembed) * final_scale * multiplier / R  # [S, P, D]
    mean_row = xr.DataArray(unembed.mean(0), dims="hidden") * final_scale * multiplier / R
    index = ds["expert_index"].sel(layer=ds["expert_layer"]).drop_vars("layer")
    gate = ds["expert_gate"].sel(layer=ds["expert_layer"]).drop_vars("layer").astype(np.float32)
    experts = xr.DataArray(np.arange(ds.sizes["expert"]), dims="expert")
    chosen = experts == index  # [S, P, L, slot, E]

    def contributions(row):
        direction = row * per_layer
        per_expert = xr.dot(direction, ds["expert_output"].astype(np.float32), dim="hidden")  # [S, P, L, E]
        expert = gate * xr.dot(per_expert, chosen.astype(np.float32), dim="expert")
        mlp = xr.dot(direction, ds["mlp_output"].astype(np.float32), dim="hidden") if dense \
            else xr.zeros_like(r)
        return expert, mlp

    expert_dla, dense_dla = contributions(readout_row)
    expert_base, dense_base = contributions(mean_row)
    where = "" if dense else " (no dense MLP: 0)"
    unit = {"units": "logit"}
    rule = ("output_mult * (W_U[t] * final_scale) . (scale3 * c * gate * expert_output / rms(ffn)) / rms(h_final), "
            "both rms held at their actual values; pre-cap")
    out = {
        "expert_dla": _per_token(expert_dla, keep, {
            **unit, "long_name": "expert direct logit attribution",
            "description": "the chosen expert's direct contribution to the target's logit: " + rule,
            "baseline": 0.0, "baseline_description": "no direct effect; see expert_dla_baseline"}),
        "dense_dla": _per_token(dense_dla, keep, {
            **unit, "long_name": "dense MLP direct logit attribution",
            "description": "the dense MLP's direct contribution to the target's logit" + where}),
        "expert_dla_baseline": _per_token(expert_base, keep, {
            **unit, "long_name": "expert direct attribution to the mean logit",
            "description": "expert_dla with W_U[t] replaced by the mean row of W_U"}),
        "dense_dla_baseline": _per_token(dense_base, keep, {
            **unit, "long_name": "dense MLP direct attribution to the mean logit",
            "description": "dense_dla with W_U[t] replaced by the mean row of W_U" + where}),
        "target_logit": _per_token(xr.dot(readout_row, h_final, dim="hidden"), keep, {
            **unit, "long_name": "target logit", "description": "output_mult * (W_U[t] * final_scale) . h_final / "
                                                               "rms(h_final), recomputed, before the soft cap"}),
        "target": ids.where(has, -1).astype(np.int32).assign_attrs(
            long_name="target token", units="token",
            description=f"the token whose logit is attributed ({mode}); -1: none"),
        "expert_index": index.transpose(*_DIMS, "slot"),
        "expert_gate": gate.transpose(*_DIMS, "slot"),
    }
    return xr.Dataset(out, attrs={"target": mode, "dense_mlp": dense,
                                  "ffn_multiplier": float(c), "last_layer": last})
