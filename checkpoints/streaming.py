"""Stream a Hugging Face checkpoint onto a mesh: every parameter built directly in its target sharding.

Each array is assembled with `jax.make_array_from_callback`; the callback reads only the HF tensors of the
block a device holds. make_array_from_callback keeps this host's blocks of one array alive until it puts
them on the devices, so a stacked parameter larger than `chunk_bytes` is built a few layers at a time and
written into a preallocated (donated) array. Host memory beyond the loaded arrays stays near two chunks (the
blocks and their copy on the devices) plus a few reader groups (hf_reader.GROUP_BYTES), never the model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from tqdm.auto import tqdm

from checkpoints.hf_reader import Index, ParamPlan, open_checkpoint, plan, read_block
from checkpoints.model_config import ModelConfig
from checkpoints.safetensors_io import TensorInfo
from sharding.rules import named_sharding


DEFAULT_CHUNK_BYTES = 1 << 30


def load_hf_state(path: Path, cfg: ModelConfig, abstract: nnx.State, mesh: Mesh,
                  chunk_bytes: int = DEFAULT_CHUNK_BYTES, progress: bool | None = None) -> nnx.State:
    """Fill `abstract` (shapes + `axes` metadata) from the HF checkpoint at `path`, sharded over `mesh`."""
    flat = nnx.to_flat_state(abstract)
    params = {_key(k): (v.get_value().shape, v.get_metadata()["axes"]) for k, v in flat}
    tensors = open_checkpoint(path)
    plans = plan(path, tensors, cfg, params)
    shardings = {p.key: named_sharding(p.axes, p.shape, mesh) for p in plans}
    total = sum(host_read_bytes(p, shardings[p.key]) for p in plans)
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"loading {path.name}",
              disable=None if progress is None else not progress) as bar:
        arrays = {p.key: build_param(tensors, p, shardings[p.key], chunk_bytes, bar.update) for p in plans}
    for key, var in flat:
        var.set_value(arrays[_key(key)])
    return nnx.from_flat_state(flat)


def _key(key: tuple[Any, ...]) -> tuple[str, ...]:
    """An nnx flat-state key as a tuple of strings."""
    return tuple(str(k) for k in key)


def _index_key(index: Index) -> tuple[tuple[int | None, ...], ...]:
    """A hashable form of a block index."""
    return tuple((s.start, s.stop, s.step) for s in index)


def host_read_bytes(p: ParamPlan, sharding: NamedSharding) -> int:
    """Bytes this host reads for one parameter: the HF tensors behind its distinct addressable blocks."""
    n = len(p.source.stack_shape)
    blocks = {_index_key(i[:n]): i[:n] for i in sharding.addressable_devices_indices_map(p.shape).values()}
    positions = sum(int(np.prod([len(range(size)[s]) for size, s in zip(p.source.stack_shape, idx)]))
                    for idx in blocks.values())
    return positions * p.tensor_bytes


def build_param(tensors: dict[str, TensorInfo], p: ParamPlan, sharding: NamedSharding, chunk_bytes: int,
                on_read: Callable[[int], None]) -> jax.Array:
    """One parameter on its sharding, in layer chunks when it is large and its layer axis is unsharded."""
    read = functools.partial(read_block, tensors, p, on_read=on_read)
    layers = p.shape[0] if p.axes[:1] == ("layers",) and sharding.spec[:1] in ((), (None,)) else 1
    layer_bytes = int(np.prod(p.shape[1:], dtype=np.int64)) * p.dtype.itemsize
    step = max(1, chunk_bytes // max(1, layer_bytes))
    if layers <= step:
        return _from_callback(p.shape, p.dtype, sharding, read)
    out = _zeros(p.shape, p.dtype, sharding)
    for start in range(0, layers, step):
        stop = min(start + step, layers)
        block = _from_callback((stop - start, *p.shape[1:]), p.dtype, sharding,
                               lambda idx, start=start, stop=stop: read((_shift(idx[0], start, stop), *idx[1:])))
        out = _write_layers(out, block, start)
    return out


def _shift(s: slice, start: int, stop: int) -> slice:
    """A layer slice of the chunk [start, stop), as a slice of the whole stack."""
    layers = range(start, stop)[s]
    return slice(layers.start, layers.stop, layers.step)


def _from_callback(shape: tuple[int, ...], dtype: np.dtype, sharding: NamedSharding,
                   read: Callable[[Index], np.ndarray]) -> jax.Array:
    """make_array_from_callback, reading each distinct block once even when several devices hold it."""
    cache: dict[tuple, np.ndarray] = {}

    def block(index: Index) -> np.ndarray:
        key = _index_key(index)
        if key not in cache:
            cache[key] = read(index)
        return cache[key]

    return jax.make_array_from_callback(shape, sharding, block, dtype=dtype)


def _zeros(shape: tuple[int, ...], dtype: np.dtype, sharding: NamedSharding) -> jax.Array:
    """Preallocated destination of a chunked parameter, from untouched host zero pages (no compile)."""
    return jax.make_array_from_callback(shape, sharding, lambda _: np.zeros(sharding.shard_shape(shape), dtype))


@functools.partial(jax.jit, donate_argnums=0)
def _write_layers(out: jax.Array, block: jax.Array, start: jax.Array) -> jax.Array:
    """Write `block` into `out` at layer `start`, in place (out is donated)."""
    return jax.lax.dynamic_update_slice_in_dim(out, block, start, axis=0)
