"""Ragged paged MLA attention, absorbed, for decode and prefill chunks: Pallas kernels for TPU (Mosaic) and
GPU (Triton) beside their plain-jnp reference.

The KV cache is a page pool per layer stack, kv [L, P, N, C]: c_kv in lanes [0, R), roped k_pe in [R, R+64),
zeros up to C. Queries come absorbed (q_lat = q_nope @ W_UK) and laid out like the cache lanes, so one
[rows, C] x [C, keys] matmul gives q_lat.c_kv + q_pe.k_pe and p @ kv[:, :R] gives the latent output.
Row b's local page m (table[b, m]) holds the keys at positions (page_first + m * page_stride) * N + [0, N).
Query t of row b sits at position q_start[b] + t and sees keys at positions <= its own and < kv_len[b]; a query at
or past kv_len[b] is padding (a prompt chunk's tail) and sees none, so it costs nothing.
Every loop stops at the last page a (row, query block) can see, min(kv_len, q_start + last query + 1), so a
table sized for 256k tokens costs nothing past what the row holds, and temporaries depend only on the
chunk and the block sizes. Outputs are float32 o [B, T, H, R] and lse [B, T, H] (-inf and o = 0 where a
query sees no key), so callers combine position shards by log-sum-exp.

Why prefill chunks are scored absorbed too (K2: H = 64 heads, R = 512, rope 64, nope 128, v 128), per layer
for a chunk of T queries against S cached keys:
- absorbed: T*H*S*(2*512+64)*2 = 2176*T*H*S FLOPs (the TPU kernel multiplies the 64 zero lanes too: 2304).
- expanded (per-head K of 128+64 dims, V of 128): T*H*S*(192+128)*2 = 640*T*H*S FLOPs, plus expanding the
  S cached latents through kv_b for every chunk: 2*S*H*256*512 = 262144*S*H FLOPs.
  Absorbed is cheaper for T < 171; at T = 512 it does 1.9x the FLOPs (1.11 M vs 0.59 M per key and head),
  and prefilling a long prompt in 512-token chunks costs about 1.9x the attention FLOPs of expanded.
What it buys: one kernel and one cache format for decode and prefill, no kv_b weights in the kernel, and
nothing per head the size of the context. Expanded needs per-head K/V for every visible key: 256 bf16 values
per key and head, 4.3 GB per layer at S = 131072, H = 64 if written to HBM per chunk, or blocks of
keys x heads x 256 in VMEM (16 MiB for 512 keys x 64 heads) plus the 16 MiB of W_UK|W_UV for 64 heads.
A prefill TPU program here (512 query rows = 8 tokens x 64 heads or 64 x 8, blocks of 512 keys) holds q
640 KiB, a 512x512 f32 accumulator 1 MiB, two kv buffers 1.25 MiB and 512x512 f32 scores: the v5e AOT
compile needs 10.0 MiB of VMEM with the pipeline's double buffers (decode programs, 64 or 8 rows over blocks
of 2048 keys: 15 MiB). It is compute-bound at 2304*512/1280 = 922 FLOPs per byte of kv read, above the
ridge of v5e, v5p and v6e (240, 166 and 560 FLOPs per HBM byte).

TPU: grid (row, query block, key split); the pool stays in HBM (memory_space=ANY) and each block's whole
pages are fetched by double-buffered manual DMAs addressed through the table and the scalar-prefetched layer.
The table comes into SMEM TABLE_ROWS rows at a time (whole [B, M] tables outgrow the 1 MiB of SMEM at B * M > 250k);
the causal and length masks run only on blocks that need them. Split-K (flash decoding) when there are
fewer (row, query block) programs than TensorCores; splits are combined by lse in the wrapper.
GPU: one Triton program per (query-row block, split, row) walks the split's pages one at a time, loading the
page id from the table and c_kv and lanes [R, C) as two power-of-two lane blocks with masked loads (the second
block ends at C and masks off lanes below R, so C - R need not be a power of two).
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

TPU_PAGE_SIZE = 256  # 320 KiB bf16 pages: DMAs big enough to stream HBM; 2 per prefill block, 8 per decode block.
GPU_PAGE_SIZE = 64  # one page = one Triton key block: 64 x 640 bf16 = 80 KiB, 2 pipeline stages fit an SM.
LANES = 128
BLOCK_ROWS = 512
BLOCK_SCORES = 512 * 512
MAX_BLOCK_KEYS = 2048
MIN_PROGRAMS = 2
TABLE_ROWS = 8
VMEM_LIMIT_BYTES = 32 * 1024 * 1024
TRITON_MIN_PROGRAMS = 264
TRITON_NUM_STAGES = 2


def check_inputs(q_BTHC, kv_LPNC, table_BM, kv_len_B, q_start_B, rank: int) -> None:
    """Raises ValueError naming the argument whose shape or dtype does not fit the others."""
    b, _, _, c = q_BTHC.shape
    n = kv_LPNC.shape[2]
    if kv_LPNC.ndim != 4 or kv_LPNC.shape[3] != c:
        raise ValueError(f"kv_LPNC {kv_LPNC.shape} must be [L, P, N, C] with C = q_BTHC's last dim {c}")
    if n < 1 or n & (n - 1):
        raise ValueError(f"page size N = {n} (kv_LPNC dim 2) must be a power of two")
    if table_BM.ndim != 2 or table_BM.shape[0] != b or not jnp.issubdtype(table_BM.dtype, jnp.integer):
        raise ValueError(f"table_BM {table_BM.shape} {table_BM.dtype} must be integer [B={b}, M]")
    for name, a in (("kv_len_B", kv_len_B), ("q_start_B", q_start_B)):
        if a.shape != (b,):
            raise ValueError(f"{name} {a.shape} must be [B={b}]")
    if not 0 < rank < c:
        raise ValueError(f"rank {rank} must be in (0, C={c})")


def _needed_pages(hi, first, n: int, stride: int, width: int):
    """Local pages holding any position < hi: (page_first + m * stride) * n < hi, capped at the table width."""
    pages_hi = pl.cdiv(jnp.maximum(hi, 0), n)
    return jnp.minimum(pl.cdiv(jnp.maximum(pages_hi - first, 0), stride), width)


def _combine(o_BsXR, lse_BsX) -> tuple[jax.Array, jax.Array]:
    """Log-sum-exp combine of per-split normalized outputs -> (o [B, X, R], lse [B, X]); no keys -> 0, -inf."""
    if o_BsXR.shape[1] == 1:
        return o_BsXR[:, 0], lse_BsX[:, 0]
    lse_max_B1X = jnp.max(lse_BsX, axis=1, keepdims=True)
    shift_B1X = jnp.where(jnp.isfinite(lse_max_B1X), lse_max_B1X, 0)
    w_BsX = jnp.exp(lse_BsX - shift_B1X)
    total_BX = jnp.sum(w_BsX, axis=1)
    safe_BX = jnp.where(total_BX > 0, total_BX, 1)
    o_BXR = jnp.einsum("bsx,bsxr->bxr", w_BsX, o_BsXR) / safe_BX[..., None]
    return o_BXR, jnp.where(total_BX > 0, shift_B1X[:, 0] + jnp.log(safe_BX), -jnp.inf)


def visible_limit(q_pos, kv_len):
    """The position below which a query at q_pos sees keys: its own + 1, at most kv_len; 0 for padding (q_pos >=
    kv_len)."""
    return jnp.where(q_pos < kv_len, jnp.minimum(kv_len, q_pos + 1), 0)


def _attend(q_ref, kv_KC, m_ref, l_ref, acc_ref, pos_of, hi, limit_X1, *, sm_scale: float, mask: bool):
    """Online-softmax update with one kv block; with mask, keys at pos >= hi are zeroed and a query row sees
    only keys at pos < its limit."""
    keys = kv_KC.shape[0]
    if mask:
        kv_KC = jnp.where(pos_of((keys, 1), 0) < hi, kv_KC, 0)
    s_XK = jax.lax.dot_general(q_ref[...], kv_KC, (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32) * sm_scale
    if mask:
        s_XK = jnp.where(pos_of((1, keys), 1) < limit_X1, s_XK, -jnp.inf)
    m_prev_XL = m_ref[...]
    m_new_XL = jnp.maximum(m_prev_XL, jnp.max(s_XK, axis=1, keepdims=True))
    shift_XL = jnp.where(m_new_XL == -jnp.inf, 0, m_new_XL)
    alpha_XL = jnp.exp(m_prev_XL - shift_XL)
    p_XK = jnp.exp(s_XK - shift_XL[:, :1])
    l_ref[...] = alpha_XL * l_ref[...] + jnp.sum(p_XK, axis=1, keepdims=True)
    m_ref[...] = m_new_XL
    acc_ref[...] = acc_ref[...] * alpha_XL[:, :1] + jnp.dot(
        p_XK.astype(kv_KC.dtype), kv_KC[:, :acc_ref.shape[1]], preferred_element_type=jnp.float32)


def _ragged_kernel(kv_len_ref, q_start_ref, layer_ref, first_ref, table_ref, q_ref, kv_hbm, o_ref, lse_ref,
                   kv_buf, sem, m_ref, l_ref, acc_ref, *, sm_scale: float, heads: int, block_t: int, tokens: int,
                   width: int, stride: int, pages_per_block: int):
    """One (row, query block, split) program: double-buffered page DMAs of the split's blocks it can see."""
    b, qb, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    n = kv_hbm.shape[2]
    kv_len, q_start, first, layer = kv_len_ref[b], q_start_ref[b], first_ref[0], layer_ref[0]
    t0 = qb * block_t
    hi = jnp.where(q_start + t0 < kv_len, jnp.minimum(kv_len, q_start + jnp.minimum(t0 + block_t, tokens)), 0)
    needed = _needed_pages(hi, first, n, stride, width)
    blocks = pl.cdiv(needed, pages_per_block)
    per_split = pl.cdiv(blocks, pl.num_programs(2))
    block0 = split * per_split
    count = jnp.clip(blocks - block0, 0, per_split)
    m_ref[...] = jnp.full_like(m_ref, -jnp.inf)
    l_ref[...] = jnp.zeros_like(l_ref)
    acc_ref[...] = jnp.zeros_like(acc_ref)

    def page_copies(i, slot, action):
        page0 = (block0 + i) * pages_per_block

        def one(j, carry):
            page_id = table_ref[jax.lax.rem(b, table_ref.shape[0]), page0 + j]
            copy = pltpu.make_async_copy(kv_hbm.at[layer, page_id], kv_buf.at[slot, pl.ds(j * n, n)], sem.at[slot])
            getattr(copy, action)()
            return carry

        jax.lax.fori_loop(0, jnp.minimum(pages_per_block, needed - page0), one, 0)

    @pl.when(count > 0)
    def _prefetch_first():
        page_copies(0, 0, "start")

    t_X1 = jax.lax.div(jax.lax.broadcasted_iota(jnp.int32, (q_ref.shape[0], 1), 0), heads)
    limit_X1 = visible_limit(q_start + t0 + t_X1, kv_len)

    def block(i, carry):
        slot = jax.lax.rem(i, 2)
        page_copies(i, slot, "wait")

        @pl.when(i + 1 < count)
        def _prefetch_next():
            page_copies(i + 1, 1 - slot, "start")

        page0 = (block0 + i) * pages_per_block

        def pos_of(shape, dim):
            key = jax.lax.broadcasted_iota(jnp.int32, shape, dim)
            if stride == 1:
                return (first + page0) * n + key
            return (first + (page0 + jax.lax.div(key, n)) * stride) * n + jax.lax.rem(key, n)

        last = (first + (page0 + pages_per_block - 1) * stride) * n + n - 1
        attend = functools.partial(_attend, q_ref, kv_buf[slot], m_ref, l_ref, acc_ref, pos_of, hi, limit_X1,
                                   sm_scale=sm_scale)
        whole = (last < jnp.minimum(kv_len, q_start + t0 + 1)) & (q_start + jnp.minimum(t0 + block_t, tokens) <= kv_len)
        jax.lax.cond(whole, functools.partial(attend, mask=False), functools.partial(attend, mask=True))
        return carry

    jax.lax.fori_loop(0, count, block, 0)
    l_XL = l_ref[...]
    seen_XL = l_XL > 0
    safe_XL = jnp.where(seen_XL, l_XL, 1)
    o_ref[...] = acc_ref[...] / safe_XL[:, :1]
    lse_XL = jnp.where(seen_XL, m_ref[...] + jnp.log(safe_XL), -jnp.inf)
    lse_ref[...] = jnp.transpose(lse_XL)[:1]


