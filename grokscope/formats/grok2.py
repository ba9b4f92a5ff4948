"""Grok-2's checkpoint: the release's TP=8 safetensors, and an unsharded Hugging Face layout.

The release (`xai-org/grok-2`) holds 39 safetensors files. `pytorch_model-000NN-TP-common`
files hold full tensors, each kind of tensor in its own file for every layer; the experts'
`w1`/`w2`/`w3` are split over 8 tensor-parallel ranks, `pytorch_model-0000{6,7,8}-TP-00{r}`
(w1 and w3 on dim 0, w2 on dim 1). Weights are bfloat16 in torch `[out, in]` order, under
Hugging Face names. An unsharded layout (`model*.safetensors`, with or without
`model.safetensors.index.json`) holds the same names whole.

`RELEASE_NAMES` maps each Hugging Face name to grokscope's parameter (`grokscope.layout`):

  model.embed_tokens.weight                   language_model/in_out_embed/embeddings    [V, D]
  lm_head.weight                              language_model/unembed/embeddings         [V, D]
  model.norm.weight                           language_model/rms_norm/scale
  model.layers.{i}.self_attn.{q,k,v}_proj     multi_head_attention/{query,key,value}/w  (transposed)
  model.layers.{i}.self_attn.o_proj           multi_head_attention/linear/w             (transposed)
  model.layers.{i}.{pre,post}_attn_norm       rms_norm, rms_norm_1
  model.layers.{i}.{pre,post}_moe_norm        rms_norm_2, rms_norm_3
  model.layers.{i}.block_sparse_moe.gate      router/w                                  (transposed)
  ...block_sparse_moe.experts.{e}.w1/w3/w2    moe/linear, moe/linear_v, moe/linear_1 [e] (transposed)
  model.layers.{i}.mlp.gate/up/down_proj      mlp/linear, mlp/linear_v, mlp/linear_1    (transposed)

(`lm_head` is stored unscaled; the forward multiplies the logits by `output_multiplier_scale`.)
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
import xxhash

from grokscope.checkpoint import CheckpointError
from grokscope.formats.safetensors_io import (SafetensorsError, TensorInfo, aligned_empty, read_header, read_tensor,
                                              write_file)
from grokscope.layout import param_layout
from grokscope.quant import QuantizedWeight8bit, quantize

__all__ = ["Grok2CheckpointError", "Source", "release_names", "is_grok2_dir", "scan", "load_params",
           "save_release", "checkpoint_files", "RELEASE_FILES", "TP"]

TP = 8
"""Tensor-parallel ranks of the release's expert files."""

_LAYER_NAMES = {
    "self_attn.q_proj.weight": ("multi_head_attention/query/w", True),
    "self_attn.k_proj.weight": ("multi_head_attention/key/w", True),
    "self_attn.v_proj.weight": ("multi_head_attention/value/w", True),
    "self_attn.o_proj.weight": ("multi_head_attention/linear/w", True),
    "pre_attn_norm.weight": ("rms_norm/scale", False),
    "post_attn_norm.weight": ("rms_norm_1/scale", False),
    "pre_moe_norm.weight": ("rms_norm_2/scale", False),
    "post_moe_norm.weight": ("rms_norm_3/scale", False),
    "block_sparse_moe.gate.weight": ("router/w", True),
    "mlp.gate_proj.weight": ("mlp/linear/w", True),
    "mlp.up_proj.weight": ("mlp/linear_v/w", True),
    "mlp.down_proj.weight": ("mlp/linear_1/w", True),
}
_EXPERT_NAMES = {"w1": "moe/linear/w", "w3": "moe/linear_v/w", "w2": "moe/linear_1/w"}

RELEASE_FILES = {
    "model.embed_tokens.weight": 0, "lm_head.weight": 1, "model.norm.weight": 2, "mlp.gate_proj.weight": 3,
    "mlp.down_proj.weight": 4, "mlp.up_proj.weight": 5, "w1": 6, "w2": 7, "w3": 8, "self_attn.k_proj.weight": 9,
    "self_attn.o_proj.weight": 10, "self_attn.q_proj.weight": 11, "self_attn.v_proj.weight": 12,
    "pre_attn_norm.weight": 13, "post_attn_norm.weight": 14, "pre_moe_norm.weight": 15,
    "post_moe_norm.weight": 16, "block_sparse_moe.gate.weight": 17,
}
"""The release's file number of each kind of tensor (experts' w1/w2/w3 by their short name)."""

