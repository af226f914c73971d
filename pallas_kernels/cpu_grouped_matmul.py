"""The CPU grouped matmul (cpu_grouped_matmul.cc, an XLA FFI custom call built by cpu_build) and its jnp references.

XLA:CPU copies each dynamically sliced expert (or layer) matrix before its dot, which at decode sizes costs
several times the dot; the custom call reads the active experts of the stacked weights in place.
Where the CPU has AVX2 or AVX-512 VNNI (`rounds_x_to_int8()`), INT4 matmuls see x rounded to int8 per 32 values of
K, as llama.cpp's Q8_0 activations (each value moves by at most max|x| / 254 of its 32), and multiply it with the
nibbles in integers; a row's result does not depend on the other rows.
"""

from __future__ import annotations

import ctypes
import functools

import jax
import jax.numpy as jnp

from pallas_kernels import cpu_build, int4_layout, int4_matmul


def _stacked(a: jax.Array, layer) -> tuple[jax.Array, jax.Array]:
    """[L, E, ...] weights and an int32 layer index; unstacked [E, ...] weights get a unit layer axis."""
    if layer is None:
        return a[None], jnp.zeros((), jnp.int32)
    return a, jnp.asarray(layer, jnp.int32)


def grouped_matmul(x_MK, w_EKN, group_sizes_E, *, layer=None) -> jax.Array:
    """Rows sorted by expert times their expert's dense matrix (f32 or bf16, [E, K, N] or [L, E, K, N] + layer)."""
    cpu_build.require()
    w_LEKN, layer = _stacked(w_EKN, layer)
    out = jax.ShapeDtypeStruct((x_MK.shape[0], w_LEKN.shape[-1]), jnp.float32)
    y = jax.ffi.ffi_call(cpu_build.TARGETS["dense"], out)(
        x_MK.astype(jnp.float32), w_LEKN, layer, group_sizes_E.astype(jnp.int32))
    return y.astype(x_MK.dtype)


def matmul(x_MK, w_KN, *, layer=None) -> jax.Array:
    """x @ w[layer] for a stacked [L, K, N] dense weight (f32 or bf16; [K, N] without layer), read in place."""
    cpu_build.require()
    layer = jnp.zeros((), jnp.int32) if layer is None else jnp.asarray(layer, jnp.int32)
    out = jax.ShapeDtypeStruct((x_MK.shape[0], w_KN.shape[-1]), jnp.float32)
    y = jax.ffi.ffi_call(cpu_build.TARGETS["dense"], out)(
        x_MK.astype(jnp.float32), w_KN, layer, jnp.full((1,), x_MK.shape[0], jnp.int32))
    return y.astype(x_MK.dtype)


def grouped_int4_matmul(x_MK, packed_EHN, scale_EGN, group_sizes_E, *, layer=None) -> jax.Array:
    """Rows sorted by expert times their expert's INT4 matrix (int4_layout's planar format), read in place."""
    cpu_build.require()
    packed, layer_ = _stacked(packed_EHN, layer)
    scale, _ = _stacked(scale_EGN, layer)
    planar = int4_layout.planar_block(x_MK.shape[1])
    out = jax.ShapeDtypeStruct((x_MK.shape[0], packed.shape[-1]), jnp.float32)
    y = jax.ffi.ffi_call(cpu_build.TARGETS["int4"], out)(
        x_MK.astype(jnp.float32), packed, scale.astype(jnp.bfloat16), layer_, group_sizes_E.astype(jnp.int32),
        planar=planar)
    return y.astype(x_MK.dtype)


def grouped_matmul_reference(x_MK, w_EKN, group_sizes_E) -> jax.Array:
    """lax.ragged_dot with rows past the groups set to 0 (the kernel's contract)."""
    sizes = group_sizes_E.astype(jnp.int32)
    y = jax.lax.ragged_dot(x_MK, w_EKN.astype(x_MK.dtype), sizes, preferred_element_type=jnp.float32)
    return jnp.where(jnp.arange(x_MK.shape[0])[:, None] < jnp.sum(sizes), y, 0).astype(x_MK.dtype)


@functools.cache
def rounds_x_to_int8() -> bool:
    """Whether this build's INT4 matmul rounds x to int8 (else it multiplies float x)."""
    cpu_build.require()
    query = cpu_build.library().K2jaxGroupedMatmulInt4RoundsX
    query.restype = ctypes.c_int64
    return bool(query())


def round_rows_int8(x_MK) -> jax.Array:
    """x as the int8 path sees it: per 32 values of a row, round(x * 127 / max|x|) * (max|x| / 127), in float32."""
    m, k = x_MK.shape
    x_MGg = x_MK.astype(jnp.float32).reshape(m, k // int4_layout.GROUP, int4_layout.GROUP)
    amax_MG1 = jnp.max(jnp.abs(x_MGg), axis=-1, keepdims=True)
    inv_MG1 = jnp.where(amax_MG1 > 0, 127 / amax_MG1, 0)
    return (jnp.round(x_MGg * inv_MG1) * (amax_MG1 / 127)).reshape(m, k)


def grouped_int4_matmul_reference(x_MK, packed_EHN, scale_EGN, group_sizes_E) -> jax.Array:
    """The kernel's INT4 contract: int4_matmul's fp32 reference on x as the kernel sees it (round_rows_int8)."""
    x_MK = round_rows_int8(x_MK) if rounds_x_to_int8() else x_MK.astype(jnp.float32)
    return int4_matmul.grouped_int4_matmul_reference(x_MK, packed_EHN, scale_EGN, group_sizes_E.astype(jnp.int32))
