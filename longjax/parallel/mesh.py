"""Device meshes over the axes `data`, `fsdp`, `tensor`, `sequence`, and logical-axis rules.

Modules annotate parameters and activations with logical names (`batch`, `length`,
`embed`, `heads`, ...); `LOGICAL_RULES` maps them onto mesh axes, so one model runs on
1 CPU, 8 simulated devices, a GPU or a TPU slice by changing only the mesh sizes.
Multi-host: every process joins the run first (`longjax.distributed.join`), then builds
the same mesh over all processes' devices (`jax.devices()` is global after joining).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "sequence")

LOGICAL_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", "sequence"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("norm", None),
    ("layers", None),  # the stacked layers of a layer scan (config.model.scan_layers)
)


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Resolves the sizes of `MESH_AXES` (one may be -1: it takes the remaining devices)."""
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"config.parallel has unknown mesh axes {sorted(unknown)}; "
                         f"allowed: {list(MESH_AXES)}")
    shape = {axis: int(sizes.get(axis, 1)) for axis in MESH_AXES}
    fill = [axis for axis, size in shape.items() if size == -1]
    bad = [axis for axis, size in shape.items() if size == 0 or size < -1]
    if bad or len(fill) > 1:
        raise ValueError(f"config.parallel mesh sizes must be positive, with at most one -1; "
                         f"got {shape}")
    known = int(np.prod([size for size in shape.values() if size != -1]))
    if fill:
        if num_devices % known:
            raise ValueError(f"config.parallel: {num_devices} devices do not divide by the "
                             f"fixed axes {shape} (product {known})")
        shape[fill[0]] = num_devices // known
    if int(np.prod(list(shape.values()))) != num_devices:
        raise ValueError(f"config.parallel mesh {shape} needs {int(np.prod(list(shape.values())))} "
                         f"devices; {num_devices} are available")
    return shape


def make_mesh(sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over `devices` (default: all) with the axes `MESH_AXES` in that order."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(sizes, len(devices))
    return jax.make_mesh(
        tuple(shape.values()), MESH_AXES, devices=devices,
        axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
    )


BATCH_AXES = ("data", "fsdp")


def sequence_mesh(axis_name: str = "sequence"):
    """The current mesh (`jax.set_mesh`) when its `axis_name` axis splits the sequence
    (size > 1), else None: where the mixers switch to their sequence-parallel forms."""
    mesh = jax.sharding.get_abstract_mesh()
    return mesh if mesh.shape.get(axis_name, 1) > 1 else None


def batch_axes(mesh, batch_size: int, *, axes=BATCH_AXES, exclude=()) -> tuple[str, ...]:
    """The axes of `axes` in `mesh` (minus `exclude`) that split a batch of `batch_size`
    rows inside a `shard_map`; `ValueError` when their product does not divide it."""
    found = tuple(a for a in axes if a in mesh.axis_names and a not in exclude)
    if batch_size % int(np.prod([mesh.shape[a] for a in found])):
        raise ValueError(f"batch size {batch_size} must be divisible by the mesh axes "
                         f"{found} (sizes {[mesh.shape[a] for a in found]})")
    return found


def auto_axes(mesh: Mesh) -> Mesh:
    """`mesh` with every axis of type Auto: same devices in the same order.

    The model's flax.linen logical-axis constraints are sharding hints for auto axes, so
    the train state, batches and steps live on this twin of a `jax.make_mesh` mesh (whose
    axes are explicit by default). `jax.device_put` re-types arrays already sharded over
    the explicit mesh onto it without moving data.
    """
    return mesh.update(axis_types=(jax.sharding.AxisType.Auto,) * len(mesh.axis_names))


def logical_to_sharding(logical_specs, mesh: Mesh, rules=LOGICAL_RULES):
    """Maps a pytree of logical `PartitionSpec`s onto `NamedSharding`s of `mesh` (auto axes)."""
    return nn.logical_to_mesh_sharding(logical_specs, auto_axes(mesh), list(rules))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of `[batch, seq, ...]` inputs: batch over data x fsdp, seq over sequence."""
    return NamedSharding(auto_axes(mesh), PartitionSpec(("data", "fsdp"), "sequence"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(auto_axes(mesh), PartitionSpec())
