"""What the kernel benchmarks share: a timer, and random decode inputs for the ragged paged MLA kernel at Kimi K2's
lanes (each row's context in shuffled pages)."""

from __future__ import annotations

import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

RANK, LANES = 512, 640


def timed(fn: Callable, *args, iters: int) -> float:
    """Median seconds of fn(*args) over iters calls, after a compile-and-warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def ragged_decode_args(rng: np.random.Generator, b: int, h: int, s: int, page: int) -> tuple[jax.Array, ...]:
    """(q_BTHC, kv_LPNC, table_BM, kv_len_B, q_start_B, layer, page_first): one new token per row over s keys."""
    pages = -(-s // page)
    q = jnp.asarray(rng.standard_normal((b, 1, h, LANES)), jnp.bfloat16).at[..., RANK + 64:].set(0)
    kv = jax.random.normal(jax.random.key(int(rng.integers(2**31))), (1, b * pages, page, LANES), jnp.bfloat16)
    table = jnp.asarray(rng.permutation(b * pages).reshape(b, pages), jnp.int32)
    lengths = jnp.full((b,), s, jnp.int32)
    return q, kv.at[..., RANK + 64:].set(0), table, lengths, lengths - 1, jnp.int32(0), jnp.int32(0)


def ragged_decode_bytes(b: int, h: int, s: int) -> int:
    """Bytes a decode step's attention must read: every row's keys (c_kv and k_pe) and the queries."""
    return b * s * (RANK + 64) * 2 + b * h * LANES * 2
