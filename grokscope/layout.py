"""The parameter layout of an architecture: the one place that knows parameter paths.

For every parameter of a `ModelConfig`, `param_layout(config)` gives its path (the haiku
module path and name, as the release's params tree has them), its shape, the dtype it is
stored in, whether the release stores it as int8 (`QuantizedWeight8bit`) and with how many
scale blocks, and its logical partition spec over the mesh axes ("data", "model"). The
forward pass, the checkpoint readers and writers, and the sharding rules all read it.

Order: module paths sorted as strings, then parameter names: the release's flatten order,
in which `tensor{i:05d}` files are numbered (so `decoder_layer_10` precedes `decoder_layer_2`).

Grok-1's paths, shapes ([in, out], as haiku stores them), int8 blocks and specs:

  language_model/in_out_embed/embeddings            [V, D]        float   (model, data)
  language_model/rms_norm/scale                     [D]           float   replicated
  transformer/decoder_layer_{i}/
    multi_head_attention/{query,key,value}/w        [D, heads*K]  int8 x1 (data, model)
    multi_head_attention/linear/w                   [H*K, D]      int8 x8 (model, data)
    rms_norm{,_1,_2,_3}/scale                       [D]           float   replicated
    router/w                                        [D, E]        float   replicated
    moe/{linear,linear_v}/w                         [E, D, F]     int8 x1 (None, data, model)
    moe/linear_1/w                                  [E, F, D]     int8 x8 (None, model, data)

Grok-2 (`config.dense_ffn_size`, `tied_embeddings=False`, `weight_format="bfloat16"`) adds a
dense MLP beside the experts and an untied head, and stores every tensor in bfloat16 (the
rules still say which weights `load_params(..., quantize="int8")` may quantize, and how):

  language_model/unembed/embeddings                 [V, D]        bf16    (model, data)
  transformer/decoder_layer_{i}/
    mlp/{linear,linear_v}/w                         [D, Fd]       bf16 (int8 x1) (data, model)
    mlp/linear_1/w                                  [Fd, D]       bf16 (int8 x8) (model, data)
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import NamedTuple

import ml_dtypes
import numpy as np

__all__ = ["ParamShape", "ParamSpec", "param_layout", "param_shapes", "is_quantizable", "release_scale_blocks",
           "partition_spec", "fit_spec", "device_bytes"]


class ParamShape(NamedTuple):
    """Stored shape and dtype of one checkpoint tensor (int8 for quantized weights)."""

    shape: tuple[int, ...]
    dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One parameter of the layout.

    Attributes:
      path: "module/path/name".
      shape: the logical shape (of `weight` when quantized).
      dtype: the dtype the release stores it in (int8 where quantized; else float32 for
        Grok-1, bfloat16 for Grok-2).
      quantized: stored as a `QuantizedWeight8bit` (int8 weight + scales) in the release.
      quantizable: a matmul weight the int8 path may quantize (all of Grok-1's quantized
        weights; Grok-2's same weights and its dense MLP).
      scale_blocks: the release's `n_blocks` of its scales (1 where not quantized).
      partition: the logical partition spec, one entry per dim: None, a mesh axis name, or a
        tuple of them (fitted to a concrete mesh by `grokscope.sharding`).
    """

    path: str
    shape: tuple[int, ...]
    dtype: np.dtype
    quantized: bool
    scale_blocks: int
    partition: tuple
    quantizable: bool = False


class _Rule(NamedTuple):
    pattern: re.Pattern
    quantized: bool
    input_sharded: bool  # the input dim is split over `model`: the release uses 8 scale blocks
    partition: tuple


_RULES = (
    _Rule(re.compile(r"multi_head_attention/(query|key|value)/w$"), True, False, ("data", "model")),
    _Rule(re.compile(r"multi_head_attention/linear/w$"), True, True, ("model", "data")),
    _Rule(re.compile(r"moe/(linear|linear_v)/w$"), True, False, (None, "data", "model")),
    _Rule(re.compile(r"moe/linear_1/w$"), True, True, (None, "model", "data")),
    _Rule(re.compile(r"mlp/(linear|linear_v)/w$"), True, False, ("data", "model")),
    _Rule(re.compile(r"mlp/linear_1/w$"), True, True, ("model", "data")),
    _Rule(re.compile(r"(in_out_embed|unembed)/embeddings$"), False, False, ("model", "data")),
)


def _rule(path: str) -> _Rule | None:
    return next((rule for rule in _RULES if rule.pattern.search(path)), None)


def is_quantizable(path: str) -> bool:
    """Whether the parameter at `path` is a matmul weight with an int8 form (`QuantizedWeight8bit`):
    Grok-1's release stores these as int8; Grok-2's stores them in bfloat16."""
    rule = _rule(path)
    return rule is not None and rule.quantized


def release_scale_blocks(path: str, shape: tuple[int, ...]) -> int:
    """Scale blocks the release uses: 8 where the input dim is model-sharded, else 1."""
    rule = _rule(path)
    if rule is not None and rule.input_sharded and shape[-2] % 8 == 0:
        return 8
    return 1


