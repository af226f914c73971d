"""Backend choice for the kernels: the model calls these functions and nothing else here.

TPU -> the Pallas Mosaic kernels; GPU -> the Pallas Triton kernels; CPU -> the native kernels (cpu_grouped_matmul
and cpu_ragged_mla, FFI custom calls built on first use by cpu_build; the XLA paths below and ragged MLA's jnp
reference when they cannot be built).
`K2JAX_KERNELS=pallas|triton|native|xla|interpret|interpret-triton` overrides: `xla` is plain XLA everywhere,
`triton` the Triton kernels whatever the host (to compile for a GPU ahead of time), `interpret` runs the Mosaic
kernels and `interpret-triton` the Triton kernels in the Pallas interpreter (slow; for parity tests on CPU).
The choice is made at trace time, so set the variable before the first call is traced.

`layer` (optional int32 scalar) on grouped_int4_matmul, grouped_matmul, matmul and head_matmul: the weights are
then the stacked [L, ...] weights of all layers and the kernels read that layer in place. Pass the whole stack
rather than a gathered or sliced copy: a copy costs a full extra read and write. ragged_mla always takes the stacked page pool [L, P, N, C] and its
layer index.
"""

import os

import jax
import jax.numpy as jnp

from pallas_kernels import cpu_build, cpu_grouped_matmul, cpu_ragged_mla, int4_layout
from pallas_kernels import int4_matmul as int4_matmul_kernels
from pallas_kernels import ragged_mla as ragged_mla_kernels

ENV_VAR = "K2JAX_KERNELS"
MODES = ("pallas", "triton", "native", "xla", "interpret", "interpret-triton")
PALLAS_BACKENDS = ("tpu", "gpu")


def kernel_mode(backend: str | None = None) -> str:
    """One of MODES: the env override, else pallas on TPU/GPU and native on CPU (xla if it cannot be built)."""
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if forced and forced not in MODES:
        raise ValueError(f"{ENV_VAR}={forced!r}; expected one of {MODES} (pallas: the backend's kernels, triton: the GPU kernels, native: "
                         "the C++ CPU kernel, xla: plain XLA, interpret / interpret-triton: the Mosaic / Triton "
                         "kernels in the Pallas interpreter)")
    if forced:
        return forced
    if (backend or jax.default_backend()) in PALLAS_BACKENDS:
        return "pallas"
    return "native" if cpu_build.available() else "xla"


def _uses_triton(mode: str) -> bool:
    """The Triton kernels for triton, interpret-triton and pallas on GPU; the Mosaic ones otherwise."""
    return mode in ("triton", "interpret-triton") or (mode == "pallas" and jax.default_backend() == "gpu")


def _interpret(mode: str) -> bool:
    """Whether the chosen Pallas kernel runs in the Pallas interpreter."""
    return mode.startswith("interpret")


