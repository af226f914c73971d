"""W4A16 matmul (dense and grouped/ragged for MoE) as Pallas kernels for TPU (Mosaic) and GPU (Triton).

Weights use int4_layout's format: planar uint8 nibbles [E, K//2, N] and bf16 group-32 scales [E, K//32, N].
Each TPU grid step DMAs one [tk//2, tn] packed block, dequantizes it planar block by planar block in VMEM
(scales applied inside the K loop) and accumulates x @ w in fp32. The dequantization is what bounds the
TPU kernel (VALU slots, per the compiled bundles), so it is kept to a shift, a mask, a convert and a
multiply per weight: bytes are read as int32 words (x's K axis is permuted to match, outside the kernel)
and the -8 offset is folded into one small per-tile matmul of group sums of x with the scales.
Byte row r = 4w + b of a planar half lands in byte b of int32 word w, so a block's 8 nibble slabs hold, in
order, k = half * P/2 + 4w + b for b = 0..3 and w = 0..P/8-1: _word_order permutes x to that order.
`layer` (optional int32 scalar): packed/scale are stacked [L, E, ...]; the index maps (TPU) or pointer
offsets (Triton) pick the layer, so the stack is read in place. layer_ref is read only by those.

The grouped kernel walks a schedule of (expert, row tile) visits built from group_sizes: only experts that
received rows are visited, and steps past the last visit keep the previous block indices, so the pipeline
issues no DMA for them. Decode (a few rows per expert) therefore reads exactly the active experts' weights.
The Triton kernel runs one program per (visit, column tile) on the same schedule; programs past the last
visit exit at once, and each program walks K one 32-row scale group at a time with masked row loads.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import int4_layout

TM_MAX = 256
TM_MIN = 16  # bf16 rows fill a (16, 128) tile
TK_MAX = 4096
BLOCK_BYTES = 2 * 1024 * 1024
VMEM_LIMIT_BYTES = 48 * 1024 * 1024
LANES = 128
TRITON_NUM_WARPS = 4
TRITON_NUM_STAGES = 3


def _divisor_tile(dim: int, unit: int, cap: int) -> int:
    """Largest divisor of dim that is a multiple of unit and at most cap; dim itself when none exists."""
    fits = [d for d in range(unit, min(dim, cap) + 1, unit) if dim % d == 0]
    return fits[-1] if fits else dim


def _row_tile(m: int, e: int) -> int:
    """Rows per visit: at least twice an expert's mean rows (so an expert rarely straddles two row tiles and has
    its weights read twice), at most TM_MAX; every row multiplies each visited block, so no more than that."""
    tm = min(TM_MAX, max(TM_MIN, 1 << (2 * -(-m // min(m, e)) - 1).bit_length()))
    return m if m <= tm else tm


def _tiles(m: int, k: int, n: int, e: int = 1) -> tuple[int, int, int]:
    """Block sizes (tm, tk, tn) for m rows over e experts: rows per _row_tile, ~BLOCK_BYTES of packed weight."""
    tm = _row_tile(m, e)
    tk = _divisor_tile(k, math.lcm(int4_layout.planar_block(k), LANES), TK_MAX)
    tn = _divisor_tile(n, LANES, max(LANES, BLOCK_BYTES // (tk // 2)))
    return tm, tk, tn


def _visit_schedule(group_sizes_E: jax.Array, m: int, tm: int):
    """(starts, ends, expert per visit, row tile per visit, [number of visits]) for the grouped grid."""
    e = group_sizes_E.shape[0]
    tiles_m = pl.cdiv(m, tm)
    num_visits_max = tiles_m + min(e, m) - 1
    sizes_E = group_sizes_E.astype(jnp.int32)
    ends_E = jnp.cumsum(sizes_E)
    starts_E = ends_E - sizes_E
    first_tile_E = starts_E // tm
    tiles_E = jnp.where(sizes_E > 0, (jnp.maximum(ends_E, 1) - 1) // tm - first_tile_E + 1, 0)
    visit_ends_E = jnp.cumsum(tiles_E)
    num_visits = visit_ends_E[-1]
    v_V = jnp.minimum(jnp.arange(num_visits_max), jnp.maximum(num_visits - 1, 0))
    expert_V = jnp.minimum(jnp.sum(visit_ends_E[None, :] <= v_V[:, None], axis=1), e - 1).astype(jnp.int32)
    tile_V = first_tile_E[expert_V] + v_V - (visit_ends_E[expert_V] - tiles_E[expert_V])
    tile_V = jnp.clip(tile_V, 0, tiles_m - 1).astype(jnp.int32)
    return starts_E, ends_E, expert_V, tile_V, num_visits[None].astype(jnp.int32)


WORD_ROWS = 4  # packed byte rows per int32 word after pltpu.bitcast


def _word_order(x_MK: jax.Array, planar: int) -> jax.Array:
    """Permute x's K axis to the kernel's nibble order: per planar block, (half, byte of word, word row)."""
    m, k = x_MK.shape
    x = x_MK.reshape(m, k // planar, 2, planar // 2 // WORD_ROWS, WORD_ROWS)
    return jnp.swapaxes(x, -1, -2).reshape(m, k)


def _group_indicator(tk: int, planar: int, dtype) -> jax.Array:
    """[tk, tk/32] 0/1 matrix: word-ordered column c of a K tile belongs to scale group g."""
    natural_k = _word_order(jnp.arange(tk)[None, :], planar)[0]
    groups = jnp.arange(tk // int4_layout.GROUP)
    return (natural_k[:, None] // int4_layout.GROUP == groups[None, :]).astype(dtype)


def _dequant_dot(x_MK: jax.Array, ones_KG: jax.Array, packed_ref, scale_ref, planar: int) -> jax.Array:
    """fp32 x @ dequantize(block) for word-ordered x: q * scale per weight, -8 * group sums of x @ scale once."""
    tk = x_MK.shape[1]
    tn = packed_ref.shape[-1]
    half_groups = planar // 2 // int4_layout.GROUP
    slab_groups = max(half_groups, 1)  # a 32-row planar block has both halves in one group
    scale_GN = scale_ref[...].astype(jnp.float32)
    xsum_MG = jnp.dot(x_MK, ones_KG, preferred_element_type=jnp.float32)
    acc_MN = jnp.dot(xsum_MG, scale_GN, preferred_element_type=jnp.float32,
                     precision=jax.lax.Precision.HIGHEST) * float(int4_layout.QMIN)
    x_MK = x_MK.astype(jnp.float32)
    for j in range(tk // planar):
        words_WN = pltpu.bitcast(packed_ref[j * planar // 2:(j + 1) * planar // 2, :], jnp.int32)
        slabs = []
        for half in range(2):
            g0 = j * planar // int4_layout.GROUP + half * half_groups
            s_G1N = scale_GN[g0:g0 + slab_groups, None, :]
            for byte in range(WORD_ROWS):
                nib_WN = jax.lax.shift_right_logical(words_WN, 8 * byte + 4 * half) & 0xF
                q_GwN = nib_WN.astype(jnp.float32).reshape(slab_groups, -1, tn)
                slabs.append((q_GwN * s_G1N).reshape(-1, tn))
        acc_MN += jnp.dot(x_MK[:, j * planar:(j + 1) * planar], jnp.concatenate(slabs, axis=0),
                          preferred_element_type=jnp.float32)
    return acc_MN


def _gmm_kernel(starts_ref, ends_ref, expert_ref, tile_ref, num_visits_ref, layer_ref,
                x_ref, ones_ref, packed_ref, scale_ref, out_ref, acc_ref, *, planar: int):
    """One (column tile, visit, K tile) step: accumulate, then store the visiting expert's rows."""
    v, k_i = pl.program_id(1), pl.program_id(2)
    active = v < num_visits_ref[0]

    @pl.when(active & (k_i == 0))
    def _zero():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(active)
    def _accumulate():
        acc_ref[...] += _dequant_dot(x_ref[...], ones_ref[...], packed_ref, scale_ref, planar)

    @pl.when(active & (k_i == pl.num_programs(2) - 1))
    def _store():
        tm = out_ref.shape[0]
        expert = expert_ref[v]
        row_M1 = tile_ref[v] * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
        mine_M1 = (row_M1 >= starts_ref[expert]) & (row_M1 < ends_ref[expert])
        out_ref[...] = jnp.where(mine_M1, acc_ref[...].astype(out_ref.dtype), out_ref[...])


