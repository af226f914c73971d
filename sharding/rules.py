"""Logical-axis -> mesh-axis rules: the one place that decides how parameters, activations and the cache are laid out.

Parameters carry logical axis names in their `axes` metadata; the model names its activation and cache axes
the same way. A logical axis maps to mesh axes in order; those absent from the mesh at hand are skipped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Routed experts split over 'expert' (expert parallelism) and their intermediate columns over 'tensor';
# attention heads, MLP columns and the vocabulary over 'tensor'; batch rows (activations, the latent
# cache) over 'data' and then 'expert', so attention is data-parallel across the expert groups; cache
# positions over the axes the rows did not take (context parallel: 'tensor', and 'data'/'expert' when
# there are too few rows), so the cache's capacity grows with every device. Everything else is replicated.
LOGICAL_AXIS_RULES: dict[str, tuple[str, ...]] = {
    "experts": ("expert",),
    "expert_mlp": ("tensor",),
    "heads": ("tensor",),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
    "batch": ("data", "expert"),
    "cache_seq": ("data", "expert", "tensor"),
}


def _entry(mesh_axes: Sequence[str]) -> str | tuple[str, ...] | None:
    """A PartitionSpec entry: None, one mesh axis, or a tuple of them."""
    return None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else tuple(mesh_axes)


def partition_spec(axes: Sequence[str | None], mesh: Mesh, shape: Sequence[int] | None = None) -> PartitionSpec:
    """The PartitionSpec for these logical axes on this mesh (each mesh axis used at most once).

    With `shape`, a mesh axis that would not divide its dimension evenly is skipped (activations, cache);
    without it the split is strict (parameters: see named_sharding).
    """
    used: set[str] = set()
    spec = []
    for i, axis in enumerate(axes):
        mesh_axes: list[str] = []
        for mesh_axis in LOGICAL_AXIS_RULES.get(axis, ()) if axis is not None else ():
            if mesh_axis not in mesh.axis_names or mesh_axis in used:
                continue
            if shape is not None and shape[i] % (math.prod(mesh.shape[a] for a in mesh_axes) * mesh.shape[mesh_axis]):
                continue
            mesh_axes.append(mesh_axis)
            used.add(mesh_axis)
        spec.append(_entry(mesh_axes))
    return PartitionSpec(*spec)


def paged_axes(mesh: Mesh, n_rows: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(row axes, position axes) of the paged cache for n_rows sequences: rows over the 'batch' axes that divide
    them, each row's pages over the 'cache_seq' axes left (mesh axes of size 1 are left out)."""
    spec = partition_spec(("batch", "cache_seq"), mesh, (n_rows, math.prod(mesh.shape.values())))
    rows, seq = (tuple(a for a in spec_axes(entry) if mesh.shape[a] > 1) for entry in spec)
    return rows, seq


def spec_axes(entry: str | tuple[str, ...] | None) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def named_sharding(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> NamedSharding:
    """NamedSharding for a parameter; fails naming the axis when a dimension does not divide over its mesh axes."""
    spec = partition_spec(axes, mesh)
    for axis, dim, entry in zip(axes, shape, spec):
        ways = math.prod(mesh.shape[a] for a in spec_axes(entry))
        if dim % ways:
            raise ValueError(f"logical axis {axis!r} of size {dim} does not divide over mesh axis "
                             f"{entry!r} of size {ways}")
    return NamedSharding(mesh, spec)


def shard_bytes(shape: Sequence[int], itemsize: int, sharding: NamedSharding) -> int:
    """Bytes one device holds of an array of this shape under this sharding."""
    return math.prod(sharding.shard_shape(tuple(shape))) * itemsize
