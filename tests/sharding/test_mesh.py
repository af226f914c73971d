"""Mesh specs, the automatic layout, and the logical-axis table on multi-axis meshes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from jax.sharding import PartitionSpec as P

from sharding.mesh import auto_spec, broadcast_from_process0, initialize, make_mesh, parse_spec, spec_devices
from sharding.rules import partition_spec

MESH = SimpleNamespace(axis_names=("data", "expert", "tensor"), shape={"data": 2, "expert": 4, "tensor": 2})


def test_parse_and_auto_specs():
    assert parse_spec("data=2, expert=4") == {"data": 2, "expert": 4}
    assert auto_spec(64, 384) == "expert=64"
    assert auto_spec(256, 384) == "expert=128,tensor=2"
    assert auto_spec(8) == "expert=8"
    with pytest.raises(ValueError, match="unknown axis"):
        parse_spec("model=2")
    with pytest.raises(ValueError, match="axis 'expert' is given more than once"):
        parse_spec("expert=1, data=1,expert=1")
    for spec in ("expert=0", "data=-2,expert=1"):
        with pytest.raises(ValueError, match="sizes must be >= 1"):
            parse_spec(spec)
    for spec in ("", "expert", "expert=x", "expert=1=2"):
        with pytest.raises(ValueError, match="expected NAME=SIZE"):
            parse_spec(spec)


def test_spec_orders_axes_and_counts_devices():
    mesh = make_mesh("expert=1")
    assert mesh.axis_names == ("expert",)
    assert make_mesh(None).shape == {"expert": 1}
    with pytest.raises(ValueError, match="needs 2 devices"):
        make_mesh("data=2")


def test_a_smaller_spec_takes_the_first_devices_of_one_process_only():
    devices = list(range(8))
    assert spec_devices("expert=2,tensor=2", devices, n_processes=1) == [0, 1, 2, 3]
    assert spec_devices("expert=8", devices, n_processes=1) == devices
    assert spec_devices("expert=2", devices, n_processes=2) == devices  # mesh_from_devices then names the mismatch
    assert spec_devices("expert=16", devices, n_processes=1) == devices


def test_rules_on_a_three_axis_mesh():
    assert partition_spec(("layers", "experts", "embed", "expert_mlp"), MESH) == P(None, "expert", None, "tensor")
    assert partition_spec(("q_lora", "heads", "head_dim"), MESH) == P(None, "tensor", None)
    assert partition_spec(("vocab", "embed"), MESH) == P("tensor", None)
    cache = ("layers", "batch", "cache_seq", "cache_lanes")
    assert partition_spec(cache, MESH, (60, 16, 64, 640)) == P(None, ("data", "expert"), "tensor", None)
    # too few rows for every axis: the positions take the axes the rows did not
    assert partition_spec(cache, MESH, (60, 2, 64, 640)) == P(None, "data", ("expert", "tensor"), None)
    assert partition_spec(cache, MESH, (60, 1, 64, 640)) == P(None, None, ("data", "expert", "tensor"), None)
    assert partition_spec(cache, MESH, (60, 1, 63, 640)) == P(None, None, None, None)


def test_single_process_start_up_is_a_no_op(monkeypatch):
    monkeypatch.delenv("K2JAX_COORDINATOR", raising=False)
    assert initialize() is False
    assert broadcast_from_process0({"a": 1}) == {"a": 1}
