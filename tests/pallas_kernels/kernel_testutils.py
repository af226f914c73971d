"""Random inputs shared by the kernel tests: uniform INT4 bytes, positive scales, normal activations."""

import jax.numpy as jnp
import numpy as np


def random_int4(rng: np.random.Generator, e: int, k: int, n: int):
    """Uniformly random packed bytes (every nibble -8..7) and bf16 scales for E experts [K, N]."""
    packed = rng.integers(0, 256, size=(e, k // 2, n), dtype=np.uint8)
    scale = rng.uniform(0.005, 0.05, size=(e, k // 32, n)).astype(jnp.bfloat16)
    return jnp.asarray(packed), jnp.asarray(scale)


def random_normal(rng: np.random.Generator, shape, dtype=jnp.float32):
    """Standard normal array in dtype."""
    return jnp.asarray(rng.standard_normal(shape).astype(np.float32), dtype)


def max_rel_err(out, ref) -> float:
    """max |out - ref| / max |ref|, both in fp32."""
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    return float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))