def _index_maps(num_k: int):
    """BlockSpec index maps; steps past the last visit repeat the last block so nothing is re-read."""
    def k_eff(v, k_i, num_visits_ref):
        return jnp.where(v < num_visits_ref[0], k_i, num_k - 1)

    def x_map(n_i, v, k_i, starts, ends, expert, tile, nv, layer):
        return tile[v], k_eff(v, k_i, nv)

    def w_map(n_i, v, k_i, starts, ends, expert, tile, nv, layer):
        return layer[0], expert[v], k_eff(v, k_i, nv), n_i

    def out_map(n_i, v, k_i, starts, ends, expert, tile, nv, layer):
        return tile[v], n_i

    def const_map(n_i, v, k_i, starts, ends, expert, tile, nv, layer):
        return 0, 0

    return x_map, w_map, out_map, const_map


def _with_layer_axis(packed, scale, layer):
    """(packed [L, E, K//2, N], scale [L, E, K//32, N], layer [1]): a single layer's weights get L = 1."""
    if layer is None:
        return packed[None], scale[None], jnp.zeros((1,), jnp.int32)
    return packed, scale, jnp.reshape(layer, (1,)).astype(jnp.int32)


def _zero_rows_past_sum(out_MN: jax.Array, group_sizes_E: jax.Array) -> jax.Array:
    """Rows no expert owns (past sum(group_sizes)) are never written by the kernels: make them 0."""
    return jnp.where(jnp.arange(out_MN.shape[0])[:, None] < jnp.sum(group_sizes_E), out_MN, 0)


