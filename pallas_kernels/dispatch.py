"""Backend choice for the kernels: the model calls these three functions and nothing else here.

TPU -> the Pallas Mosaic kernels; GPU -> the Pallas Triton kernels; CPU -> the XLA paths below.
`K2JAX_KERNELS=pallas|xla|interpret` overrides: `interpret` runs the backend's kernels (Mosaic on CPU) in the
Pallas interpreter (slow; for parity tests on CPU). The choice is made at trace time, so set the variable
before the first call is traced.

`layer` (optional int32 scalar) on grouped_int4_matmul and mla_decode: packed/scale are then the stacked
[L, E, ...] expert weights, kv the stacked cache [L, B, S, C], and the kernels read that layer in place.
Pass the whole stack rather than a gathered or sliced copy: a copy costs a full extra read and write.
"""

import os

import jax
import jax.numpy as jnp

from pallas_kernels import int4_layout
from pallas_kernels import int4_matmul as int4_matmul_kernels
from pallas_kernels import mla_decode as mla_decode_kernels

ENV_VAR = "K2JAX_KERNELS"
MODES = ("pallas", "xla", "interpret")
PALLAS_BACKENDS = ("tpu", "gpu")


def kernel_mode(backend: str | None = None) -> str:
    """'pallas', 'xla' or 'interpret': the env override, else pallas where a kernel exists for the backend."""
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if forced and forced not in MODES:
        raise ValueError(f"{ENV_VAR}={forced!r}; expected one of {MODES}")
    if forced:
        return forced
    return "pallas" if (backend or jax.default_backend()) in PALLAS_BACKENDS else "xla"


def _uses_triton() -> bool:
    """GPU backends get the Triton kernels; TPU (and the interpreter on CPU) the Mosaic ones."""
    return jax.default_backend() == "gpu"


def _active_experts(group_sizes_E: jax.Array, slots: int):
    """Ids of the experts that got rows, in order, padded to `slots` with zero-size groups -> (ids, sizes)."""
    ids_U = jnp.nonzero(group_sizes_E > 0, size=slots, fill_value=0)[0]
    sizes_U = jnp.where(jnp.arange(slots) < jnp.sum(group_sizes_E > 0), group_sizes_E[ids_U], 0)
    return ids_U, sizes_U.astype(jnp.int32)


def _take(a, layer, ids):
    """a[layer, ids] in one gather, either index left out when None (a is [L, E, ...] when layer is given)."""
    index = tuple(i for i in (layer, ids) if i is not None)
    return a[index] if index else a


def grouped_matmul_xla(x_MK, w_EKN, group_sizes_E) -> jax.Array:
    """ragged_dot's result as a batch of row tiles that each belong to one expert (rows past the groups: 0).

    The tile is the mean group size rounded up to a power of two, so padding at most doubles the work; XLA's
    own ragged_dot lowering on CPU multiplies every row by every expert.
    """
    m, e = x_MK.shape[0], w_EKN.shape[0]
    tile = 1 << max(-(-m // e) - 1, 0).bit_length()
    sizes_E = group_sizes_E.astype(jnp.int32)
    padded_E = -(-sizes_E // tile) * tile
    start_E, padded_start_E = jnp.cumsum(sizes_E) - sizes_E, jnp.cumsum(padded_E) - padded_E
    n_tiles = -(-m // tile) + (min(e, m) if tile > 1 else 0)
    expert_M = jnp.repeat(jnp.arange(e), sizes_E, total_repeat_length=m)
    dest_M = padded_start_E[expert_M] + jnp.arange(m) - start_E[expert_M]
    x_TtK = jnp.zeros((n_tiles * tile, x_MK.shape[1]), x_MK.dtype).at[dest_M].set(x_MK, mode="drop")
    expert_T = jnp.minimum(jnp.searchsorted(jnp.cumsum(padded_E), jnp.arange(n_tiles) * tile, side="right",
                                             method="compare_all"), e - 1)
    y_TtN = jnp.einsum("tik,tkn->tin", x_TtK.reshape(n_tiles, tile, -1), w_EKN[expert_T].astype(x_MK.dtype),
                       preferred_element_type=jnp.float32).reshape(n_tiles * tile, -1)
    out_MN = y_TtN[jnp.minimum(dest_M, n_tiles * tile - 1)]
    return jnp.where(jnp.arange(m)[:, None] < jnp.sum(sizes_E), out_MN, 0).astype(x_MK.dtype)


def grouped_int4_matmul_xla(x_MK, packed_EHN, scale_EGN, group_sizes_E, *, layer=None) -> jax.Array:
    """XLA path: dequantize only the experts that got rows (at most M of them), then a grouped matmul."""
    m, e = x_MK.shape[0], group_sizes_E.shape[0]
    ids_U, sizes_U = _active_experts(group_sizes_E, m) if m < e else (None, group_sizes_E.astype(jnp.int32))
    w_UKN = int4_layout.dequantize(_take(packed_EHN, layer, ids_U), _take(scale_EGN, layer, ids_U), x_MK.dtype)
    return grouped_matmul_xla(x_MK, w_UKN, sizes_U)


def grouped_int4_matmul(x_MK, packed_EHN, scale_EGN, group_sizes_E, *, layer=None) -> jax.Array:
    """Rows sorted by expert times their expert's INT4 matrix -> [M, N] in x's dtype, on the chosen path."""
    mode = kernel_mode()
    if mode == "xla":
        return grouped_int4_matmul_xla(x_MK, packed_EHN, scale_EGN, group_sizes_E, layer=layer)
    kernel = (int4_matmul_kernels.grouped_int4_matmul_triton if _uses_triton()
              else int4_matmul_kernels.grouped_int4_matmul)
    return kernel(x_MK, packed_EHN, scale_EGN, group_sizes_E, layer=layer, interpret=mode == "interpret")


def int4_matmul(x_MK, packed_HN, scale_GN) -> jax.Array:
    """x @ dequantize(packed, scale) -> [M, N] in x's dtype, on the chosen path."""
    mode = kernel_mode()
    if mode == "xla":
        sizes_E = jnp.full((1,), x_MK.shape[0], jnp.int32)
        return grouped_int4_matmul_xla(x_MK, packed_HN[None], scale_GN[None], sizes_E)
    kernel = int4_matmul_kernels.int4_matmul_triton if _uses_triton() else int4_matmul_kernels.int4_matmul
    return kernel(x_MK, packed_HN, scale_GN, interpret=mode == "interpret")


def mla_decode(q_lat_BHR, q_pe_BHP, kv_BSC, lengths_B, *, sm_scale: float, layer=None) -> jax.Array:
    """Absorbed MLA decode attention over the latent cache -> o_lat [B, H, R], on the chosen path."""
    mode = kernel_mode()
    if mode == "xla":
        kv_BSC = kv_BSC if layer is None else kv_BSC[layer]
        return mla_decode_kernels.mla_decode_reference(q_lat_BHR, q_pe_BHP, kv_BSC, lengths_B, sm_scale=sm_scale)
    kernel = mla_decode_kernels.mla_decode_triton if _uses_triton() else mla_decode_kernels.mla_decode
    return kernel(q_lat_BHR, q_pe_BHP, kv_BSC, lengths_B, sm_scale=sm_scale, layer=layer,
                  interpret=mode == "interpret")
