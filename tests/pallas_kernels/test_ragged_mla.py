"""Ragged paged MLA kernels, Mosaic and Triton (Pallas interpreter on CPU), against the plain-jnp reference,
and the reference against a dense numpy softmax attention."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_testutils import absorbed_queries, assert_attention_close, paged_pool_and_tables, wrapping_triton_operands

from pallas_kernels import ragged_mla as K

# o: float32 convex combinations of N(0,1) cache values (|o| <~ 4). Scores are fp32 sums of up to 576 products
# (sum |q_i k_i| ~ 370) in another order: ~2^-24 * 370 ~ 2e-5 apart before sm_scale, and o moves by that times
# the spread of c_kv (measured up to 1.3e-5 at K2 lanes), hence 1e-4 in fp32. bf16: both sides see the same bf16
# inputs with fp32 products; the kernels round the probabilities to bf16 before p @ c_kv (2^-9 relative per
# weight: |error| <= 2^-9 * max|c_kv| ~ 1e-2 at worst, 3.4e-3 measured).
O_ATOL = {jnp.float32: 1e-4, jnp.bfloat16: 1e-2}
# lse: the same score rounding (1.1e-5 measured) plus l from unrounded fp32 probabilities.
LSE_ATOL = 1e-4
KERNELS = {"mosaic": K.ragged_mla, "triton": K.ragged_mla_triton}


def _assert_close(got, ref, dtype):
    """o within O_ATOL[dtype] everywhere; lse -inf exactly where the reference's is, else within LSE_ATOL."""
    assert_attention_close(got, ref, o_atol=O_ATOL[dtype], lse_atol=LSE_ATOL)


CASES = {
    # T, H, N, table width, kv_len, q_start, dims (R, P, C), Mosaic tuning
    # 10 rows: the TPU kernel reads the table 8 rows at a time, the last block partial.
    "decode": (1, 8, 16, 8, [37, 0, 16, 100, 5, 64, 1, 90, 33, 8], [36, 0, 15, 99, 4, 63, 0, 89, 32, 7],
               (64, 32, 128), {}),
    # first chunk; a chunk crossing the page boundary at 24 whose last 4 queries pad past kv_len; an idle row.
    "prefill": (12, 4, 8, 6, [12, 29, 0], [0, 21, 0], (64, 32, 128), dict(block_t=4, pages_per_block=2)),
    "decode-split": (1, 16, 8, 32, [150], [149], (64, 32, 128), dict(pages_per_block=2, num_splits=3)),
    "k2-lanes": (3, 8, 16, 4, [40, 7], [37, 4], (512, 64, 640), {}),
    # C - R = 96, not a power of two: the Triton kernel's second lane block overlaps c_kv and masks it off.
    "narrow-rope": (2, 4, 8, 4, [20, 9], [18, 7], (32, 8, 128), {}),
}


@pytest.mark.parametrize("kernel", ["mosaic", "triton"])
@pytest.mark.parametrize("case,dtype", [("decode", jnp.bfloat16), ("prefill", jnp.float32), ("prefill", jnp.bfloat16),
                                        ("decode-split", jnp.float32), ("k2-lanes", jnp.bfloat16),
                                        ("narrow-rope", jnp.float32)])
def test_matches_reference(rng, case, dtype, kernel):
    t, h, n, width, kv_len, q_start, dims, tuning = CASES[case]
    layer = int(rng.integers(1, 3))
    kv, table, kv_len = paged_pool_and_tables(rng, kv_len=kv_len, n=n, width=width, layers=3, layer=layer,
                                              dims=dims, dtype=dtype)
    q_start = jnp.asarray(q_start, jnp.int32)
    q = absorbed_queries(rng, len(kv_len), t, h, dims, dtype)
    args = (q, kv, table, kv_len, q_start, jnp.int32(layer), jnp.int32(0))
    kw = dict(sm_scale=float(rng.uniform(0.05, 0.2)), rank=dims[0])
    got = KERNELS[kernel](*args, **kw, interpret=True, **(tuning if kernel == "mosaic" else {}))
    _assert_close(got, K.ragged_mla_reference(*args, **kw), dtype)


@pytest.mark.parametrize("kernel", ["mosaic", "triton"])
def test_position_shards_combine_to_the_whole(rng, kernel):
    """Each of 3 position shards gets its strided slice of the table; lse-weighted shard outputs equal the whole.
    Row 1's 2 pages leave shard 2 with nothing to see (lse -inf), as short sequences do under a split."""
    stride, n, width, t, h, dims = 3, 8, 12, 6, 4, (64, 32, 128)
    kv, table, kv_len = paged_pool_and_tables(rng, kv_len=[70, 10], n=n, width=width, layers=2, layer=1,
                                              dims=dims, dtype=jnp.float32)
    q_start = jnp.asarray([64, 4], jnp.int32)
    q = absorbed_queries(rng, 2, t, h, dims, jnp.float32)
    kw = dict(sm_scale=0.15, rank=dims[0])
    run = functools.partial(KERNELS[kernel], interpret=True, **kw)
    shards = [run(q, kv, table[:, s::stride], kv_len, q_start, jnp.int32(1), jnp.int32(s), page_stride=stride)
              for s in range(stride)]
    assert np.isneginf(np.asarray(shards[2][1])[1]).all()
    lse_sBTH = np.stack([np.asarray(lse) for _, lse in shards])
    w_sBTH = np.exp(lse_sBTH - lse_sBTH.max(axis=0))
    o = sum(w[..., None] * np.asarray(o) for w, (o, _) in zip(w_sBTH, shards)) / w_sBTH.sum(axis=0)[..., None]
    lse = lse_sBTH.max(axis=0) + np.log(w_sBTH.sum(axis=0))
    whole = K.ragged_mla_reference(q, kv, table, kv_len, q_start, jnp.int32(1), jnp.int32(0), **kw)
    _assert_close((jnp.asarray(o), jnp.asarray(lse)), whole, jnp.float32)