def _grouped_call(x_MK, packed_LEHN, scale_LEGN, layer_1, group_sizes_E, interpret: bool) -> jax.Array:
    """Run the grouped kernel on one layer of stacked weights; rows past sum(group_sizes) are unspecified."""
    m, k = x_MK.shape
    e, _, n = packed_LEHN.shape[1:]
    tm, tk, tn = _tiles(m, k, n, e)
    schedule = (*_visit_schedule(group_sizes_E, m, tm), layer_1)
    num_visits_max = schedule[2].shape[0]
    x_map, w_map, out_map, const_map = _index_maps(k // tk)
    planar = int4_layout.planar_block(k)
    ones_KG = _group_indicator(tk, planar, x_MK.dtype)
    cost = pl.CostEstimate(
        flops=2 * m * k * n, transcendentals=0,
        bytes_accessed=min(e, num_visits_max) * (k // 2 + 2 * k // int4_layout.GROUP) * n
        + (n // tn) * x_MK.nbytes + m * n * x_MK.dtype.itemsize)
    return pl.pallas_call(
        functools.partial(_gmm_kernel, planar=planar),
        out_shape=jax.ShapeDtypeStruct((m, n), x_MK.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(schedule),
            grid=(n // tn, num_visits_max, k // tk),
            in_specs=[pl.BlockSpec((tm, tk), x_map),
                      pl.BlockSpec(ones_KG.shape, const_map),
                      pl.BlockSpec((None, None, tk // 2, tn), w_map),
                      pl.BlockSpec((None, None, tk // int4_layout.GROUP, tn), w_map)],
            out_specs=pl.BlockSpec((tm, tn), out_map),
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)]),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary"), vmem_limit_bytes=VMEM_LIMIT_BYTES),
        cost_estimate=cost,
        interpret=interpret,
    )(*schedule, _word_order(x_MK, planar), ones_KG, packed_LEHN, scale_LEGN)


@functools.partial(jax.jit, static_argnames="interpret")
def grouped_int4_matmul(x_MK, packed_EHN, scale_EGN, group_sizes_E, *, layer=None,
                        interpret: bool = False) -> jax.Array:
    """Rows of x sorted by expert times their expert's INT4 matrix -> [M, N] in x's dtype; rows past the sum are 0."""
    out_MN = _grouped_call(x_MK, *_with_layer_axis(packed_EHN, scale_EGN, layer), group_sizes_E, interpret)
    return _zero_rows_past_sum(out_MN, group_sizes_E)


@functools.partial(jax.jit, static_argnames="interpret")
def int4_matmul(x_MK, packed_HN, scale_GN, *, interpret: bool = False) -> jax.Array:
    """x @ dequantize(packed, scale) -> [M, N] in x's dtype (the grouped kernel with one expert)."""
    sizes_E = jnp.full((1,), x_MK.shape[0], jnp.int32)
    return _grouped_call(x_MK, *_with_layer_axis(packed_HN[None], scale_GN[None], None), sizes_E, interpret)


def _triton_blocks(m: int) -> tuple[int, int]:
    """(rows, columns) per Triton program: 16 x 64 for decode (more programs to fill the SMs), else 64 x 128."""
    return (16, 64) if m <= 16 else (64, 128)


def _gmm_triton_kernel(starts_ref, ends_ref, expert_ref, tile_ref, num_visits_ref, layer_ref,
                       x_ref, packed_ref, scale_ref, out_ref, *, bm: int, bn: int, planar: int):
    """One (visit, column tile) program: loop over planar blocks and their scale groups, masked store."""
    v, n_i = pl.program_id(0), pl.program_id(1)
    k, n = x_ref.shape[1], out_ref.shape[1]
    group = int4_layout.GROUP
    rows = min(group, planar // 2)  # packed rows per load: one scale group per nibble half

    @pl.when(v < num_visits_ref[0])
    def _visit():
        layer, expert, row0 = layer_ref[0], expert_ref[v], tile_ref[v] * bm
        row_M = row0 + jnp.arange(bm)
        mine_M = (row_M >= starts_ref[expert]) & (row_M < ends_ref[expert])
        col_ok_N = n_i * bn + jnp.arange(bn) < n
        cols = pl.ds(n_i * bn, bn)

        def group_dot(k0, byte_GN, shift):
            x_MG = plgpu.load(x_ref.at[pl.ds(row0, bm), pl.ds(k0, rows)], mask=mine_M[:, None], other=0)
            s_1N = plgpu.load(scale_ref.at[layer, expert, pl.ds(k0 // group, 1), cols], mask=col_ok_N[None, :],
                              other=0)
            q_GN = ((byte_GN >> shift) & 0xF).astype(jnp.float32) + float(int4_layout.QMIN)
            w_GN = (q_GN * s_1N.astype(jnp.float32)).astype(x_MG.dtype)
            return jnp.dot(x_MG, w_GN, preferred_element_type=jnp.float32)

        def planar_block(j, acc_MN):
            for g in range(planar // 2 // rows):
                byte_GN = plgpu.load(packed_ref.at[layer, expert, pl.ds(j * planar // 2 + g * rows, rows), cols],
                                     mask=col_ok_N[None, :], other=0).astype(jnp.int32)
                acc_MN += group_dot(j * planar + g * rows, byte_GN, 0)
                acc_MN += group_dot(j * planar + planar // 2 + g * rows, byte_GN, 4)
            return acc_MN

        acc_MN = jax.lax.fori_loop(0, k // planar, planar_block, jnp.zeros((bm, bn), jnp.float32))
        plgpu.store(out_ref.at[pl.ds(row0, bm), cols], acc_MN.astype(out_ref.dtype),
                    mask=mine_M[:, None] & col_ok_N[None, :])


@functools.partial(jax.jit, static_argnames="interpret")
def grouped_int4_matmul_triton(x_MK, packed_EHN, scale_EGN, group_sizes_E, *, layer=None,
                               interpret: bool = False) -> jax.Array:
    """GPU (Triton) form of grouped_int4_matmul: same arguments, same result."""
    m, k = x_MK.shape
    n = packed_EHN.shape[-1]
    bm, bn = _triton_blocks(m)
    packed_LEHN, scale_LEGN, layer_1 = _with_layer_axis(packed_EHN, scale_EGN, layer)
    schedule = (*_visit_schedule(group_sizes_E, m, bm), layer_1)
    out_MN = pl.pallas_call(
        functools.partial(_gmm_triton_kernel, bm=bm, bn=bn, planar=int4_layout.planar_block(k)),
        out_shape=jax.ShapeDtypeStruct((m, n), x_MK.dtype),
        grid=(schedule[2].shape[0], pl.cdiv(n, bn)),
        compiler_params=plgpu.CompilerParams(num_warps=TRITON_NUM_WARPS, num_stages=TRITON_NUM_STAGES),
        interpret=interpret,
    )(*schedule, x_MK, packed_LEHN, scale_LEGN)
    return _zero_rows_past_sum(out_MN, group_sizes_E)


def int4_matmul_triton(x_MK, packed_HN, scale_GN, *, interpret: bool = False) -> jax.Array:
    """GPU (Triton) form of int4_matmul: the grouped kernel with one expert."""
    sizes_E = jnp.full((1,), x_MK.shape[0], jnp.int32)
    return grouped_int4_matmul_triton(x_MK, packed_HN[None], scale_GN[None], sizes_E, interpret=interpret)


def int4_matmul_reference(x_MK, packed_HN, scale_GN) -> jax.Array:
    """Plain jnp: dequantize to fp32, matmul at full precision, cast to x's dtype."""
    w_KN = int4_layout.dequantize(packed_HN, scale_GN, jnp.float32)
    out = jnp.dot(x_MK.astype(jnp.float32), w_KN, precision=jax.lax.Precision.HIGHEST)
    return out.astype(x_MK.dtype)


def grouped_int4_matmul_reference(x_MK, packed_EHN, scale_EGN, group_sizes_E) -> jax.Array:
    """Plain jnp: each row times its own expert's fp32 dequantized matrix; rows past the sum are 0."""
    row_M = jnp.arange(x_MK.shape[0])
    ends_E = jnp.cumsum(group_sizes_E)
    expert_M = jnp.minimum(jnp.searchsorted(ends_E, row_M, side="right"), group_sizes_E.shape[0] - 1)
    w_MKN = int4_layout.dequantize(packed_EHN, scale_EGN, jnp.float32)[expert_M]
    out = jnp.einsum("mk,mkn->mn", x_MK.astype(jnp.float32), w_MKN, precision=jax.lax.Precision.HIGHEST)
    return jnp.where((row_M < ends_E[-1])[:, None], out, 0).astype(x_MK.dtype)
