"""Random k2jax parameters on host, for writing synthetic checkpoints of any size (tests and benchmarks)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from k2jax.config import K2Config
from k2jax.loading import abstract_model
from pallas_kernels import int4_layout


def random_state(cfg: K2Config, seed: int = 0, dtype: np.dtype = jnp.bfloat16) -> nnx.State:
    """Every parameter as a numpy array: small normal weights, random INT4 nibbles and positive scales."""
    rng = np.random.default_rng(seed)
    _, state = abstract_model(cfg, dtype)
    flat = nnx.to_flat_state(state)
    for key, var in flat:
        value = _random(rng, str(key[-1]), var.get_value().shape, var.get_value().dtype)
        if key[-1] == "kv_a":  # its columns past c_kv | k_pe pad it to the cache's lanes
            value[..., value.shape[-1] - cfg.cache_pad:] = 0
        var.set_value(value)
    return nnx.from_flat_state(flat)


def _random(rng: np.random.Generator, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """One random parameter: bytes for packed INT4, bf16 scales around 0.01, normal(0, 0.02) otherwise."""
    if name == "packed":
        return rng.integers(0, 256, shape, dtype=np.uint8)
    if name == "scale":
        return rng.uniform(0.005, 0.02, shape).astype(int4_layout.SCALE_DTYPE)
    return (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(dtype)