def _block_t(t: int, h: int, block_t: int | None) -> int:
    """Query tokens per TPU program, at most t: block_t, else about BLOCK_ROWS rows (tokens x heads) in a
    multiple of 128 rows, so the lane-dense lse block is legal."""
    unit = LANES // math.gcd(h, LANES)
    return min(t, block_t or max(unit, BLOCK_ROWS // h // unit * unit))


def _scalars(kv_len_B, q_start_B, layer, page_first):
    """int32 scalar operands: kv_len, q_start, layer [1], page_first [1]."""
    return (kv_len_B.astype(jnp.int32), q_start_B.astype(jnp.int32),
            jnp.reshape(layer, (1,)).astype(jnp.int32), jnp.reshape(page_first, (1,)).astype(jnp.int32))


@functools.partial(jax.jit, static_argnames=("sm_scale", "rank", "page_stride", "interpret", "block_t",
                                             "pages_per_block", "num_splits"))
def ragged_mla(q_BTHC, kv_LPNC, table_BM, kv_len_B, q_start_B, layer, page_first, *, sm_scale: float,
               rank: int, page_stride: int = 1, interpret: bool = False, block_t: int | None = None,
               pages_per_block: int | None = None, num_splits: int | None = None) -> tuple[jax.Array, jax.Array]:
    """-> (o_BTHR float32, lse_BTH float32): causal, length-masked attention of the queries over their pages."""
    check_inputs(q_BTHC, kv_LPNC, table_BM, kv_len_B, q_start_B, rank)
    b, t, h, c = q_BTHC.shape
    n, width = kv_LPNC.shape[2], table_BM.shape[1]
    bt = _block_t(t, h, block_t)
    q_blocks = pl.cdiv(t, bt)
    rows = bt * h
    ppb = min(pages_per_block or max(1, min(MAX_BLOCK_KEYS, BLOCK_SCORES // rows) // n), width)
    splits = min(num_splits or pl.cdiv(MIN_PROGRAMS, b * q_blocks), pl.cdiv(width, ppb))
    table_rows = min(b, TABLE_ROWS)

    def row_map(b_i, qb, split, *_):
        return jax.lax.div(b_i, table_rows), 0

    def q_map(b_i, qb, split, *_):
        return b_i, qb, 0

    def out_map(b_i, qb, split, *_):
        return b_i, split, qb, 0

    def lse_map(b_i, qb, split, *_):
        return b_i, split, 0, qb

    kernel = functools.partial(_ragged_kernel, sm_scale=sm_scale, heads=h, block_t=bt, tokens=t, width=width,
                               stride=page_stride, pages_per_block=ppb)
    o_BsXR, lse_Bs1X = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((b, splits, t * h, rank), jnp.float32),
                   jax.ShapeDtypeStruct((b, splits, 1, t * h), jnp.float32)),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(b, q_blocks, splits),
            in_specs=[pl.BlockSpec((table_rows, width), row_map, memory_space=pltpu.SMEM),
                      pl.BlockSpec((None, rows, c), q_map), pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=[pl.BlockSpec((None, None, rows, rank), out_map),
                       pl.BlockSpec((None, None, 1, rows), lse_map)],
            scratch_shapes=[pltpu.VMEM((2, ppb * n, c), kv_LPNC.dtype), pltpu.SemaphoreType.DMA((2,)),
                            pltpu.VMEM((rows, LANES), jnp.float32), pltpu.VMEM((rows, LANES), jnp.float32),
                            pltpu.VMEM((rows, rank), jnp.float32)]),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel"),
                                             vmem_limit_bytes=VMEM_LIMIT_BYTES),
        cost_estimate=pl.CostEstimate(
            flops=2 * b * t * h * width * n * (c + rank), transcendentals=b * t * h * width * n,
            bytes_accessed=b * q_blocks * width * n * c * kv_LPNC.dtype.itemsize + q_BTHC.nbytes
            + b * splits * t * h * (rank + 1) * 4),
        interpret=interpret,
    )(*_scalars(kv_len_B, q_start_B, layer, page_first), table_BM.astype(jnp.int32),
      q_BTHC.reshape(b, t * h, c).astype(kv_LPNC.dtype), kv_LPNC)
    o_BXR, lse_BX = _combine(o_BsXR, lse_Bs1X[:, :, 0])
    return o_BXR.reshape(b, t, h, rank), lse_BX.reshape(b, t, h)


def _triton_plan(t: int) -> tuple[int, int]:
    """(query rows, warps) per Triton program: 16 rows, 4 warps for decode; 32 rows, 8 warps for chunks."""
    return (16, 4) if t == 1 else (32, 8)


def triton_splits(b: int, t: int, h: int, width: int, num_splits: int | None = None) -> int:
    """Page splits of the Triton kernel for b rows of t queries over h heads and `width` table columns: num_splits,
    by default as many as give TRITON_MIN_PROGRAMS programs; never more than the table has columns."""
    return min(num_splits or pl.cdiv(TRITON_MIN_PROGRAMS, b * pl.cdiv(t * h, _triton_plan(t)[0])), width)


def _pe_width(c: int, rank: int) -> int:
    """Lanes of the Triton kernel's second block, [C - width, C): the power of two that covers [rank, C)."""
    return 1 << max(c - rank - 1, 0).bit_length()


def _ragged_triton_kernel(table_ref, kv_len_ref, q_start_ref, layer_ref, first_ref, q_ref, kv_ref, o_ref,
                          lse_ref, *, sm_scale: float, heads: int, rank: int, stride: int, block_rows: int):
    """One (query-row block, split, row) program: online softmax over the split's pages, one page per step."""
    rb, split, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    x, c = q_ref.shape[1], q_ref.shape[2]
    n, width = kv_ref.shape[2], table_ref.shape[1]
    pe = _pe_width(c, rank)
    kv_len, q_start, first, layer = kv_len_ref[b], q_start_ref[b], first_ref[0], layer_ref[0]
    row0 = rb * block_rows
    rows = pl.ds(row0, block_rows)
    row_ok_X = row0 + jnp.arange(block_rows) < x
    limit_X = visible_limit(q_start + (row0 + jnp.arange(block_rows)) // heads, kv_len)
    hi = jnp.where(q_start + row0 // heads < kv_len,
                   jnp.minimum(kv_len, q_start + (jnp.minimum(row0 + block_rows, x) - 1) // heads + 1), 0)
    needed = _needed_pages(hi, first, n, stride, width)
    per_split = pl.cdiv(needed, pl.num_programs(1))
    page0 = split * per_split
    q_lat_XR = plgpu.load(q_ref.at[b, rows, pl.ds(0, rank)], mask=row_ok_X[:, None], other=0)
    lane_ok_1E = (c - pe + jnp.arange(pe) >= rank)[None, :]  # the block's lanes below rank are c_kv's: left out
    q_pe_XE = plgpu.load(q_ref.at[b, rows, pl.ds(c - pe, pe)], mask=row_ok_X[:, None] & lane_ok_1E, other=0)

    def page(m, carry):
        acc_XR, m_X, l_X = carry
        page_id = table_ref[b, m]
        pos_N = (first + m * stride) * n + jnp.arange(n)
        live_N1 = (pos_N < hi)[:, None]
        ckv_NR = plgpu.load(kv_ref.at[layer, page_id, :, pl.ds(0, rank)], mask=live_N1, other=0)
        kpe_NE = plgpu.load(kv_ref.at[layer, page_id, :, pl.ds(c - pe, pe)], mask=live_N1 & lane_ok_1E, other=0)
        s_XN = (jnp.dot(q_lat_XR, ckv_NR.T, preferred_element_type=jnp.float32)
                + jnp.dot(q_pe_XE, kpe_NE.T, preferred_element_type=jnp.float32)) * sm_scale
        s_XN = jnp.where(pos_N[None, :] < limit_X[:, None], s_XN, -jnp.inf)
        m_new_X = jnp.maximum(m_X, jnp.max(s_XN, axis=1))
        shift_X = jnp.where(m_new_X == -jnp.inf, 0, m_new_X)
        alpha_X = jnp.exp(m_X - shift_X)
        p_XN = jnp.exp(s_XN - shift_X[:, None])
        acc_XR = acc_XR * alpha_X[:, None] + jnp.dot(p_XN.astype(ckv_NR.dtype), ckv_NR,
                                                     preferred_element_type=jnp.float32)
        return acc_XR, m_new_X, alpha_X * l_X + jnp.sum(p_XN, axis=1)

    init = (jnp.zeros((block_rows, rank), jnp.float32), jnp.full((block_rows,), -jnp.inf, jnp.float32),
            jnp.zeros((block_rows,), jnp.float32))
    acc_XR, m_X, l_X = jax.lax.fori_loop(page0, jnp.minimum(page0 + per_split, needed), page, init)
    seen_X = l_X > 0
    safe_X = jnp.where(seen_X, l_X, 1)
    plgpu.store(o_ref.at[b, split, rows, :], acc_XR / safe_X[:, None], mask=row_ok_X[:, None])
    plgpu.store(lse_ref.at[b, split, rows], jnp.where(seen_X, m_X + jnp.log(safe_X), -jnp.inf), mask=row_ok_X)


@functools.partial(jax.jit, static_argnames=("sm_scale", "rank", "page_stride", "interpret", "num_splits"))
def ragged_mla_triton(q_BTHC, kv_LPNC, table_BM, kv_len_B, q_start_B, layer, page_first, *, sm_scale: float,
                      rank: int, page_stride: int = 1, interpret: bool = False,
                      num_splits: int | None = None) -> tuple[jax.Array, jax.Array]:
    """GPU (Triton) form of ragged_mla: page splits to fill the GPU, then the same log-sum-exp combine."""
    check_inputs(q_BTHC, kv_LPNC, table_BM, kv_len_B, q_start_B, rank)
    b, t, h, c = q_BTHC.shape
    width = table_BM.shape[1]
    if rank & (rank - 1) or _pe_width(c, rank) > c:
        raise ValueError(f"Triton loads lanes [0, rank={rank}) and the power-of-two block ending at C={c} that holds "
                         "[rank, C) as blocks: rank must be a power of two, and so large a block must fit in C")
    block_rows, warps = _triton_plan(t)
    row_blocks = pl.cdiv(t * h, block_rows)
    splits = triton_splits(b, t, h, width, num_splits)
    kv_len, q_start, layer_1, first_1 = _scalars(kv_len_B, q_start_B, layer, page_first)
    o_BsXR, lse_BsX = pl.pallas_call(
        functools.partial(_ragged_triton_kernel, sm_scale=sm_scale, heads=h, rank=rank, stride=page_stride,
                          block_rows=block_rows),
        out_shape=(jax.ShapeDtypeStruct((b, splits, t * h, rank), jnp.float32),
                   jax.ShapeDtypeStruct((b, splits, t * h), jnp.float32)),
        grid=(row_blocks, splits, b),
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=TRITON_NUM_STAGES),
        interpret=interpret,
    )(table_BM.astype(jnp.int32), kv_len, q_start, layer_1, first_1, q_BTHC.reshape(b, t * h, c).astype(kv_LPNC.dtype),
      kv_LPNC)
    o_BXR, lse_BX = _combine(o_BsXR, lse_BsX)
    return o_BXR.reshape(b, t, h, rank), lse_BX.reshape(b, t, h)


def ragged_mla_reference(q_BTHC, kv_LPNC, table_BM, kv_len_B, q_start_B, layer, page_first, *, sm_scale: float,
                         rank: int, page_stride: int = 1) -> tuple[jax.Array, jax.Array]:
    """Plain jnp in float32: gathers the row's pages (the table width given) and masks by position."""
    check_inputs(q_BTHC, kv_LPNC, table_BM, kv_len_B, q_start_B, rank)
    b, t, _, c = q_BTHC.shape
    n, width = kv_LPNC.shape[2], table_BM.shape[1]
    hi = jax.lax.Precision.HIGHEST
    pos_S = ((page_first + jnp.arange(width) * page_stride)[:, None] * n + jnp.arange(n)).reshape(-1)
    live_BS = pos_S[None, :] < kv_len_B[:, None]
    kv_BSC = jnp.where(live_BS[..., None], kv_LPNC[layer, table_BM].reshape(b, width * n, c).astype(jnp.float32), 0)
    limit_BT = visible_limit(q_start_B[:, None] + jnp.arange(t), kv_len_B[:, None])
    visible_BTS = pos_S[None, None, :] < limit_BT[..., None]
    s_BTHS = jnp.einsum("bthc,bsc->bths", q_BTHC.astype(jnp.float32), kv_BSC, precision=hi) * sm_scale
    s_BTHS = jnp.where(visible_BTS[:, :, None, :], s_BTHS, -jnp.inf)
    m_BTH = jnp.max(s_BTHS, axis=-1)
    shift_BTH = jnp.where(jnp.isfinite(m_BTH), m_BTH, 0)
    p_BTHS = jnp.exp(s_BTHS - shift_BTH[..., None])
    l_BTH = jnp.sum(p_BTHS, axis=-1)
    safe_BTH = jnp.where(l_BTH > 0, l_BTH, 1)
    o_BTHR = jnp.einsum("bths,bsr->bthr", p_BTHS, kv_BSC[..., :rank], precision=hi) / safe_BTH[..., None]
    return o_BTHR, jnp.where(l_BTH > 0, shift_BTH + jnp.log(safe_BTH), -jnp.inf)
