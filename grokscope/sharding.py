"""Device mesh and the release's placement of every parameter on it.

The mesh has axes ("data", "model"). The partition rules (`grokscope.layout`) are the release's: attention
q/k/v and MoE `linear`/`linear_v` split their input dim on `data` and output dim on
`model`; the attention output projection and MoE `linear_1` the other way round; norms and
routers are replicated. The embedding table (and Grok-2's output head) splits its vocabulary
over `model` and its width over `data`, where the release splits its width over both: then
each device computes the logits of its own vocabulary rows, and the [B, T, V] logits are
never summed across devices nor held whole on each.

Unlike the release, any mesh shape works: an axis that does not divide a dimension is
dropped from that dimension's spec (the dimension is replicated over it), and the int8
`scales[..., n_blocks, out]` follow the weight's spec wherever their own shape allows,
whatever `n_blocks` is.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from grokscope.layout import fit_spec, partition_spec
from grokscope.quant import QuantizedWeight8bit

__all__ = ["make_mesh", "partition_spec", "param_sharding", "shard_params", "batch_sharding",
           "constrain", "model_shards"]

AXES = ("data", "model")

def make_mesh(data: int = 1, model: int | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "model") mesh over the first data*model devices.

    Args:
      data: size of the data (batch) axis.
      model: size of the model (tensor-parallel) axis; default all remaining devices.
      devices: devices to use; default `jax.devices()`.
    """
    devices = list(jax.devices() if devices is None else devices)
    if model is None:
        model = len(devices) // data
    if data < 1 or model < 1 or data * model > len(devices):
        raise ValueError(f"make_mesh: data={data} x model={model} needs {data * model} devices, "
                         f"{len(devices)} available")
    grid = np.array(devices[: data * model], dtype=object).reshape(data, model)
    return Mesh(grid, AXES)


def _fit(spec: tuple, shape: Sequence[int], mesh) -> P:
    """Drops mesh axes that do not divide their dimension (`grokscope.layout.fit_spec`)."""
    return P(*fit_spec(spec, shape, mesh.shape))


def param_sharding(path: str, value: Any, mesh: Mesh):
    """A NamedSharding (or a QuantizedWeight8bit of them) for one parameter."""
    spec = partition_spec(path, value.shape)
    if isinstance(value, QuantizedWeight8bit):
        weight = NamedSharding(mesh, _fit(spec, value.weight.shape, mesh))
        scales = NamedSharding(mesh, _fit(spec, value.scales.shape, mesh))
        return QuantizedWeight8bit(weight=weight, scales=scales)
    return NamedSharding(mesh, _fit(spec, value.shape, mesh))


def shard_params(params: dict, mesh: Mesh) -> dict:
    """Places a haiku params dict on `mesh` (a no-op for leaves already placed so)."""
    return {module: {name: place(v, param_sharding(f"{module}/{name}", v, mesh))
                     for name, v in values.items()}
            for module, values in params.items()}


def place(value, sharding):
    """`jax.device_put(value, sharding)` for host values (arrays or pytrees, with a matching
    pytree of shardings). In a multi-process job each process builds only the shards of its
    own devices from its copy of the value, with no communication (so processes may place
    tensors in any order)."""
    if jax.process_count() == 1:
        return jax.device_put(value, sharding)

    def one(leaf, leaf_sharding):
        leaf = np.asarray(leaf)
        return jax.make_array_from_callback(leaf.shape, leaf_sharding, lambda index: leaf[index])

    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(lambda leaf: one(leaf, sharding), value)
    return jax.tree.map(one, value, sharding)


def batch_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
    """Splits the leading (batch) dim over `data` when it divides, else replicates."""
    return NamedSharding(mesh, _fit(("data",) + (None,) * (len(shape) - 1), shape, mesh))


def model_shards() -> int:
    """Devices along the `model` axis of the mesh being traced for (1 without a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty or "model" not in mesh.axis_names else int(mesh.shape["model"])


def constrain(x: jax.Array, *spec) -> jax.Array:
    """Asks for `x` to be laid out as `spec` on the mesh in context; a no-op without one.

    Used inside the model (which never holds a mesh itself): the forward sets the mesh
    with `jax.set_mesh` when it runs sharded. Axes that do not divide are dropped.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, _fit(spec, x.shape, mesh))