_TP_FILE = re.compile(r"^pytorch_model-(\d{5})-TP-(common|\d{3})\.safetensors$")
_HF_FILE = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$")


class Grok2CheckpointError(CheckpointError):
    """A Grok-2 checkpoint directory that does not match the model; names the file and tensor."""


@dataclasses.dataclass(frozen=True)
class Source:
    """Where a Hugging Face tensor goes: grokscope parameter, expert index (stacked experts)
    and whether it is transposed from torch's [out, in]; `shape` is the torch-order shape."""

    param: str
    expert: int | None
    transpose: bool
    shape: tuple[int, ...]


def release_names(config) -> dict[str, Source]:
    """`{Hugging Face name: Source}` for every tensor of a Grok-2-architecture `config`."""
    layout = param_layout(config)

    def torch_shape(path, transpose, expert=False):
        shape = layout[path].shape[1:] if expert else layout[path].shape
        return tuple(reversed(shape)) if transpose else tuple(shape)

    names = {"model.embed_tokens.weight": Source("language_model/in_out_embed/embeddings", None, False,
                                                 torch_shape("language_model/in_out_embed/embeddings", False)),
             "model.norm.weight": Source("language_model/rms_norm/scale", None, False, (config.emb_size,))}
    if not config.tied_embeddings:
        names["lm_head.weight"] = Source("language_model/unembed/embeddings", None, False,
                                         torch_shape("language_model/unembed/embeddings", False))
    for i in range(config.num_layers):
        layer = f"transformer/decoder_layer_{i}"
        for suffix, (path, transpose) in _LAYER_NAMES.items():
            full = f"{layer}/{path}"
            if full in layout:
                names[f"model.layers.{i}.{suffix}"] = Source(full, None, transpose, torch_shape(full, transpose))
        for e in range(config.num_experts):
            for w, path in _EXPERT_NAMES.items():
                full = f"{layer}/{path}"
                names[f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight"] = Source(
                    full, e, True, torch_shape(full, True, expert=True))
    return names


def checkpoint_files(directory: str | os.PathLike) -> list[Path]:
    """The safetensors files of a Grok-2 checkpoint directory (release or unsharded layout)."""
    directory = Path(directory)
    try:
        return sorted(p for p in directory.iterdir()
                      if _TP_FILE.match(p.name) or _HF_FILE.match(p.name))
    except OSError as e:
        raise Grok2CheckpointError(f"{directory}: cannot list it ({e.strerror or e})") from None


def is_grok2_dir(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds safetensors in the release's or the unsharded layout."""
    directory = Path(directory)
    return directory.is_dir() and bool(checkpoint_files(directory))


def _rank(file: Path) -> int | None:
    """The TP rank in a release file name; None for a file of full tensors."""
    match = _TP_FILE.match(file.name)
    return None if match is None or match.group(2) == "common" else int(match.group(2))


def scan(directory: str | os.PathLike, config) -> dict[str, list[TensorInfo]]:
    """Every expected tensor's pieces (one full piece, or the TP ranks' slices in rank order),
    validated against `config` from the files' headers alone (no tensor data is read).

    Raises:
      Grok2CheckpointError: naming the file and tensor of the first problem: an unexpected
        tensor (a config that does not match), a missing tensor, a missing or duplicate TP
        rank, a shape or dtype that does not fit.
    """
    directory = Path(directory)
    files = checkpoint_files(directory)
    if not files:
        raise Grok2CheckpointError(f"{directory}: no Grok-2 safetensors (expected pytorch_model-*-TP-*.safetensors "
                                   f"or model*.safetensors)")
    expected = release_names(config)
    found: dict[str, list[tuple[int | None, TensorInfo]]] = {}
    for file in files:
        try:
            header = read_header(file)
        except SafetensorsError as e:
            raise Grok2CheckpointError(str(e)) from None
        rank = _rank(file)
        for name, info in header.items():
            if name not in expected:
                raise Grok2CheckpointError(f"{file}: unexpected tensor {name!r} for this config "
                                           f"({config.num_layers} layers, {config.num_experts} experts); "
                                           f"is config.json right?")
            if info.dtype not in (np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16), np.dtype(np.float32)):
                raise Grok2CheckpointError(f"{file}: tensor {name!r}: expected bfloat16/float16/float32, "
                                           f"got {info.dtype}")
            found.setdefault(name, []).append((rank, info))
    pieces: dict[str, list[TensorInfo]] = {}
    for name, source in expected.items():
        parts = found.get(name)
        if not parts:
            raise Grok2CheckpointError(f"{directory}: tensor {name!r} missing (expected in "
                                       f"{_release_file_hint(name)})")
        pieces[name] = _check_pieces(name, source.shape, parts)
    return pieces


