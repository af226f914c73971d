"""Absorbed MLA decode attention (flash-decoding) as Pallas kernels for TPU (Mosaic) and GPU (Triton).

The cache is one latent array per layer, kv [B, S, C]: c_kv in lanes [0, R), roped k_pe in [R, R+P), zeros
in [R+P, C). The query is laid out the same way, so one [H, C] x [C, bs] matmul gives q_lat.c_kv + q_pe.k_pe.
Each (sequence, split) program loops over its [bs, C] blocks below the sequence's length only, with
double-buffered manual DMAs, so a cache allocated for 256k tokens costs nothing past the tokens it holds.
A block is DMA'd from row min(start, S - bs) so it never reads past S; rows outside [start, length) are
masked, and only the blocks that need it pay for the mask. S is split into num_splits chunks with their
own online softmax; the partial outputs and log-sum-exps are combined outside the kernel.
`layer` (optional int32 scalar): kv is the stacked cache [L, B, S, C], read in place, never copied.
The Triton kernel runs one program per (head block, split, sequence) and loops only over the split's rows
below the sequence's length, loading c_kv and k_pe as two power-of-two lane slices of the same cache rows.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

BLOCK_S = 2048
LANES = 128
VMEM_LIMIT_BYTES = 48 * 1024 * 1024
TRITON_BLOCK_H = 16
TRITON_BLOCK_S = 32
TRITON_MIN_PROGRAMS = 264
TRITON_NUM_WARPS = 4
TRITON_NUM_STAGES = 2


def _block_s(s: int, block_s: int | None) -> int:
    """Rows of S per grid step: block_s (default BLOCK_S), or all of S when S is shorter."""
    bs = block_s or BLOCK_S
    return s if s <= bs else bs


def _attend(q_ref, kv_SC, m_ref, l_ref, acc_ref, lo, hi, *, sm_scale: float, mask: bool):
    """Online-softmax update with one kv block; with mask, only block rows in [lo, hi) count."""
    if mask:
        pos_S1 = jax.lax.broadcasted_iota(jnp.int32, (kv_SC.shape[0], 1), 0)
        kv_SC = jnp.where((pos_S1 >= lo) & (pos_S1 < hi), kv_SC, 0)
    s_HS = jax.lax.dot_general(q_ref[...], kv_SC, (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32) * sm_scale
    if mask:
        pos_1S = jax.lax.broadcasted_iota(jnp.int32, (1, kv_SC.shape[0]), 1)
        s_HS = jnp.where((pos_1S >= lo) & (pos_1S < hi), s_HS, -jnp.inf)
    m_prev_HL = m_ref[...]
    m_new_HL = jnp.maximum(m_prev_HL, jnp.max(s_HS, axis=1, keepdims=True))
    alpha_HL = jnp.exp(m_prev_HL - m_new_HL)
    p_HS = jnp.exp(s_HS - m_new_HL[:, :1])
    l_ref[...] = alpha_HL * l_ref[...] + jnp.sum(p_HS, axis=1, keepdims=True)
    m_ref[...] = m_new_HL
    acc_ref[...] = acc_ref[...] * alpha_HL[:, :1] + jnp.dot(p_HS.astype(kv_SC.dtype), kv_SC,
                                                            preferred_element_type=jnp.float32)


def _mla_kernel(lengths_ref, layer_ref, q_ref, kv_hbm, o_ref, lse_ref, kv_buf, sem, m_ref, l_ref, acc_ref, *,
                sm_scale: float, blocks_per_split: int):
    """One (sequence, split) program: double-buffered DMAs of the split's blocks below the length only."""
    b, split = pl.program_id(0), pl.program_id(1)
    bs, s = kv_buf.shape[1], kv_hbm.shape[2]
    length = lengths_ref[b]
    first_block = split * blocks_per_split
    count = jnp.clip(pl.cdiv(length, bs) - first_block, 0, blocks_per_split)
    m_ref[...] = jnp.full_like(m_ref, -jnp.inf)
    l_ref[...] = jnp.zeros_like(l_ref)
    acc_ref[...] = jnp.zeros_like(acc_ref)

    def row0(i):
        return jnp.minimum((first_block + i) * bs, s - bs)

    def dma(i, slot):
        return pltpu.make_async_copy(kv_hbm.at[layer_ref[0], b, pl.ds(row0(i), bs)], kv_buf.at[slot], sem.at[slot])

    @pl.when(count > 0)
    def _prefetch_first():
        dma(0, 0).start()

    def block(i, carry):
        slot = i % 2
        dma(i, slot).wait()

        @pl.when(i + 1 < count)
        def _prefetch_next():
            dma(i + 1, 1 - slot).start()

        lo, hi = (first_block + i) * bs - row0(i), length - row0(i)
        attend = functools.partial(_attend, q_ref, kv_buf[slot], m_ref, l_ref, acc_ref, lo, hi, sm_scale=sm_scale)
        jax.lax.cond((lo == 0) & (hi >= bs), functools.partial(attend, mask=False),
                     functools.partial(attend, mask=True))
        return carry

    jax.lax.fori_loop(0, count, block, 0)
    l_HL = l_ref[...]
    seen_HL = l_HL > 0
    o_ref[...] = acc_ref[:, :o_ref.shape[-1]] / jnp.where(seen_HL, l_HL, 1)[:, :1]
    lse_ref[...] = jnp.where(seen_HL, m_ref[...] + jnp.log(jnp.where(seen_HL, l_HL, 1)), -jnp.inf)


