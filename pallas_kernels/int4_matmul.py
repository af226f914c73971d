"""W4A16 matmul (dense and grouped/ragged for MoE) as Pallas kernels for TPU (Mosaic) and GPU (Triton).

Weights use int4_layout's format: planar uint8 nibbles [E, K//2, N] and bf16 group-32 scales [E, K//32, N].
Each TPU grid step DMAs one [tk//2, tn] packed block and accumulates x @ w in fp32. The dequantization bounds
the TPU kernel (VALU slots, per the compiled bundles), so it turns two nibbles into bf16 per 32-bit op: bytes
are read as int32 words, and ((word >> s) & 0x000F000F) | 0x43004300 is two bf16 values 128 + nibble (exact).
Those feed the MXU as they are; the group scale is applied after the dot, on each group's partial sums (x is
made block-diagonal per 128 rows of K, one row block per scale group), and the 128 + 8 offset is one small
matmul of x's group sums (computed outside the kernel, split into three bf16 parts) with the scales.
Byte row r = 4w + b of a planar half lands in byte b of int32 word w, and bf16 row 2w + i of a shifted word
holds byte b0 + 2i (b0 = s // 8): _word_order permutes x's K axis to the kernel's weight rows, in which each
scale group is 32 contiguous rows.
`layer` (optional int32 scalar): packed/scale are stacked [L, E, ...]; the index maps (TPU) or pointer
offsets (Triton) pick the layer, so the stack is read in place. layer_ref is read only by those.

The TPU kernel pads each expert's rows to whole row tiles (x is gathered into that padded row space and the
output gathered back), so a visit is one expert's tile: no tile holds two experts, and no expert's weights are
read twice for a tile boundary. It walks only the visited tiles, and steps past the last visit keep the
previous block indices, so the pipeline issues no DMA for them. Decode therefore reads exactly the active
experts' weights, once per row tile.
The Triton kernel walks a schedule of (expert, row tile) visits over the unpadded rows (an expert straddling two
tiles is visited twice, with masked stores): one program per (visit, column tile, K split); programs past the
last visit exit at once, and each program walks its share of K one 32-row scale group at a time with masked row
loads, storing float32 partials that are summed after. It reads
weights as pairs of byte columns (a uint16 view, see byte_pairs), which keeps every element offset of a
one-layer operand under 2^31, as Pallas' 32-bit Triton indexing needs.
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import int4_layout

TM_MAX = 256
TM_MIN = 8
TK_MAX = 4096
BLOCK_BYTES = 4 * 1024 * 1024
VMEM_LIMIT_BYTES = 48 * 1024 * 1024
LANES = 128
BF16_128 = 0x4300  # bf16 bits of 128.0: OR-ing a nibble u (0..15) into its mantissa gives exactly 128 + u
OFFSET = 128 - int4_layout.QMIN  # (128 + u) - OFFSET = u + QMIN, the weight's integer, exact in bf16


def _divisor_tile(dim: int, unit: int, cap: int) -> int:
    """Largest divisor of dim that is a multiple of unit and at most cap; dim itself when none exists."""
    fits = [d for d in range(unit, min(dim, cap) + 1, unit) if dim % d == 0]
    return fits[-1] if fits else dim


def _row_tile(m: int, e: int) -> int:
    """Rows per visit of the TPU kernel: an expert's mean rows rounded down to a power of two, TM_MIN to TM_MAX
    (every row multiplies each visited block; padding each expert to whole tiles adds under max(m, e * TM_MIN)
    rows)."""
    return min(TM_MAX, max(TM_MIN, 1 << ((m // min(m, e)).bit_length() - 1)))


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
BF16_MAGIC = 0x43004300  # two bf16 128.0 in one int32 word: OR-ing a nibble into each mantissa gives 128 + nibble
NIBBLE_PAIR_MASK = 0x000F000F
BF16_BIAS = 128 - int4_layout.QMIN  # 128 + nibble = q + 136
GROUP_WORDS = int4_layout.GROUP // WORD_ROWS  # word rows holding one scale group of one planar half
COLUMN_CHUNK = 256  # columns dequantized and scaled at a time (see _column_chunk)
DOT_ROWS = 128  # K rows per block-diagonal dot: 4 scale groups, one 128-deep MXU pass


def _word_order(x_MK: jax.Array, planar: int) -> jax.Array:
    """Permute x's K axis to the kernel's weight rows: per planar block (half, word group, byte, word, pair)."""
    m, k = x_MK.shape
    words = planar // 2 // WORD_ROWS
    wl = min(words, GROUP_WORDS)
    # Natural k in a block = half * P/2 + 4 * (wg * wl + w) + 2 * pair + byte.
    x = x_MK.reshape(m, k // planar, 2, words // wl, wl, 2, 2)
    return jnp.transpose(x, (0, 1, 2, 3, 6, 4, 5)).reshape(m, k)


def _group_sums(x_MK: jax.Array, tk: int) -> jax.Array:
    """fp32 sums of x over each scale group, split into three bf16-exact parts (hi + mid + lo is the sum to fp32
    precision) and laid out per K tile: [K/tk, 3, M, tk/32]."""
    m, k = x_MK.shape
    rest_MG = jnp.sum(x_MK.astype(jnp.float32).reshape(m, k // int4_layout.GROUP, int4_layout.GROUP), axis=-1)
    parts = []
    for _ in range(3):
        parts.append(rest_MG.astype(jnp.bfloat16).astype(jnp.float32))
        rest_MG = rest_MG - parts[-1]
    return jnp.stack(parts).reshape(3, m, k // tk, -1).transpose(2, 0, 1, 3)


def _bf16_rows(words_WN: jax.Array, shift: int) -> jax.Array:
    """128 + nibble as bf16 [2W, N]: row 2w from bits shift.. of word w, row 2w+1 from bits 16+shift.."""
    bits_WN = (words_WN if shift == 0 else jax.lax.shift_right_logical(words_WN, shift)) & NIBBLE_PAIR_MASK
    return pltpu.bitcast(bits_WN | BF16_MAGIC, jnp.bfloat16)


def _column_chunk(tn: int) -> int:
    """Columns dequantized and multiplied at a time: 256 (one v6e MXU width) keeps a chunk's sums in registers."""
    return COLUMN_CHUNK if tn % COLUMN_CHUNK == 0 else tn


