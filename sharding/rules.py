"""Logical-axis -> mesh-axis rules: the one place that decides how each parameter axis is laid out on a mesh."""

from __future__ import annotations

from collections.abc import Sequence

from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Logical axis name (a parameter's `axes` metadata) -> mesh axis name. Axes not listed, or whose mesh axis
# is absent from the mesh at hand, are replicated.
LOGICAL_AXIS_RULES: dict[str, str] = {
    "experts": "expert",
}


def partition_spec(axes: Sequence[str | None], mesh: Mesh) -> PartitionSpec:
    """The PartitionSpec of a parameter with these logical axes on this mesh (each mesh axis used at most once)."""
    used: set[str] = set()
    spec: list[str | None] = []
    for axis in axes:
        mesh_axis = LOGICAL_AXIS_RULES.get(axis) if axis is not None else None
        if mesh_axis is None or mesh_axis not in mesh.axis_names or mesh_axis in used:
            spec.append(None)
        else:
            spec.append(mesh_axis)
            used.add(mesh_axis)
    return PartitionSpec(*spec)


def named_sharding(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> NamedSharding:
    """NamedSharding for a parameter; fails naming the axis when a dimension does not divide over its mesh axis."""
    spec = partition_spec(axes, mesh)
    for axis, dim, mesh_axis in zip(axes, shape, spec):
        if mesh_axis is not None and dim % mesh.shape[mesh_axis]:
            raise ValueError(
                f"logical axis {axis!r} of size {dim} does not divide over mesh axis {mesh_axis!r} "
                f"of size {mesh.shape[mesh_axis]}"
            )
    return NamedSharding(mesh, spec)