def test_reference_against_dense_numpy(rng):
    """The reference against float64 numpy softmax over a dense cache built by placing the pages at their
    positions (shard 1 of 2: pages at positions 4..7, 12..15, ...), with a query that sees none of them and one
    past its row's kv_len (padding, which sees nothing)."""
    n, r, p, c, first, stride, t = 4, 8, 4, 16, 1, 2, 3
    kv, table, kv_len = paged_pool_and_tables(rng, kv_len=[18, 6], n=n, width=5, layers=2, layer=1,
                                              dims=(r, p, c), dtype=jnp.float32, page_first=first, stride=stride)
    q_start = jnp.asarray([16, 2], jnp.int32)
    q = absorbed_queries(rng, 2, t, 2, (r, p, c), jnp.float32)
    o, lse = K.ragged_mla_reference(q, kv, table, kv_len, q_start, jnp.int32(1), jnp.int32(first), sm_scale=0.3,
                                    rank=r, page_stride=stride)
    pool, q64, table = np.asarray(kv, np.float64)[1], np.asarray(q, np.float64), np.asarray(table)
    for b in range(2):
        dense = {}
        for m in range(table.shape[1]):
            for k in range(n):
                dense[(first + m * stride) * n + k] = pool[table[b, m], k]
        for ti in range(t):
            real = q_start[b] + ti < kv_len[b]
            keys = [pos for pos in sorted(dense) if real and pos < kv_len[b] and pos <= q_start[b] + ti]
            if not keys:
                assert np.isneginf(np.asarray(lse)[b, ti]).all() and not np.asarray(o)[b, ti].any()
                continue
            kv_SC = np.stack([dense[pos] for pos in keys])
            s_HS = q64[b, ti, :, :r + p] @ kv_SC[:, :r + p].T * 0.3
            e_HS = np.exp(s_HS - s_HS.max(-1, keepdims=True))
            np.testing.assert_allclose(np.asarray(o)[b, ti], e_HS @ kv_SC[:, :r] / e_HS.sum(-1, keepdims=True),
                                       atol=1e-5)
            np.testing.assert_allclose(np.asarray(lse)[b, ti], s_HS.max(-1) + np.log(e_HS.sum(-1)), atol=1e-5)
    assert np.isneginf(np.asarray(lse)[1, 0]).all() and np.isneginf(np.asarray(lse)[0, 2]).all()


def test_bad_shapes_are_named():
    q = jnp.zeros((2, 1, 4, 128))
    kv = jnp.zeros((1, 8, 8, 128))
    ok = (jnp.zeros((2, 3), jnp.int32), jnp.zeros(2, jnp.int32), jnp.zeros(2, jnp.int32), 0, 0)
    with pytest.raises(ValueError, match="kv_LPNC"):
        K.ragged_mla_reference(q, jnp.zeros((1, 8, 8, 96)), *ok, sm_scale=0.1, rank=64)
    with pytest.raises(ValueError, match="power of two"):
        K.ragged_mla_reference(q, jnp.zeros((1, 8, 6, 128)), *ok, sm_scale=0.1, rank=64)
    with pytest.raises(ValueError, match="table_BM"):
        K.ragged_mla_reference(q, kv, jnp.zeros((3, 3), jnp.int32), *ok[1:], sm_scale=0.1, rank=64)
    with pytest.raises(ValueError, match="kv_len_B"):
        K.ragged_mla_reference(q, kv, ok[0], jnp.zeros(3, jnp.int32), *ok[2:], sm_scale=0.1, rank=64)
    with pytest.raises(ValueError, match="rank must be a power of two"):
        K.ragged_mla_triton(q, kv, *ok, sm_scale=0.1, rank=48, interpret=True)


@pytest.mark.parametrize("pages", [400, 800, 40_000])  # 2.0, 4.0 and 200 GB
def test_triton_operands_are_indexed_within_32_bit_offsets(pages):
    """K2's pool (61 layers of 64-token pages, 640 lanes, bf16) below, inside and above the 2^31-2^32 byte range
    that Pallas' 32-bit Triton indexing cannot reach for one-byte elements: no operand's offsets wrap."""
    q = jax.ShapeDtypeStruct((64, 1, 64, 640), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((61, pages, 64, 640), jnp.bfloat16)
    rows = jax.ShapeDtypeStruct((64,), jnp.int32)
    args = (q, kv, jax.ShapeDtypeStruct((64, 512), jnp.int32), rows, rows, jax.ShapeDtypeStruct((), jnp.int32))
    fn = functools.partial(K.ragged_mla_triton, page_first=0, sm_scale=0.1, rank=512)
    operands, wrapping = wrapping_triton_operands(fn, *args)
    assert any(a.shape == kv.shape for a in operands) and not wrapping
