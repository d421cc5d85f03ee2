"""Device mesh, logical axis rules and sharded placement of train states and batches.

Mesh axes are ('data', 'fsdp'), both Auto (jax.make_mesh defaults to Explicit axes, which linen's logical
partitioning does not support). Parameters carry logical axis names (`nn.with_logical_partitioning`); the config's
rules map them to mesh axes, e.g. ('conv_out', 'fsdp') shards conv kernels' output channels over the fsdp axis.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

logger = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp")
# Batch dimension: split over every device (data parallel x fully sharded data parallel).
BATCH_AXES = ("data", "fsdp")

# Default logical axis rules. Activation names ('batch') and parameter names used by editing_jax.nn.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("embed", "fsdp"),
    ("mlp", None),
    ("heads", None),
    ("kv", None),
    ("vocab", None),
    ("codebook", None),
)


def mesh_shape(axis_sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolves sizes for MESH_AXES; one size may be -1 (fills the remaining devices)."""
    sizes = [int(axis_sizes.get(axis, 1)) for axis in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes, strict=True))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"cannot fill mesh {sizes} with {num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs {math.prod(sizes)} devices, have {num_devices}"
        )
    return tuple(sizes)


def make_mesh(axis_sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over `devices` (default: all). Fixed sizes (no -1) whose product is smaller use the first devices."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [int(axis_sizes.get(axis, 1)) for axis in MESH_AXES]
    if -1 not in sizes and math.prod(sizes) < len(devices):
        logger.warning("mesh %s uses %d of %d devices", dict(axis_sizes), math.prod(sizes), len(devices))
        devices = devices[: math.prod(sizes)]
    shape = mesh_shape(axis_sizes, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def rules_from_config(rules: Sequence[Sequence] | None) -> tuple:
    """Normalizes config rules (lists from JSON) into tuples; None means DEFAULT_RULES."""
    if rules is None:
        return DEFAULT_RULES
    normalized = []
    for name, axes in rules:
        axes = tuple(axes) if isinstance(axes, list | tuple) else axes
        normalized.append((name, axes))
    return tuple(normalized)


def unbox(tree):
    """Strips `nn.Partitioned` boxes without adding sharding constraints (the trainer shards via out_shardings)."""
    return jax.tree.map(
        lambda x: x.value if isinstance(x, nn.Partitioned) else x, tree, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )


def _divisible_spec(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Drops mesh axes from dimensions they do not divide (such a dimension is replicated instead)."""
    entries = list(spec) + [None] * (len(shape) - len(spec))
    fixed = []
    for dim, axes in zip(shape, entries, strict=True):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = math.prod(mesh.shape[n] for n in names)
        fixed.append(axes if dim % size == 0 else None)
    return PartitionSpec(*fixed)


def tree_shardings(abstract_boxed_tree, mesh: Mesh, rules) -> object:
    """NamedShardings for a tree whose leaves may be `nn.LogicallyPartitioned` boxes.

    Unannotated leaves are replicated; an annotated dimension that the mesh axes do not divide is replicated too
    (e.g. a [64, 1] output kernel on fsdp=2), so small heads never block sharding of the rest.
    """
    specs = nn.get_partition_spec(abstract_boxed_tree)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
    abstract = unbox(abstract_boxed_tree)
    return jax.tree.map(lambda sh, x: NamedSharding(mesh, _divisible_spec(sh.spec, x.shape, mesh)), shardings, abstract)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def device_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Places this host's numeric batch arrays as global arrays sharded over the batch axes.

    String fields (object arrays) stay on the host and are dropped; multi-host: each process passes its own shard.
    """
    sharding = batch_sharding(mesh)
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        if value.dtype == object or value.dtype.kind in "US":
            continue
        out[key] = jax.make_array_from_process_local_data(sharding, value)
    return out