def row_tile(m: int, e: int) -> int:
    """Rows per matmul tile for m rows over e groups: the mean group size rounded up to a power of two."""
    return 1 << max(-(-m // e) - 1, 0).bit_length()


def in_loop(a, index):
    """(a, index) through one optimization barrier, so that what is sliced from `a` at `index` depends on the index.
    XLA:CPU widens a bf16 operand of a dot or gather to float32 as a whole; without the barrier it hoists that
    conversion of a whole weight stack out of the layer scan or decode loop (2x its bytes written per call)."""
    return jax.lax.optimization_barrier((a, index))


def _layer(w, layer) -> jax.Array:
    """w[layer] (w when layer is None), widened in the loop, not as a whole stack (see in_loop)."""
    if layer is None:
        return w
    w, layer = in_loop(w, layer)
    return w[layer]


def _expert(a, layer, e) -> jax.Array:
    """a[layer, e] (a[e] when layer is None) as one dynamic slice: a single expert's matrix, no gather."""
    a, index = in_loop(a, (e,) if layer is None else (layer, e))
    lead = len(index)
    start = (*index, *(0,) * (a.ndim - lead))
    return jax.lax.dynamic_slice(a, start, (1,) * lead + a.shape[lead:]).reshape(a.shape[lead:])


def grouped_loop_xla(x_MK, weight_of, group_sizes_E) -> jax.Array:
    """Rows sorted by group times their group's matrix weight_of(g) [K, N] -> [M, N]; rows past the groups give 0.

    A loop over the groups that got rows: each matrix is formed once (sliced in place, or dequantized) and
    multiplies its rows in tiles of row_tile rows, so every active expert is read once and no other is read.
    (XLA:CPU lowers ragged_dot as every row times every expert; a batched gather copies a matrix per tile.)
    """
    m, e = x_MK.shape[0], group_sizes_E.shape[0]
    tile = row_tile(m, min(m, e))
    n = jax.eval_shape(weight_of, 0).shape[-1]
    sizes_E = group_sizes_E.astype(jnp.int32)
    starts_E = jnp.cumsum(sizes_E) - sizes_E
    active_E = jnp.nonzero(sizes_E > 0, size=e, fill_value=0)[0]
    x_pad = jnp.pad(x_MK, ((0, tile), (0, 0)))

    def group(i, y_MN):
        g = active_E[i]
        w_KN = weight_of(g).astype(x_MK.dtype)
        start, end = starts_E[g], starts_E[g] + sizes_E[g]

        def tile_step(t, y_MN):
            row = start + t * tile
            y_TN = jnp.dot(jax.lax.dynamic_slice_in_dim(x_pad, row, tile), w_KN,
                           preferred_element_type=jnp.float32).astype(y_MN.dtype)
            keep_T1 = (row + jnp.arange(tile) < end)[:, None]
            old_TN = jax.lax.dynamic_slice_in_dim(y_MN, row, tile)
            return jax.lax.dynamic_update_slice_in_dim(y_MN, jnp.where(keep_T1, y_TN, old_TN), row, 0)

        return jax.lax.fori_loop(0, -(-sizes_E[g] // tile), tile_step, y_MN)

    y_MN = jax.lax.fori_loop(0, jnp.sum(sizes_E > 0), group, jnp.zeros((m + tile, n), x_MK.dtype))
    return y_MN[:m]


def grouped_matmul_xla(x_MK, w_EKN, group_sizes_E, *, layer=None) -> jax.Array:
    """Rows sorted by expert times their expert's dense matrix (w [E, K, N], or [L, E, K, N] with layer)."""
    return grouped_loop_xla(x_MK, lambda g: _expert(w_EKN, layer, g), group_sizes_E)


def grouped_matmul(x_MK, w_EKN, group_sizes_E, *, layer=None) -> jax.Array:
    """Rows sorted by expert times their expert's dense matrix: the native CPU kernel, else the XLA loop."""
    if kernel_mode() == "native":
        return cpu_grouped_matmul.grouped_matmul(x_MK, w_EKN, group_sizes_E, layer=layer)
    return grouped_matmul_xla(x_MK, w_EKN, group_sizes_E, layer=layer)


def _gspmd_partitioned() -> bool:
    """Whether this trace is split over several devices by XLA's partitioner (a multi-device mesh outside a
    shard_map): a custom call there would have its operands gathered onto every device."""
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and mesh.size > 1 and not mesh.are_all_axes_manual


# Rows per matrix from which dense matmuls leave the native kernel for XLA's GEMM (prefill chunks): there the
# product is compute-bound, XLA:CPU's register-blocked GEMM outruns the kernel (1.4-2.3x at 1024 rows, measured
# on a busy 2-core box), and its per-matmul copy or widening of one layer's matrix is spread over the rows.
NATIVE_MAX_ROWS = 64


def _native_dense(rows: int) -> bool:
    """Whether a dense matmul of `rows` rows per matrix takes the native CPU kernel (not under a partitioned mesh)."""
    return kernel_mode() == "native" and rows < NATIVE_MAX_ROWS and not _gspmd_partitioned()


def _xla_derivatives(native, xla):
    """`native` (a custom call, which has no derivatives) differentiated as `xla`, which computes the same."""
    fn = jax.custom_jvp(native)
    fn.defjvp(lambda primals, tangents: jax.jvp(xla, primals, tangents))
    return fn


def _matmul_xla(x_MK, w_KN, layer) -> jax.Array:
    """x @ w[layer] in x's dtype (weights cast at use) -> float32."""
    return jnp.dot(x_MK, _layer(w_KN, layer).astype(x_MK.dtype), preferred_element_type=jnp.float32)


def _head_matmul_xla(x_GMK, w_GKN, layer) -> jax.Array:
    """x[g] @ w[layer, g] for each g, in x's dtype (weights cast at use) -> float32."""
    return jnp.einsum("gmk,gkn->gmn", x_GMK, _layer(w_GKN, layer).astype(x_GMK.dtype),
                      preferred_element_type=jnp.float32)


def _head_matmul_native(x_GMK, w_GKN, layer) -> jax.Array:
    """The G groups as G experts of M rows each on the native kernel -> float32."""
    G, M, K = x_GMK.shape
    y = cpu_grouped_matmul.grouped_matmul(x_GMK.reshape(G * M, K).astype(jnp.float32), w_GKN,
                                          jnp.full((G,), M, jnp.int32), layer=layer)
    return y.reshape(G, M, -1)


_matmul_native = _xla_derivatives(
    lambda x_MK, w_KN, layer: cpu_grouped_matmul.matmul(x_MK.astype(jnp.float32), w_KN, layer=layer), _matmul_xla)
_head_matmul_native = _xla_derivatives(_head_matmul_native, _head_matmul_xla)


def matmul(x_MK, w_KN, *, layer=None, out_dtype=None) -> jax.Array:
    """x @ w[layer] -> [M, N] in out_dtype (default x's), accumulated in float32; w [L, K, N], or [K, N] without
    layer. Below NATIVE_MAX_ROWS rows on CPU the native kernel reads w (float32 or bfloat16) in place, widening
    bf16 inside its loop; otherwise (and for derivatives) one dot on the layer's weights cast to x's dtype."""
    y = (_matmul_native if _native_dense(x_MK.shape[0]) else _matmul_xla)(x_MK, w_KN, layer)
    return y.astype(out_dtype or x_MK.dtype)


def head_matmul(x_GMK, w_GKN, *, layer=None, out_dtype=None) -> jax.Array:
    """x[g] @ w[layer, g] for each head g -> [G, M, N], as `matmul` (w [L, G, K, N], or [G, K, N] without layer)."""
    y = (_head_matmul_native if _native_dense(x_GMK.shape[1]) else _head_matmul_xla)(x_GMK, w_GKN, layer)
    return y.astype(out_dtype or x_GMK.dtype)


def grouped_int4_matmul_xla(x_MK, packed_EHN, scale_EGN, group_sizes_E, *, layer=None) -> jax.Array:
    """XLA path: each expert that got rows is dequantized once, in the loop, and multiplies its rows."""
    def weight_of(g):
        return int4_layout.dequantize(_expert(packed_EHN, layer, g), _expert(scale_EGN, layer, g), x_MK.dtype)

    return grouped_loop_xla(x_MK, weight_of, group_sizes_E)


def grouped_int4_matmul(x_MK, packed_EHN, scale_EGN, group_sizes_E, *, layer=None) -> jax.Array:
    """Rows sorted by expert times their expert's INT4 matrix -> [M, N] in x's dtype, on the chosen path."""
    mode = kernel_mode()
    if mode == "xla":
        return grouped_int4_matmul_xla(x_MK, packed_EHN, scale_EGN, group_sizes_E, layer=layer)
    if mode == "native":
        return cpu_grouped_matmul.grouped_int4_matmul(x_MK, packed_EHN, scale_EGN, group_sizes_E, layer=layer)
    kernel = (int4_matmul_kernels.grouped_int4_matmul_triton if _uses_triton(mode)
              else int4_matmul_kernels.grouped_int4_matmul)
    return kernel(x_MK, packed_EHN, scale_EGN, group_sizes_E, layer=layer, interpret=_interpret(mode))


def int4_matmul(x_MK, packed_HN, scale_GN) -> jax.Array:
    """x @ dequantize(packed, scale) -> [M, N] in x's dtype, on the chosen path."""
    mode = kernel_mode()
    if mode in ("xla", "native"):
        sizes_E = jnp.full((1,), x_MK.shape[0], jnp.int32)
        return grouped_int4_matmul(x_MK, packed_HN[None], scale_GN[None], sizes_E)
    kernel = int4_matmul_kernels.int4_matmul_triton if _uses_triton(mode) else int4_matmul_kernels.int4_matmul
    return kernel(x_MK, packed_HN, scale_GN, interpret=_interpret(mode))


def native_attention() -> bool:
    """Whether CPU attention runs in the native kernel, which reads only the pages each row's queries see (so the
    page table's width costs nothing) and skips the keys a query's causal mask hides, rather than gathering the whole
    table. It does for prefill chunks of any length too: one 512-token chunk over 512 / 1,024 keys with the bundled
    model's 4 heads took 1.5 / 3.6 ms against the reference's 3.0 / 5.6; over 1,024 keys with 16 heads of 160 lanes
    26 against 65-73; 256 tokens over 1,024 keys with K2's 576 lanes 59-64 against 73-77."""
    return kernel_mode() == "native"


def ragged_mla(q_BTHC, kv_LPNC, table_BM, kv_len_B, q_start_B, layer, page_first, *, sm_scale: float, rank: int,
               page_stride: int = 1, width: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Ragged paged absorbed MLA attention (decode and prefill chunks) -> (o_BTHR, lse_BTH) float32, on the
    chosen path: the native CPU kernel (not under a partitioned mesh), the reference (plain XLA), or the Mosaic or
    Triton kernel. width: lanes holding data, the rest zero padding (the CPU kernel skips it; the others read whole
    128-lane rows)."""
    mode = kernel_mode()
    args = (q_BTHC, kv_LPNC, table_BM, kv_len_B, q_start_B, layer, page_first)
    if native_attention() and not _gspmd_partitioned():
        return cpu_ragged_mla.ragged_mla(*args, sm_scale=sm_scale, rank=rank, page_stride=page_stride, width=width)
    if mode in ("xla", "native"):
        return ragged_mla_kernels.ragged_mla_reference(*args, sm_scale=sm_scale, rank=rank, page_stride=page_stride)
    kernel = ragged_mla_kernels.ragged_mla_triton if _uses_triton(mode) else ragged_mla_kernels.ragged_mla
    return kernel(*args, sm_scale=sm_scale, rank=rank, page_stride=page_stride, interpret=_interpret(mode))