def _with_layer_axis(kv, layer):
    """(kv [L, B, S, C], layer [1]): a single layer's cache gets L = 1."""
    if layer is None:
        return kv[None], jnp.zeros((1,), jnp.int32)
    return kv, jnp.reshape(layer, (1,)).astype(jnp.int32)


def _combine(o_BsHR, lse_BsH, dtype) -> jax.Array:
    """Log-sum-exp combine of per-split normalized outputs; sequences with no keys give zeros."""
    lse_max_B1H = jnp.max(lse_BsH, axis=1, keepdims=True)
    w_BsH = jnp.exp(lse_BsH - jnp.where(jnp.isfinite(lse_max_B1H), lse_max_B1H, 0))
    total_BH = jnp.sum(w_BsH, axis=1)
    o_BHR = jnp.einsum("bsh,bshr->bhr", w_BsH, o_BsHR) / jnp.where(total_BH > 0, total_BH, 1)[..., None]
    return o_BHR.astype(dtype)


@functools.partial(jax.jit, static_argnames=("sm_scale", "interpret", "block_s", "num_splits"))
def mla_decode(q_lat_BHR, q_pe_BHP, kv_BSC, lengths_B, *, sm_scale: float, layer=None, interpret: bool = False,
               block_s: int | None = None, num_splits: int | None = None) -> jax.Array:
    """softmax((q_lat.c_kv + q_pe.k_pe) * sm_scale over s < length) @ c_kv -> o_lat [B, H, R] in q_lat's dtype."""
    b, h, r = q_lat_BHR.shape
    kv_LBSC, layer_1 = _with_layer_axis(kv_BSC, layer)
    s, c = kv_LBSC.shape[2:]
    bs = _block_s(s, block_s)
    num_blocks = pl.cdiv(s, bs)
    splits = min(num_blocks, num_splits or pl.cdiv(2, b))
    per_split = pl.cdiv(num_blocks, splits)
    q_BHC = jnp.concatenate(
        [q_lat_BHR, q_pe_BHP, jnp.zeros((b, h, c - r - q_pe_BHP.shape[-1]), q_lat_BHR.dtype)], axis=-1)

    def per_sequence(b_i, split, lengths_ref, layer_ref):
        return b_i, 0, 0

    def per_split_out(b_i, split, lengths_ref, layer_ref):
        return b_i, split, 0, 0

    o_BsHR, lse_BsHL = pl.pallas_call(
        functools.partial(_mla_kernel, sm_scale=sm_scale, blocks_per_split=per_split),
        out_shape=(jax.ShapeDtypeStruct((b, splits, h, r), jnp.float32),
                   jax.ShapeDtypeStruct((b, splits, h, LANES), jnp.float32)),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, splits),
            in_specs=[pl.BlockSpec((None, h, c), per_sequence), pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=[pl.BlockSpec((None, None, h, r), per_split_out),
                       pl.BlockSpec((None, None, h, LANES), per_split_out)],
            scratch_shapes=[pltpu.VMEM((2, bs, c), kv_LBSC.dtype), pltpu.SemaphoreType.DMA((2,)),
                            pltpu.VMEM((h, LANES), jnp.float32), pltpu.VMEM((h, LANES), jnp.float32),
                            pltpu.VMEM((h, c), jnp.float32)]),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel"), vmem_limit_bytes=VMEM_LIMIT_BYTES),
        cost_estimate=pl.CostEstimate(flops=4 * b * h * s * c, transcendentals=b * h * s,
                                      bytes_accessed=b * s * c * kv_LBSC.dtype.itemsize + 2 * q_BHC.nbytes),
        interpret=interpret,
    )(lengths_B.astype(jnp.int32), layer_1, q_BHC.astype(kv_LBSC.dtype), kv_LBSC)
    return _combine(o_BsHR, lse_BsHL[..., 0], q_lat_BHR.dtype)