def _dequant_dot(x_MK: jax.Array, xsum_3MG: jax.Array, packed_ref, scale_ref, scale32_ref, acc_ref,
                 planar: int) -> None:
    """acc += fp32 x @ dequantize(block) for word-ordered x: a dot per scale group on 128 + nibble, scaled after
    the dot, column chunk by column chunk; the 136 offset is one small matmul of group sums of x with the scales."""
    tk = x_MK.shape[1]
    tn = packed_ref.shape[-1]
    group = int4_layout.GROUP
    words = planar // 2 // WORD_ROWS
    wl = min(words, GROUP_WORDS)
    x_dtype = x_MK.dtype
    lanes = scale32_ref.shape[-1]
    scale_GN = scale_ref[...].astype(jnp.float32)
    for t in range(tn // lanes):  # f32 scales, one lane tile each: a row loads as a sublane broadcast
        scale32_ref[t] = scale_GN[:, t * lanes:(t + 1) * lanes]
    m = x_MK.shape[0]
    parts_RN = jnp.dot(xsum_3MG.reshape(3 * m, -1).astype(jnp.bfloat16), scale_ref[...],
                       preferred_element_type=jnp.float32)
    acc_ref[...] += (parts_RN[:m] + parts_RN[m:2 * m] + parts_RN[2 * m:]) * float(-BF16_BIAS)
    span = min(planar, DOT_ROWS)  # K rows per dot
    groups = span // group  # scale groups per dot
    col_group_1S = jax.lax.div(jax.lax.broadcasted_iota(jnp.int32, (1, span), 1), group)
    x_MK = x_MK.astype(jnp.float32)
    # Block-diagonal x per dot: row block i keeps only group i's columns, so one dot gives every group's partial
    # sums [groups * M, C] and each is scaled on its own.
    xbd = [jnp.concatenate([jnp.where(col_group_1S == i, x_MK[:, d * span:(d + 1) * span], 0.0)
                            for i in range(groups)], axis=0).astype(x_dtype) for d in range(tk // span)]
    chunk = _column_chunk(tn)
    for c in range(0, tn, chunk):
        acc_MC = jnp.zeros((m, chunk), jnp.float32)
        for j in range(tk // planar):
            words_WC = pltpu.bitcast(packed_ref[j * planar // 2:(j + 1) * planar // 2, c:c + chunk], jnp.int32)
            rows = []
            for half in range(2):
                lo_RC, hi_RC = (_bf16_rows(words_WC, 8 * byte + 4 * half) for byte in range(2))
                for wg in range(words // wl):
                    rows += [lo_RC[2 * wl * wg:2 * wl * (wg + 1)], hi_RC[2 * wl * wg:2 * wl * (wg + 1)]]
            w_PC = jnp.concatenate(rows, axis=0).astype(x_dtype)
            for h in range(planar // span):
                d = j * planar // span + h
                part_RC = jnp.dot(xbd[d], w_PC[h * span:(h + 1) * span], preferred_element_type=jnp.float32)
                for i in range(groups):
                    g = d * groups + i
                    s_MC = jnp.broadcast_to(jnp.concatenate(
                        [scale32_ref[t, g:g + 1, :] for t in range(c // lanes, (c + chunk) // lanes)], axis=1),
                        (m, chunk))
                    acc_MC += part_RC[i * m:(i + 1) * m] * s_MC
        acc_ref[:, c:c + chunk] += acc_MC


def _padded_rows(group_sizes_E: jax.Array, m: int, tm: int):
    """Each expert's rows start a fresh row tile of a padded row space, so every visit is one expert's tile:
    (expert per visit, [number of visits], source row per padded row (m: none), padded row per row)."""
    e = group_sizes_E.shape[0]
    num_visits_max = pl.cdiv(m, tm) + min(e, m) - 1
    sizes_E = group_sizes_E.astype(jnp.int32)
    ends_E = jnp.cumsum(sizes_E)
    starts_E = ends_E - sizes_E
    tile_ends_E = jnp.cumsum(-(-sizes_E // tm))
    first_tile_E = tile_ends_E + sizes_E // -tm
    num_visits = tile_ends_E[-1]
    v_V = jnp.minimum(jnp.arange(num_visits_max), jnp.maximum(num_visits - 1, 0))
    expert_V = jnp.minimum(jnp.searchsorted(tile_ends_E, v_V, side="right"), e - 1).astype(jnp.int32)
    p_P = jnp.arange(num_visits_max * tm)
    expert_P = jnp.minimum(jnp.searchsorted(tile_ends_E, p_P // tm, side="right"), e - 1)
    local_P = p_P - first_tile_E[expert_P] * tm
    src_P = jnp.where((p_P // tm < num_visits) & (local_P < sizes_E[expert_P]), starts_E[expert_P] + local_P, m)
    row_M = jnp.arange(m)
    expert_M = jnp.minimum(jnp.searchsorted(ends_E, row_M, side="right"), e - 1)
    dest_M = jnp.minimum(first_tile_E[expert_M] * tm + row_M - starts_E[expert_M], num_visits_max * tm - 1)
    return expert_V, num_visits[None].astype(jnp.int32), src_P, dest_M


def _gmm_kernel(expert_ref, num_visits_ref, layer_ref,
                x_ref, xsum_ref, packed_ref, scale_ref, out_ref, acc_ref, scale32_ref, *, planar: int):
    """One (column tile, visit, K tile) step: accumulate, then store the visiting expert's row tile."""
    v, k_i = pl.program_id(1), pl.program_id(2)
    active = v < num_visits_ref[0]

    @pl.when(active & (k_i == 0))
    def _zero():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(active)
    def _accumulate():
        _dequant_dot(x_ref[...], xsum_ref[...], packed_ref, scale_ref, scale32_ref, acc_ref, planar)

    @pl.when(active & (k_i == pl.num_programs(2) - 1))
    def _store():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def _index_maps(num_k: int):
    """BlockSpec index maps; steps past the last visit repeat the last block so nothing is re-read."""
    def k_eff(v, k_i, num_visits_ref):
        return jnp.where(v < num_visits_ref[0], k_i, num_k - 1)

    def v_eff(v, num_visits_ref):
        return jnp.minimum(v, jnp.maximum(num_visits_ref[0] - 1, 0))

    def x_map(n_i, v, k_i, expert, nv, layer):
        return v_eff(v, nv), k_eff(v, k_i, nv)

    def w_map(n_i, v, k_i, expert, nv, layer):
        return layer[0], expert[v], k_eff(v, k_i, nv), n_i

    def out_map(n_i, v, k_i, expert, nv, layer):
        return v_eff(v, nv), n_i

    def xsum_map(n_i, v, k_i, expert, nv, layer):
        return k_eff(v, k_i, nv), 0, v_eff(v, nv), 0

    return x_map, w_map, out_map, xsum_map


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
    expert_V, num_visits_1, src_P, dest_M = _padded_rows(group_sizes_E, m, tm)
    schedule = (expert_V, num_visits_1, layer_1)
    num_visits_max = expert_V.shape[0]
    x_map, w_map, out_map, xsum_map = _index_maps(k // tk)
    planar = int4_layout.planar_block(k)
    # Padded rows gather from x in the kernel's K order with a zero row appended (index m): no padded copy of x
    # goes through the permutation.
    x_PK = jnp.concatenate([_word_order(x_MK, planar), jnp.zeros((1, k), x_MK.dtype)])[src_P]
    xsum_K3PG = jnp.take(jnp.pad(_group_sums(x_MK, tk), ((0, 0), (0, 0), (0, 1), (0, 0))), src_P, axis=2)
    cost = pl.CostEstimate(
        flops=2 * m * k * n, transcendentals=0,
        bytes_accessed=min(e, num_visits_max) * (k // 2 + 2 * k // int4_layout.GROUP) * n
        + (n // tn) * x_PK.nbytes + x_PK.shape[0] * n * x_MK.dtype.itemsize)
    out_PN = pl.pallas_call(
        functools.partial(_gmm_kernel, planar=planar),
        out_shape=jax.ShapeDtypeStruct((x_PK.shape[0], n), x_MK.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(schedule),
            grid=(n // tn, num_visits_max, k // tk),
            in_specs=[pl.BlockSpec((tm, tk), x_map),
                      pl.BlockSpec((None, 3, tm, tk // int4_layout.GROUP), xsum_map),
                      pl.BlockSpec((None, None, tk // 2, tn), w_map),
                      pl.BlockSpec((None, None, tk // int4_layout.GROUP, tn), w_map)],
            out_specs=pl.BlockSpec((tm, tn), out_map),
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32),
                            pltpu.VMEM((tn // min(tn, LANES), tk // int4_layout.GROUP, min(tn, LANES)),
                                       jnp.float32)]),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary"), vmem_limit_bytes=VMEM_LIMIT_BYTES),
        cost_estimate=cost,
        interpret=interpret,
    )(*schedule, x_PK, xsum_K3PG, packed_LEHN, scale_LEGN)
    return out_PN[dest_M]


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


class TritonTiling(NamedTuple):
    """Rows and columns per Triton program, and its warps and software-pipeline stages."""
    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 3


TRITON_DECODE = TritonTiling(16, 64)
TRITON_PREFILL = TritonTiling(64, 128)


def triton_tiling(m: int, e: int = 1) -> TritonTiling:
    """The default tiling for m rows over e experts: the 16 x 64 decode tile while experts average at most 16 rows
    (more programs fill the SMs; on an H200 it ran at 15-20% of the HBM floor where 64 x 128 tiles of mostly empty
    rows ran at 8%), else 64 x 128, which dequantizes each weight block once per 64 rows."""
    return TRITON_DECODE if m <= TRITON_DECODE.block_m * e else TRITON_PREFILL


def _interleave(a_RC: jax.Array, b_RC: jax.Array) -> jax.Array:
    """[R, C] and [R, C] -> [R, 2C] with a in the even columns and b in the odd (Triton's join, then a reshape)."""
    r, c = a_RC.shape
    return jnp.concatenate([a_RC[:, :, None], b_RC[:, :, None]], axis=2).reshape(r, 2 * c)


def _gmm_triton_kernel(starts_ref, ends_ref, expert_ref, tile_ref, num_visits_ref, layer_ref,
                       x_ref, pairs_ref, scale_ref, out_ref, *, bm: int, bn: int, planar: int,
                       blocks_per_split: int):
    """One (visit, column tile, K split) program: loop over its planar blocks and their scale groups, masked store
    of its float32 partial sums.

    Weights arrive as pairs of byte columns (byte_pairs): byte p of pair c is column 2c + p. The program splits
    each scale row the same way, keeps one accumulator per p, and interleaves the two once, before its store."""
    v, n_i, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    k, n = x_ref.shape[1], out_ref.shape[2]
    group = int4_layout.GROUP
    rows = min(group, planar // 2)  # packed rows per load: one scale group per nibble half
    bc = bn // 2  # column pairs per program

    @pl.when(v < num_visits_ref[0])
    def _visit():
        layer, expert, row0 = layer_ref[0], expert_ref[v], tile_ref[v] * bm
        row_M = row0 + jnp.arange(bm)
        mine_M = (row_M >= starts_ref[expert]) & (row_M < ends_ref[expert])
        col_ok_N = n_i * bn + jnp.arange(bn) < n
        pair_ok_C = n_i * bc + jnp.arange(bc) < n // 2
        pairs = pl.ds(n_i * bc, bc)

        def group_dots(k0, pair_GC, shift, acc_PMC):
            """acc + x's group at k0 times the nibbles at `shift` of each byte of the pairs, per byte."""
            x_MG = plgpu.load(x_ref.at[pl.ds(row0, bm), pl.ds(k0, rows)], mask=mine_M[:, None], other=0)
            s_1N = plgpu.load(scale_ref.at[layer, expert, pl.ds(k0 // group, 1), pl.ds(n_i * bn, bn)],
                              mask=col_ok_N[None, :], other=0)
            s_P1C = jax.lax.unstack(s_1N.reshape(1, bc, 2), axis=2)  # column 2c + p -> s_P1C[p][0, c]
            dt = x_MG.dtype  # bf16 on a GPU: packed HADD2 / HMUL2; the subtraction is exact, the scale rounds once
            out = []
            for p, acc_MC in enumerate(acc_PMC):
                nibble_GC = (pair_GC >> (8 * p + shift)) & 0xF
                u_GC = jax.lax.bitcast_convert_type(nibble_GC | BF16_128, jnp.bfloat16)  # 128 + u
                w_GC = (u_GC.astype(dt) - OFFSET) * s_P1C[p].astype(dt)
                out.append(acc_MC + jnp.dot(x_MG, w_GC, preferred_element_type=jnp.float32))
            return tuple(out)

        def planar_block(j, acc_PMC):
            for g in range(planar // 2 // rows):
                pair_GC = plgpu.load(
                    pairs_ref.at[layer, expert, pl.ds(j * planar // 2 + g * rows, rows), pairs],
                    mask=pair_ok_C[None, :], other=0)
                acc_PMC = group_dots(j * planar + g * rows, pair_GC, 0, acc_PMC)
                acc_PMC = group_dots(j * planar + planar // 2 + g * rows, pair_GC, 4, acc_PMC)
            return acc_PMC

        zeros = tuple(jnp.zeros((bm, bc), jnp.float32) for _ in range(2))
        first = split * blocks_per_split
        acc_PMC = jax.lax.fori_loop(first, jnp.minimum(first + blocks_per_split, k // planar), planar_block, zeros)
        plgpu.store(out_ref.at[split, pl.ds(row0, bm), pl.ds(n_i * bn, bn)], _interleave(*acc_PMC),
                    mask=mine_M[:, None] & col_ok_N[None, :])


def byte_pairs(packed: jax.Array) -> jax.Array:
    """uint8 [..., N] -> uint16 [..., N/2], the same bytes (a bitcast: no copy); byte p of pair c is column 2c + p.

    The Triton kernel reads its weights this way because Pallas' Triton lowering indexes an operand of at most
    2^32 bytes with signed 32-bit element offsets: past 2^31 one-byte elements (one layer's K2 down projection on
    one GPU is 2.8 GB) they wrap and the kernel reads other bytes. In pairs no offset passes 2^31."""
    *lead, n = packed.shape
    if n % 2:
        raise ValueError(f"INT4 weights for the GPU kernel need an even N (here {n})")
    return jax.lax.bitcast_convert_type(packed.reshape(*lead, n // 2, 2), jnp.uint16)


@functools.partial(jax.jit, static_argnames=("interpret", "split_k", "tiling"))
def grouped_int4_matmul_triton(x_MK, packed_EHN, scale_EGN, group_sizes_E, *, layer=None,
                               interpret: bool = False, split_k: int = 1,
                               tiling: TritonTiling | None = None) -> jax.Array:
    """GPU (Triton) form of grouped_int4_matmul: same arguments, same result. `split_k` programs share each
    (visit, column tile)'s K, each summing a contiguous run of planar blocks; their float32 partials are added
    after (more programs in flight when few experts are active). `tiling` overrides triton_tiling's choice."""
    m, k = x_MK.shape
    n = packed_EHN.shape[-1]
    tiling = tiling or triton_tiling(m, group_sizes_E.shape[0])
    bm, bn = tiling.block_m, tiling.block_n
    if bn % 2 or bm < 16:
        raise ValueError(f"Triton INT4 tiling {tiling}: block_n must be even and block_m at least 16 (a dot's rows)")
    planar = int4_layout.planar_block(k)
    blocks_per_split = pl.cdiv(k // planar, split_k)
    splits = pl.cdiv(k // planar, blocks_per_split)
    packed_LEHN, scale_LEGN, layer_1 = _with_layer_axis(packed_EHN, scale_EGN, layer)
    schedule = (*_visit_schedule(group_sizes_E, m, bm), layer_1)
    out_SMN = pl.pallas_call(
        functools.partial(_gmm_triton_kernel, bm=bm, bn=bn, planar=planar, blocks_per_split=blocks_per_split),
        out_shape=jax.ShapeDtypeStruct((splits, m, n), jnp.float32),
        grid=(schedule[2].shape[0], pl.cdiv(n, bn), splits),
        compiler_params=plgpu.CompilerParams(num_warps=tiling.num_warps, num_stages=tiling.num_stages),
        interpret=interpret,
    )(*schedule, x_MK, byte_pairs(packed_LEHN), scale_LEGN)
    return _zero_rows_past_sum(jnp.sum(out_SMN, axis=0).astype(x_MK.dtype), group_sizes_E)


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
