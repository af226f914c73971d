"""Device meshes from specs ("expert=8", "data=2,expert=4", "auto"), multi-host start-up, host-data broadcast."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh

# Mesh axes, outermost first: data (replicas over the batch), expert (routed experts; attention batch),
# tensor (attention heads, MLP columns, expert columns, vocabulary).
AXIS_ORDER = ("data", "expert", "tensor")
ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID = "K2JAX_COORDINATOR", "K2JAX_NUM_PROCESSES", "K2JAX_PROCESS_ID"


def parse_spec(spec: str) -> dict[str, int]:
    """"data=2,expert=4" -> {"data": 2, "expert": 4}; names must be known mesh axes, each given once, sizes >= 1."""
    try:
        pairs = [(name.strip(), int(size)) for name, size in (part.split("=") for part in spec.split(","))]
    except ValueError:
        raise ValueError(f"mesh spec {spec!r}: expected NAME=SIZE[,NAME=SIZE...], e.g. 'expert=8'") from None
    axes = dict(pairs)
    unknown = set(axes) - set(AXIS_ORDER)
    if unknown:
        raise ValueError(f"mesh spec {spec!r}: unknown axis {sorted(unknown)}; axes are {AXIS_ORDER}")
    if len(axes) != len(pairs):
        repeated = next(name for i, (name, _) in enumerate(pairs) if name in dict(pairs[:i]))
        raise ValueError(f"mesh spec {spec!r}: axis {repeated!r} is given more than once")
    small = [name for name, size in pairs if size < 1]
    if small:
        raise ValueError(f"mesh spec {spec!r}: axis {small[0]!r} has size {axes[small[0]]}; sizes must be >= 1")
    return axes


def auto_spec(n_devices: int, n_experts: int | None = None) -> str:
    """Experts over as many devices as divide them, the rest over tensor; all on 'expert' when n_experts is None."""
    expert = n_devices if n_experts is None else math.gcd(n_devices, n_experts)
    tensor = n_devices // expert
    return f"expert={expert}" + (f",tensor={tensor}" if tensor > 1 else "")


def mesh_from_devices(devices: Sequence[Any], spec: str) -> Mesh:
    """A mesh of these devices shaped by `spec`, axes in AXIS_ORDER, every axis Auto (the compiler propagates)."""
    axes = parse_spec(spec)
    size = math.prod(axes.values())
    if size != len(devices):
        raise ValueError(f"mesh spec {spec!r} needs {size} devices, {len(devices)} are available")
    names = tuple(a for a in AXIS_ORDER if a in axes)
    shape = tuple(axes[a] for a in names)
    return Mesh(np.asarray(devices).reshape(shape), names, axis_types=(AxisType.Auto,) * len(names))


def spec_devices(spec: str, devices: Sequence[Any], n_processes: int) -> Sequence[Any]:
    """The devices a spec runs on: the first ones it counts in a one-process job (as vLLM's
    tensor_parallel_size takes the first GPUs); every device of a multi-process job, which must all take part."""
    size = math.prod(parse_spec(spec).values())
    return devices[:size] if n_processes == 1 and size < len(devices) else devices


def make_mesh(mesh: Mesh | str | None, n_experts: int | None = None) -> Mesh:
    """A Mesh from a Mesh, a spec, "auto", or None (= "auto") over all devices of every process."""
    if isinstance(mesh, Mesh):
        return mesh
    devices = jax.devices()
    spec = auto_spec(len(devices), n_experts) if mesh in (None, "auto") else mesh
    return mesh_from_devices(spec_devices(spec, devices, jax.process_count()), spec)


def mesh_of(tree: Any) -> Mesh | None:
    """The mesh the arrays of `tree` are placed on (the first NamedSharding found), or None."""
    for leaf in jax.tree.leaves(tree):
        mesh = getattr(getattr(leaf, "sharding", None), "mesh", None)
        if isinstance(mesh, Mesh):
            return mesh
    return None


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               timeout_s: int = 300) -> bool:
    """Join a jax.distributed job: coordinator "HOST:PORT" (or "auto": TPU pod / SLURM detection), from the
    arguments or K2JAX_COORDINATOR / K2JAX_NUM_PROCESSES / K2JAX_PROCESS_ID; False when there is none."""
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR)
    if not coordinator:
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices only; before the backend starts
    if coordinator == "auto":
        jax.distributed.initialize(initialization_timeout=timeout_s)
        return True
    num = num_processes if num_processes is not None else int(os.environ[ENV_NUM_PROCESSES])
    pid = process_id if process_id is not None else int(os.environ[ENV_PROCESS_ID])
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num, process_id=pid,
                               initialization_timeout=timeout_s)
    return True


def broadcast_from_process0(tree: Any) -> Any:
    """Process 0's value of a pytree of host arrays, on every process (identity for a single process)."""
    if jax.process_count() == 1:
        return tree
    return multihost_utils.broadcast_one_to_all(tree)
