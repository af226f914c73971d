"""The native CPU ragged paged MLA kernel against ragged_mla_reference, its errors, its dispatch, and proof on the
compiled program that it gathers nothing the size of the page tables."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_testutils import absorbed_queries, assert_attention_close, paged_pool_and_tables

from pallas_kernels import cpu_build, dispatch
from pallas_kernels import cpu_ragged_mla as C
from pallas_kernels import ragged_mla as K

pytestmark = pytest.mark.skipif(not cpu_build.available(), reason="no C++ compiler: the native kernel cannot be built")

# Both sides compute in float32 from the same values (a bf16 pool widens exactly), so one tolerance serves both
# pool dtypes: scores are fp32 sums of up to 576 products (sum |q_i k_i| ~ 370) in another order, ~2^-24 * 370
# ~ 2e-5 apart before sm_scale, and o moves by that times the spread of c_kv, hence 1e-4 (as test_ragged_mla's
# float32 bound). lse: the same score rounding plus l summed in another order.
O_ATOL = 1e-4
LSE_ATOL = 1e-4
JUNK_PAGE_IDS = (-7, 1 << 30)

CASES = {
    # T, H, N, table width, kv_len, q_start, dims (R, P, C)
    # ragged decode rows (4 heads: scores by direct dot products), idle rows (kv_len 0), a query at the last slot
    # of a page.
    "decode": (1, 4, 16, 8, [37, 0, 16, 100, 5, 64, 1, 90, 33, 0], [36, 0, 15, 99, 4, 63, 0, 89, 32, 0],
               (64, 32, 128)),
    # chunks starting mid-page: the first chunk; one crossing a page boundary whose last queries pad past kv_len;
    # an idle row; 40 tokens x 5 heads (3 token blocks per row, 4 + 1 heads per register block).
    "prefill": (40, 5, 8, 12, [40, 60, 0, 47], [0, 21, 0, 9], (64, 32, 128)),
    # one long row: its heads are split among threads.
    "one-row": (3, 16, 32, 32, [700], [697], (64, 32, 128)),
    "k2-lanes": (3, 8, 16, 4, [40, 7], [37, 4], (512, 64, 640)),
    # long prefill chunks (the kernel runs them too): one mid-prompt, one from position 0 padded past its kv_len.
    "long-chunks": (300, 4, 32, 24, [700, 290], [400, 0], (64, 32, 128)),
    # lane counts off the 8-lane vectors: C = 44 and R = 28 take the scalar tails.
    "odd-lanes": (2, 3, 8, 5, [20, 9, 33], [18, 7, 31], (28, 8, 44)),
    # R = 48 over 30 query rows: p @ kv takes one pair of 16-lane vectors, then a scalar tail (with AVX-512).
    "wide-tail": (5, 6, 8, 6, [45, 30], [40, 26], (48, 16, 80)),
}


def _with_junk(table_BM, kv_len_B, n: int, page_first: int = 0, stride: int = 1):
    """The table with out-of-range ids in idle rows (kv_len 0) and past every row's last page."""
    table = np.array(table_BM)
    for b, length in enumerate(np.asarray(kv_len_B)):
        pages = -(-max(-(-int(length) // n) - page_first, 0) // stride)
        table[b, pages:] = np.resize(JUNK_PAGE_IDS, table.shape[1] - pages)
    return jnp.asarray(table)


def _run_both(q, kv, table, kv_len, q_start, layer, page_first, width=None, **kw):
    """The kernel (jitted) and the reference on the same inputs; with `width`, the kernel's q and pool hold NaN in the
    padding lanes from `width` on (the reference's hold zeros), so reading any of them would show."""
    args = (q, kv, table, kv_len, q_start, jnp.int32(layer), jnp.int32(page_first))
    ref = K.ragged_mla_reference(*args, **kw)
    if width is not None:
        q, kv = (x.at[..., width:].set(jnp.nan) for x in (q, kv))
    got = jax.jit(lambda *a: C.ragged_mla(*a, width=width, **kw))(q, kv, *args[2:])
    return got, ref


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matches_reference(rng, case, dtype):
    t, h, n, width, kv_len, q_start, dims = CASES[case]
    layer = int(rng.integers(0, 3))
    kv, table, kv_len = paged_pool_and_tables(rng, kv_len=kv_len, n=n, width=width, layers=3, layer=layer, dims=dims,
                                              dtype=dtype)
    q = absorbed_queries(rng, len(kv_len), t, h, dims, jnp.float32)
    got, ref = _run_both(q, kv, _with_junk(table, kv_len, n), kv_len, jnp.asarray(q_start, jnp.int32), layer, 0,
                         width=dims[0] + dims[1], sm_scale=float(rng.uniform(0.05, 0.2)), rank=dims[0])
    assert_attention_close(got, ref, o_atol=O_ATOL, lse_atol=LSE_ATOL)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_position_shards_match_reference(rng, dtype):
    """Each of 3 position shards (page_first = shard, page_stride 3) over its strided slice of the table; row 1's
    2 pages leave shard 2 with nothing to see (lse -inf)."""
    stride, n, width, t, h, dims = 3, 8, 12, 6, 4, (64, 32, 128)
    kv, table, kv_len = paged_pool_and_tables(rng, kv_len=[70, 10, 0], n=n, width=width, layers=2, layer=1,
                                              dims=dims, dtype=dtype)
    q_start = jnp.asarray([64, 4, 0], jnp.int32)
    q = absorbed_queries(rng, 3, t, h, dims, jnp.float32)
    for shard in range(stride):
        local = _with_junk(table[:, shard::stride], kv_len, n, shard, stride)
        got, ref = _run_both(q, kv, local, kv_len, q_start, 1, shard, sm_scale=0.15, rank=dims[0], page_stride=stride)
        assert_attention_close(got, ref, o_atol=O_ATOL, lse_atol=LSE_ATOL)
        assert np.isneginf(np.asarray(got[1])[2]).all()
    assert np.isneginf(np.asarray(got[1])[1]).all()


def _temp_bytes(fn, width: int, *, b=4, t=1, h=4, n=16, c=128, pages=2048) -> int:
    """Temporary bytes of fn compiled for a [b, width] page table over a [2, pages, n, c] bf16 pool."""
    specs = (jax.ShapeDtypeStruct((b, t, h, c), jnp.float32), jax.ShapeDtypeStruct((2, pages, n, c), jnp.bfloat16),
             jax.ShapeDtypeStruct((b, width), jnp.int32), jax.ShapeDtypeStruct((b,), jnp.int32),
             jax.ShapeDtypeStruct((b,), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32),
             jax.ShapeDtypeStruct((), jnp.int32))
    compiled = jax.jit(lambda *a: fn(*a, sm_scale=0.1, rank=64)).lower(*specs).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_temporaries_do_not_grow_with_table_width():
    """The compiled kernel's temporaries are the same for 8 and 512 table pages (nothing gathered); the
    reference's grow with the width (the measure sees a gather: 4 rows x 8192 keys x 128 lanes in f32 is 16 MiB)."""
    narrow, wide = _temp_bytes(C.ragged_mla, 8), _temp_bytes(C.ragged_mla, 512)
    assert wide <= narrow + 1024, (narrow, wide)
    assert _temp_bytes(K.ragged_mla_reference, 512) > 16 * 2**20 > 100 * wide


def test_dispatch_native_runs_the_kernel(rng, kernel_env):
    """In native mode dispatch.ragged_mla lowers to the custom call, for long prefill chunks too; in xla mode to the
    reference (no call)."""
    dims, n = (64, 32, 128), 16
    kv, table, kv_len = paged_pool_and_tables(rng, kv_len=[30, 3], n=n, width=4, layers=1, layer=0, dims=dims,
                                              dtype=jnp.float32)
    args = (absorbed_queries(rng, 2, 2, 4, dims, jnp.float32), kv, table, kv_len, jnp.asarray([28, 1], jnp.int32),
            jnp.int32(0), jnp.int32(0))
    ref = K.ragged_mla_reference(*args, sm_scale=0.1, rank=64)
    for mode, calls in (("native", True), ("xla", False)):
        kernel_env(mode)
        fn = jax.jit(lambda *a: dispatch.ragged_mla(*a, sm_scale=0.1, rank=64))
        assert (cpu_build.TARGETS["ragged_mla"] in fn.lower(*args).as_text()) == calls
        assert_attention_close(fn(*args), ref, o_atol=O_ATOL, lse_atol=LSE_ATOL)
    kernel_env("native")
    long_q = jnp.zeros((2, 512, 1, 128), jnp.float32)
    fn = jax.jit(lambda *a: dispatch.ragged_mla(*a, sm_scale=0.1, rank=64))
    assert cpu_build.TARGETS["ragged_mla"] in fn.lower(long_q, *args[1:]).as_text()


def test_bad_inputs_are_errors():
    q = jnp.ones((2, 1, 4, 128), jnp.float32)
    kv = jnp.ones((2, 8, 16, 128), jnp.float32)
    table = jnp.asarray([[0, 9], [1, 2]], jnp.int32)
    kw = dict(sm_scale=0.1, rank=64)
    lens, starts = jnp.asarray([20, 5], jnp.int32), jnp.asarray([19, 4], jnp.int32)
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"page table row 0 holds a page id outside the pool \[0, 8\)"):
        jax.block_until_ready(C.ragged_mla(q, kv, table, lens, starts, 0, 0, **kw))
    with pytest.raises(jax.errors.JaxRuntimeError, match="layer index out of range"):
        jax.block_until_ready(C.ragged_mla(q, kv, table, lens.at[0].set(16), starts, 2, 0, **kw))
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        C.ragged_mla(q, kv.astype(jnp.float16), table, lens, starts, 0, 0, **kw)
    with pytest.raises(ValueError, match="kv_LPNC"):
        C.ragged_mla(q, kv[..., :96], table, lens, starts, 0, 0, **kw)
    with pytest.raises(ValueError, match=r"width 60 must be in \[rank, C\] = \[64, 128\]"):
        C.ragged_mla(q, kv, table, lens, starts, 0, 0, width=60, **kw)