def _release_file_hint(name: str) -> str:
    match = re.search(r"experts\.\d+\.(w[123])\.weight$", name)
    if match:
        return f"pytorch_model-{RELEASE_FILES[match.group(1)]:05d}-TP-00r.safetensors, r = 0..{TP - 1}"
    key = name if name in RELEASE_FILES else re.sub(r"^model\.layers\.\d+\.", "", name)
    number = RELEASE_FILES.get(key)
    return f"pytorch_model-{number:05d}-TP-common.safetensors" if number is not None else "a safetensors file"


def _check_pieces(name: str, shape: tuple[int, ...], parts) -> list[TensorInfo]:
    """The pieces of one tensor in rank order, checked to tile `shape` along one dim."""
    whole = [info for rank, info in parts if rank is None]
    if whole:
        if len(parts) > 1:
            files = ", ".join(str(info.file.name) for _, info in parts[:3])
            raise Grok2CheckpointError(f"tensor {name!r} is stored more than once ({files})")
        info = whole[0]
        if info.shape != shape:
            raise Grok2CheckpointError(f"{info.file}: tensor {name!r}: expected shape {list(shape)}, got "
                                       f"{list(info.shape)}")
        return [info]
    parts = sorted(parts, key=lambda p: p[0])
    ranks = [rank for rank, _ in parts]
    if ranks != list(range(len(parts))):
        missing = sorted(set(range(max(ranks) + 1)) - set(ranks))
        detail = f"rank {missing[0]} missing" if missing else f"ranks {ranks}"
        raise Grok2CheckpointError(f"{parts[0][1].file.parent}: tensor {name!r}: {detail} (expected ranks "
                                   f"0..{len(parts) - 1 if not missing else max(ranks)})")
    infos = [info for _, info in parts]
    split = _split_dim(shape, infos)
    if split is None:
        raise Grok2CheckpointError(f"{infos[0].file}: tensor {name!r}: {len(infos)} rank slices of shape "
                                   f"{list(infos[0].shape)} do not tile the expected shape {list(shape)}")
    return infos


def _split_dim(shape, infos) -> int | None:
    """The dim along which the slices `infos` tile `shape` (all other dims equal), or None."""
    for dim in range(len(shape)):
        others_equal = all(len(i.shape) == len(shape) and all(i.shape[d] == shape[d] for d in range(len(shape))
                                                                if d != dim) for i in infos)
        if others_equal and sum(i.shape[dim] for i in infos) == shape[dim]:
            return dim
    return None


def _assemble(names: list[str], sources: dict[str, Source], pieces: dict[str, list[TensorInfo]], spec,
              hasher) -> np.ndarray:
    """One grokscope parameter built from its Hugging Face tensors, in `spec.dtype` (bfloat16), in
    page-aligned memory that placing it on a CPU device shares instead of copying."""
    out = aligned_empty(spec.shape, spec.dtype)
    for name in names:
        source = sources[name]
        dest = out if source.expert is None else out[source.expert]
        infos = pieces[name]
        if (len(infos) == 1 and not source.transpose and source.expert is None
                and infos[0].dtype == out.dtype and infos[0].shape == out.shape):
            read_tensor(infos[0], hasher, out=out)  # straight into place: no second copy
            continue
        split = 0 if len(infos) == 1 else _split_dim(source.shape, infos)
        offset = 0
        for info in infos:
            piece = read_tensor(info, hasher)
            index = [slice(None)] * len(source.shape)
            index[split] = slice(offset, offset + piece.shape[split])
            offset += piece.shape[split]
            if source.transpose:
                dest[tuple(reversed(index))] = piece.T
            else:
                dest[tuple(index)] = piece
            del piece
    return out


def quantize_int8(value: np.ndarray, scale_blocks: int, columns: int = 4096) -> QuantizedWeight8bit:
    """`grokscope.quant.quantize` of a [..., in, out] weight, done an expert and a block of
    output columns at a time, so the float32 temporaries stay small."""
    *lead, n_in, n_out = value.shape
    weight = aligned_empty(value.shape, np.int8)
    scales = aligned_empty((*lead, scale_blocks, n_out), ml_dtypes.bfloat16)
    for index in np.ndindex(*lead):
        for c in range(0, n_out, columns):
            q = quantize(value[index][:, c:c + columns], scale_blocks)
            weight[index][:, c:c + columns] = q.weight
            scales[index][:, c:c + columns] = q.scales
    return QuantizedWeight8bit(weight=weight, scales=scales)


