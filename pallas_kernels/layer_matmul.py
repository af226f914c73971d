"""x @ w[layer] for a stack of dense weights w [L, K, N], as a Pallas Triton kernel that reads the layer in place,
beside its plain-jnp reference.

XLA:GPU copies `w[layer]` into a buffer of its own before its GEMM reads it (k2jax-plan's "a layer's weights
copied per layer"): for K2's dense weights that is 2x their bytes of extra HBM traffic per layer and step. This
kernel takes the whole stack and the layer index, as the INT4 expert kernel does, so each weight byte is read once.
One program per (row tile, column tile, K split) walks its run of K in blocks with masked loads and stores its
float32 partial sums; the splits are added after. The split count gives at least TRITON_MIN_PROGRAMS programs,
so a decode-sized product (one row) still fills the GPU.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

TRITON_MIN_PROGRAMS = 264  # two per SM on an H200
BLOCK_K = 128


def _blocks(m: int) -> tuple[int, int]:
    """(rows, columns) per program: 16 x 64 for decode-sized products, else 64 x 128."""
    return (16, 64) if m <= 16 else (64, 128)


def k_splits(m: int, k: int, n: int) -> tuple[int, int]:
    """(K blocks per split, splits) for an [m, k] x [k, n] product: splits enough for TRITON_MIN_PROGRAMS programs
    over the (row, column) tiles, at most one per K block."""
    bm, bn = _blocks(m)
    tiles, k_blocks = pl.cdiv(m, bm) * pl.cdiv(n, bn), pl.cdiv(k, BLOCK_K)
    blocks_per_split = max(1, k_blocks // pl.cdiv(TRITON_MIN_PROGRAMS, tiles))
    return blocks_per_split, pl.cdiv(k_blocks, blocks_per_split)


def _layer_matmul_kernel(layer_ref, x_ref, w_ref, o_ref, *, bm: int, bn: int, blocks_per_split: int):
    """One (row tile, column tile, split) program: its K blocks of x times w[layer], float32 partials stored."""
    m_i, n_i, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    (m, k), n = x_ref.shape, w_ref.shape[2]
    layer = layer_ref[0]
    rows, cols = pl.ds(m_i * bm, bm), pl.ds(n_i * bn, bn)
    row_ok_M = m_i * bm + jnp.arange(bm) < m
    col_ok_N = n_i * bn + jnp.arange(bn) < n

    def block(j, acc_MN):
        k_ok_K = j * BLOCK_K + jnp.arange(BLOCK_K) < k
        x_MK = plgpu.load(x_ref.at[rows, pl.ds(j * BLOCK_K, BLOCK_K)], mask=row_ok_M[:, None] & k_ok_K[None, :],
                          other=0)
        w_KN = plgpu.load(w_ref.at[layer, pl.ds(j * BLOCK_K, BLOCK_K), cols], mask=k_ok_K[:, None] & col_ok_N[None, :],
                          other=0)
        return acc_MN + jnp.dot(x_MK, w_KN.astype(x_MK.dtype), preferred_element_type=jnp.float32)

    first = split * blocks_per_split
    acc_MN = jax.lax.fori_loop(first, jnp.minimum(first + blocks_per_split, pl.cdiv(k, BLOCK_K)), block,
                               jnp.zeros((bm, bn), jnp.float32))
    plgpu.store(o_ref.at[split, rows, cols], acc_MN, mask=row_ok_M[:, None] & col_ok_N[None, :])


@functools.partial(jax.jit, static_argnames=("interpret",))
def layer_matmul_triton(x_MK, w_LKN, layer, *, interpret: bool = False) -> jax.Array:
    """x [M, K] @ w[layer] (w [L, K, N], layer an int32 scalar) -> float32 [M, N], w read in place."""
    (m, k), n = x_MK.shape, w_LKN.shape[2]
    bm, bn = _blocks(m)
    blocks_per_split, splits = k_splits(m, k, n)
    out_SMN = pl.pallas_call(
        functools.partial(_layer_matmul_kernel, bm=bm, bn=bn, blocks_per_split=blocks_per_split),
        out_shape=jax.ShapeDtypeStruct((splits, m, n), jnp.float32),
        grid=(pl.cdiv(m, bm), pl.cdiv(n, bn), splits),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=3),
        interpret=interpret,
    )(jnp.reshape(layer, (1,)).astype(jnp.int32), x_MK, w_LKN)
    return jnp.sum(out_SMN, axis=0)


def layer_matmul_reference(x_MK, w_LKN, layer) -> jax.Array:
    """Plain jnp: x @ w[layer] at full precision -> float32."""
    return jnp.dot(x_MK.astype(jnp.float32), w_LKN[layer].astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