def _mla_triton_kernel(lengths_ref, layer_ref, q_lat_ref, q_pe_ref, kv_ref, o_ref, lse_ref, *,
                       sm_scale: float, rows_per_split: int):
    """One (head block, split, sequence) program: online softmax over the split's rows below the length."""
    h_i, split, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bh, bs = TRITON_BLOCK_H, TRITON_BLOCK_S
    h, r = q_lat_ref.shape[1], q_lat_ref.shape[2]
    p = q_pe_ref.shape[2]
    heads = pl.ds(h_i * bh, bh)
    head_ok_H = h_i * bh + jnp.arange(bh) < h
    layer = layer_ref[0]
    start = split * rows_per_split
    stop = jnp.minimum(start + rows_per_split, lengths_ref[b])
    q_lat_HR = plgpu.load(q_lat_ref.at[b, heads, :], mask=head_ok_H[:, None], other=0)
    q_pe_HP = plgpu.load(q_pe_ref.at[b, heads, :], mask=head_ok_H[:, None], other=0)

    def block(i, carry):
        acc_HR, m_H, l_H = carry
        row0 = start + i * bs
        row_ok_S = row0 + jnp.arange(bs) < stop
        rows = pl.ds(row0, bs)
        ckv_SR = plgpu.load(kv_ref.at[layer, b, rows, pl.ds(0, r)], mask=row_ok_S[:, None], other=0)
        kpe_SP = plgpu.load(kv_ref.at[layer, b, rows, pl.ds(r, p)], mask=row_ok_S[:, None], other=0)
        s_HS = (jnp.dot(q_lat_HR, ckv_SR.T, preferred_element_type=jnp.float32)
                + jnp.dot(q_pe_HP, kpe_SP.T, preferred_element_type=jnp.float32)) * sm_scale
        s_HS = jnp.where(row_ok_S[None, :], s_HS, -jnp.inf)
        m_new_H = jnp.maximum(m_H, jnp.max(s_HS, axis=1))
        alpha_H = jnp.exp(m_H - m_new_H)
        p_HS = jnp.exp(s_HS - m_new_H[:, None])
        acc_HR = acc_HR * alpha_H[:, None] + jnp.dot(p_HS.astype(ckv_SR.dtype), ckv_SR,
                                                     preferred_element_type=jnp.float32)
        return acc_HR, m_new_H, alpha_H * l_H + jnp.sum(p_HS, axis=1)

    num_blocks = pl.cdiv(jnp.maximum(stop - start, 0), bs)
    init = (jnp.zeros((bh, r), jnp.float32), jnp.full((bh,), -jnp.inf, jnp.float32), jnp.zeros((bh,), jnp.float32))
    acc_HR, m_H, l_H = jax.lax.fori_loop(0, num_blocks, block, init)
    seen_H = l_H > 0
    safe_l_H = jnp.where(seen_H, l_H, 1)
    plgpu.store(o_ref.at[b, split, heads, :], acc_HR / safe_l_H[:, None], mask=head_ok_H[:, None])
    plgpu.store(lse_ref.at[b, split, heads], jnp.where(seen_H, m_H + jnp.log(safe_l_H), -jnp.inf), mask=head_ok_H)