def load_params(directory: str | os.PathLike, config, mesh=None, quantize: str | None = None,
                max_workers: int = 8, max_inflight_bytes: int | None = None, digests: dict | None = None) -> dict:
    """Loads a Grok-2 checkpoint into a haiku params dict, validated, placed on `mesh`.

    Parameters are assembled one at a time per worker (an expert weight from its 8 experts'
    rank slices), transposed into grokscope's [in, out] order, optionally quantized, placed
    and freed; host memory stays below the placed parameters + `max_inflight_bytes` (default
    twice the largest parameter).

    Args:
      quantize: None (keep bfloat16) or "int8": the matmul weights become
        `QuantizedWeight8bit` (per-column int8 with the layout's scale blocks, as Grok-1's
        release stores them), halving their memory.
      digests: if a dict, filled with `{param path: xxh3_128 hex digest}` of the raw bytes of
        the parameter's tensors, in the order they are read (ranks, then experts).

    Raises:
      Grok2CheckpointError: naming the file and tensor of the first problem.
    """
    from grokscope.checkpoint import _ByteBudget  # one byte budget for both formats
    from grokscope.sharding import param_sharding, place

    if quantize not in (None, "int8"):
        raise ValueError(f"quantize: expected None or 'int8', got {quantize!r}")
    layout = param_layout(config)
    pieces = scan(directory, config)
    sources = release_names(config)
    by_param: dict[str, list[str]] = {}
    for name, source in sources.items():
        by_param.setdefault(source.param, []).append(name)
    for names in by_param.values():
        names.sort(key=lambda n: (sources[n].expert or 0))
    sizes = {path: int(np.prod(spec.shape)) * spec.dtype.itemsize for path, spec in layout.items()}
    budget = _ByteBudget(max_inflight_bytes or 2 * max(sizes.values()))
    device = None if mesh is not None else jax.devices()[0]

    def load_one(path):
        spec = layout[path]
        hasher = xxhash.xxh3_128() if digests is not None else None
        with budget.reserve(2 * sizes[path]):
            try:
                value: Any = _assemble(by_param[path], sources, pieces, spec, hasher)
            except SafetensorsError as e:
                raise Grok2CheckpointError(str(e)) from None
            if quantize == "int8" and spec.quantizable:
                value = quantize_int8(value, spec.scale_blocks)
            placed = place(value, param_sharding(path, value, mesh)) if mesh is not None \
                else jax.device_put(value, device)
            jax.block_until_ready(placed)
            del value
        return path, placed, hasher.hexdigest() if hasher is not None else None

    params: dict[str, dict[str, Any]] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=max_workers) as pool:
        for path, value, digest in pool.map(load_one, layout):
            module, name = path.rsplit("/", 1)
            params.setdefault(module, {})[name] = value
            if digests is not None:
                digests[path] = digest
    return params


def save_release(params: dict, config, directory: str | os.PathLike, tp: int = TP) -> Path:
    """Writes `params` in the release's layout: 18 kinds of tensor, the experts' split over `tp`
    ranks, bfloat16, torch [out, in] order, Hugging Face names. Returns `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    flat = {f"{m}/{n}": np.asarray(jax.device_get(v)) for m, values in params.items() for n, v in values.items()}
    files: dict[str, dict[str, np.ndarray]] = {}
    for name, source in release_names(config).items():
        value = flat[source.param]
        value = value if source.expert is None else value[source.expert]
        value = np.ascontiguousarray((value.T if source.transpose else value).astype(ml_dtypes.bfloat16))
        match = re.search(r"experts\.\d+\.(w[123])\.weight$", name)
        if match:
            w = match.group(1)
            split = 1 if w == "w2" else 0
            for r, part in enumerate(np.split(value, tp, axis=split)):
                file = f"pytorch_model-{RELEASE_FILES[w]:05d}-TP-{r:03d}.safetensors"
                files.setdefault(file, {})[name] = np.ascontiguousarray(part)
        else:
            key = name if name in RELEASE_FILES else re.sub(r"^model\.layers\.\d+\.", "", name)
            files.setdefault(f"pytorch_model-{RELEASE_FILES[key]:05d}-TP-common.safetensors", {})[name] = value
    for file, tensors in sorted(files.items()):
        write_file(directory / file, tensors, {"format": "pt"})
    return directory
