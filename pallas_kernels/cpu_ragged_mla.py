"""The CPU ragged paged MLA attention (cpu_ragged_mla.cc, an XLA FFI custom call built by cpu_build); its reference
is ragged_mla.ragged_mla_reference.

The reference gathers every row's pages over the whole table width; the custom call reads only the pages each
row's queries can see, in place from the pool, so a step costs what the rows hold, not what their tables could.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import cpu_build
from pallas_kernels.ragged_mla import check_inputs


def ragged_mla(q_BTHC, kv_LPNC, table_BM, kv_len_B, q_start_B, layer, page_first, *, sm_scale: float, rank: int,
               page_stride: int = 1, width: int | None = None) -> tuple[jax.Array, jax.Array]:
    """ragged_mla_reference's contract (float32 or bf16 pool, read in place) -> (o_BTHR, lse_BTH) float32.

    width: lanes of q and the pool that hold data (default all C); the rest, zero padding in the cache's layout, is
    never read (the bundled model's 80 lanes of 128 take 5/8 of the score work)."""
    check_inputs(q_BTHC, kv_LPNC, table_BM, kv_len_B, q_start_B, rank)
    if kv_LPNC.dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"kv_LPNC is {kv_LPNC.dtype}; the CPU kernel reads float32 or bfloat16 pools")
    if page_stride < 1:
        raise ValueError(f"page_stride {page_stride} must be >= 1")
    width = q_BTHC.shape[-1] if width is None else width
    if not rank <= width <= q_BTHC.shape[-1]:
        raise ValueError(f"width {width} must be in [rank, C] = [{rank}, {q_BTHC.shape[-1]}]")
    cpu_build.require()
    b, t, h, _ = q_BTHC.shape
    out = (jax.ShapeDtypeStruct((b, t, h, rank), jnp.float32), jax.ShapeDtypeStruct((b, t, h), jnp.float32))
    ints = (jnp.asarray(a, jnp.int32) for a in (table_BM, kv_len_B, q_start_B, layer, page_first))
    return jax.ffi.ffi_call(cpu_build.TARGETS["ragged_mla"], out)(
        q_BTHC.astype(jnp.float32), kv_LPNC, *ints, sm_scale=np.float32(sm_scale), page_stride=np.int64(page_stride),
        width=np.int64(width))
