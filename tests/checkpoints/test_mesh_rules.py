"""The logical-axis rules and the mesh argument of k2jax.load."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

from k2jax.loading import make_mesh
from sharding.rules import named_sharding, partition_spec


def test_experts_go_on_the_expert_axis_everything_else_replicates():
    mesh = make_mesh("expert=1")
    assert partition_spec(("layers", "experts", "expert_in", "expert_out"), mesh) == PartitionSpec(
        None, "expert", None, None)
    assert partition_spec(("vocab", "embed"), mesh) == PartitionSpec(None, None)
    no_expert_axis = Mesh(np.array(mesh.devices).reshape(1), ("data",))
    assert partition_spec(("layers", "experts"), no_expert_axis) == PartitionSpec(None, None)


def test_indivisible_expert_axis_is_named():
    two_way = SimpleNamespace(axis_names=("expert",), shape={"expert": 2})  # this process has one device
    with pytest.raises(ValueError, match="'experts' of size 3 does not divide over mesh axis 'expert' of size 2"):
        named_sharding(("experts",), (3,), two_way)


@pytest.mark.parametrize("spec,message", [("expert", "NAME=SIZE"), ("expert=4", "needs 4 devices")])
def test_bad_mesh_spec(spec, message):
    with pytest.raises(ValueError, match=message):
        make_mesh(spec)