def partition_spec(path: str, shape) -> tuple:
    """The release's logical spec for the parameter at `path` (before fitting to a mesh)."""
    rule = _rule(path)
    return rule.partition if rule is not None else (None,) * len(shape)


def _shapes(config) -> dict[str, tuple[int, ...]]:
    D, V, E, F = config.emb_size, config.vocab_size, config.num_experts, config.ffn_size
    H, G, K = config.num_q_heads, config.num_kv_heads, config.key_size
    shapes = {"language_model/in_out_embed/embeddings": (V, D), "language_model/rms_norm/scale": (D,)}
    if not config.tied_embeddings:
        shapes["language_model/unembed/embeddings"] = (V, D)
    for i in range(config.num_layers):
        layer = f"transformer/decoder_layer_{i}"
        shapes.update({
            f"{layer}/multi_head_attention/query/w": (D, H * K),
            f"{layer}/multi_head_attention/key/w": (D, G * K),
            f"{layer}/multi_head_attention/value/w": (D, G * K),
            f"{layer}/multi_head_attention/linear/w": (H * K, D),
            f"{layer}/router/w": (D, E),
            f"{layer}/moe/linear/w": (E, D, F),
            f"{layer}/moe/linear_v/w": (E, D, F),
            f"{layer}/moe/linear_1/w": (E, F, D),
        })
        if config.dense_ffn_size is not None:
            Fd = config.dense_ffn_size
            shapes.update({f"{layer}/mlp/linear/w": (D, Fd), f"{layer}/mlp/linear_v/w": (D, Fd),
                           f"{layer}/mlp/linear_1/w": (Fd, D)})
        for norm in ("rms_norm", "rms_norm_1", "rms_norm_2", "rms_norm_3"):
            shapes[f"{layer}/{norm}/scale"] = (D,)
    return shapes


@functools.lru_cache(maxsize=16)
def param_layout(config) -> dict[str, ParamSpec]:
    """`{path: ParamSpec}` of every parameter of `config`, in checkpoint order."""
    shapes = _shapes(config)
    order = sorted(shapes, key=lambda path: tuple(path.rsplit("/", 1)))
    layout = {}
    int8 = config.weight_format == "int8"
    float_dtype = np.dtype(np.float32) if int8 else np.dtype(ml_dtypes.bfloat16)
    for path in order:
        shape = shapes[path]
        quantizable = is_quantizable(path)
        quantized = quantizable and int8
        layout[path] = ParamSpec(path, shape, np.dtype(np.int8) if quantized else float_dtype, quantized,
                                 release_scale_blocks(path, shape) if quantizable else 1,
                                 partition_spec(path, shape), quantizable)
    return layout


def param_shapes(config) -> dict[str, ParamShape]:
    """`{"module/path/name": ParamShape}` in checkpoint order, computed without memory."""
    return {path: ParamShape(spec.shape, spec.dtype) for path, spec in param_layout(config).items()}


def fit_spec(spec: tuple, shape, axis_sizes) -> tuple:
    """`spec` fitted to a mesh with `axis_sizes` ({axis name: size}): mesh axes that do not
    divide their dimension are dropped (one entry per dim: None, a name or a tuple of names)."""
    fitted = []
    for entry, size in zip(spec, shape):
        axes = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
        kept, product = [], 1
        for axis in axes:
            n = axis_sizes[axis]
            if size % (product * n) == 0:
                kept.append(axis)
                product *= n
        fitted.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return tuple(fitted)


def split_count(fitted: tuple, axis_sizes) -> int:
    """How many ways a fitted spec splits the tensor."""
    n = 1
    for entry in fitted:
        for axis in (() if entry is None else entry if isinstance(entry, tuple) else (entry,)):
            n *= axis_sizes[axis]
    return n


def device_bytes(config, data: int = 1, model: int = 8, quantize: str | None = None) -> int:
    """Bytes of parameters one device holds on a (data, model) mesh, from the layout alone.

    `quantize`: None keeps the release's storage (int8 for Grok-1, bfloat16 for Grok-2);
    "int8" stores every quantizable weight as int8 plus bfloat16 scales.
    """
    sizes = {"data": data, "model": model}
    total = 0
    for spec in param_layout(config).values():
        elements = int(np.prod(spec.shape))
        if spec.quantized or (quantize == "int8" and spec.quantizable):
            weight = elements  # int8
            scales_shape = spec.shape[:-2] + (spec.scale_blocks, spec.shape[-1])
            scales = int(np.prod(scales_shape)) * 2
            total += weight // split_count(fit_spec(spec.partition, spec.shape, sizes), sizes)
            total += scales // split_count(fit_spec(spec.partition, scales_shape, sizes), sizes)
        else:
            total += elements * spec.dtype.itemsize // split_count(fit_spec(spec.partition, spec.shape, sizes), sizes)
    return total