@functools.partial(jax.jit, static_argnames=("sm_scale", "interpret", "num_splits"))
def mla_decode_triton(q_lat_BHR, q_pe_BHP, kv_BSC, lengths_B, *, sm_scale: float, layer=None,
                      interpret: bool = False, num_splits: int | None = None) -> jax.Array:
    """GPU (Triton) form of mla_decode: enough S splits to fill the GPU, then the same log-sum-exp combine."""
    b, h, r = q_lat_BHR.shape
    kv_LBSC, layer_1 = _with_layer_axis(kv_BSC, layer)
    s = kv_LBSC.shape[2]
    head_blocks = pl.cdiv(h, TRITON_BLOCK_H)
    max_splits = pl.cdiv(s, TRITON_BLOCK_S)
    splits = min(max_splits, num_splits or pl.cdiv(TRITON_MIN_PROGRAMS, b * head_blocks))
    rows_per_split = pl.cdiv(max_splits, splits) * TRITON_BLOCK_S
    o_BsHR, lse_BsH = pl.pallas_call(
        functools.partial(_mla_triton_kernel, sm_scale=sm_scale, rows_per_split=rows_per_split),
        out_shape=(jax.ShapeDtypeStruct((b, splits, h, r), jnp.float32),
                   jax.ShapeDtypeStruct((b, splits, h), jnp.float32)),
        grid=(head_blocks, splits, b),
        compiler_params=plgpu.CompilerParams(num_warps=TRITON_NUM_WARPS, num_stages=TRITON_NUM_STAGES),
        interpret=interpret,
    )(lengths_B.astype(jnp.int32), layer_1, q_lat_BHR.astype(kv_LBSC.dtype), q_pe_BHP.astype(kv_LBSC.dtype), kv_LBSC)
    return _combine(o_BsHR, lse_BsH, q_lat_BHR.dtype)


def mla_decode_reference(q_lat_BHR, q_pe_BHP, kv_BSC, lengths_B, *, sm_scale: float) -> jax.Array:
    """Plain jnp in fp32 over the whole cache with a length mask."""
    r, p = q_lat_BHR.shape[-1], q_pe_BHP.shape[-1]
    kv = kv_BSC.astype(jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    scores_BHS = (jnp.einsum("bhr,bsr->bhs", q_lat_BHR.astype(jnp.float32), kv[..., :r], precision=hi)
                  + jnp.einsum("bhp,bsp->bhs", q_pe_BHP.astype(jnp.float32), kv[..., r:r + p], precision=hi))
    valid_B1S = jnp.arange(kv.shape[1])[None, None, :] < lengths_B[:, None, None]
    probs_BHS = jax.nn.softmax(jnp.where(valid_B1S, scores_BHS * sm_scale, -jnp.inf), axis=-1)
    return jnp.einsum("bhs,bsr->bhr", probs_BHS, kv[..., :r], precision=hi).astype(q_lat_BHR.dtype)
