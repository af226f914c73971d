"""The native CPU grouped matmul against lax.ragged_dot and the INT4 reference, and its errors."""

import platform
import re
import subprocess
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_testutils import max_rel_err

from pallas_kernels import cpu_build
from pallas_kernels import cpu_grouped_matmul as C
from pallas_kernels import dispatch, int4_layout
from pallas_kernels import int4_matmul as I

pytestmark = pytest.mark.skipif(not cpu_build.available(), reason="no C++ compiler: the native kernel cannot be built")

# (rows, experts, K, N): decode (1 row per expert), a few rows, prefill-sized groups, N not a multiple of 8,
# groups of 12+ rows (widened weight tiles) with K over one 128-row tile and N over one 512-column chunk.
SHAPES = [(8, 64, 256, 128), (64, 16, 128, 256), (300, 4, 64, 96), (37, 5, 96, 40), (5, 3, 32, 20),
          (90, 3, 320, 600)]


def _sizes(rng: np.random.Generator, m: int, e: int) -> jnp.ndarray:
    """Random group sizes over e experts summing to m or a little less (trailing rows belong to no group).

    One expert other than the largest gets no rows, so there is an empty group and never only empty ones.
    """
    sizes = rng.multinomial(m - int(rng.integers(0, 3)), rng.dirichlet(np.ones(e))).astype(np.int32)
    sizes[rng.choice([g for g in range(e) if g != sizes.argmax()])] = 0
    return jnp.asarray(sizes)


@pytest.mark.parametrize("m,e,k,n", SHAPES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense_layer_of_stack_equals_ragged_dot(m, e, k, n, dtype):
    rng = np.random.default_rng()
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, e, k, n)), dtype)
    sizes = _sizes(rng, m, e)
    got = jax.jit(lambda x, w, s, layer: C.grouped_matmul(x, w, s, layer=layer))(x, w, sizes, jnp.int32(1))
    ref = C.grouped_matmul_reference(x, w[1].astype(jnp.float32), sizes)
    # float32 sums of K products in another order: relative error a few ulps times sqrt(K).
    assert max_rel_err(got, ref) < 1e-5
    assert not jnp.any(got[int(sizes.sum()):])


# K = 75: the last span of K rows short (8-row spans up to 4 rows, 16 from 5; 128-row tiles from 12); with AVX2, K rows
# past the 4 blocks (75: 4 x 17 + 7, 6: 4 x 1 + 2, 3: no block), and 2-8 rows of a matrix over 512 columns in spans.
@pytest.mark.parametrize("m,k,n", [(1, 384, 1000), (4, 96, 40), (70, 64, 520), (3, 32, 5), (10, 208, 600), (6, 64, 130),
                                   (2, 75, 70), (7, 75, 70), (13, 75, 70), (1, 6, 24), (5, 6, 24), (1, 3, 16), (8, 3, 16),
                                   (3, 75, 520), (8, 75, 1030)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("stacked", [True, False])
def test_matmul_reads_layer_of_stack_in_its_dtype(m, k, n, dtype, stacked):
    """x @ w[layer] for [L, K, N] (and plain [K, N]) weights equals numpy's float64 product of the stored values."""
    rng = np.random.default_rng()
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, k, n)), dtype)
    got = jax.jit(lambda x, w, layer: C.matmul(x, w, layer=layer))(x, w, jnp.int32(2)) if stacked else C.matmul(x, w[2])
    ref = np.asarray(x, np.float64) @ np.asarray(w[2].astype(jnp.float32), np.float64)
    assert got.shape == (m, n) and max_rel_err(got, ref) < 1e-5



# Groups of 12+ rows (the many-row paths; from 32 f32 rows too: 8-row blocks and every remainder 0-7), K over two
# 128-row tiles and part of a third, N over a 512-column chunk and a part panel; one group alone has its columns
# split among threads.
@pytest.mark.parametrize("sizes,k,n", [([32, 33, 34, 35, 0, 37, 38, 39, 12, 20], 300, 600), ([45], 200, 1100)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_many_rows_within_float32_bound_of_exact(rng, sizes, k, n, dtype):
    """Every output within the float32 summation bound of numpy's float64 product of the stored values: K
    roundings of at most 2^-24 of the sum of |x w| (any order, any fused multiply-adds)."""
    x = rng.normal(size=(sum(sizes) + 1, k)).astype(np.float32)
    w = jnp.asarray(rng.normal(size=(2, len(sizes), k, n)), dtype)
    gs = jnp.asarray(sizes, jnp.int32)
    got = np.asarray(jax.jit(lambda x, w, layer: C.grouped_matmul(x, w, gs, layer=layer))(x, w, jnp.int32(1)))
    w_EKN = np.asarray(w[1].astype(jnp.float32), np.float64)
    x64, ends = np.asarray(x, np.float64), np.cumsum(sizes)
    exact = np.concatenate([x64[e - s:e] @ w_EKN[g] for g, (s, e) in enumerate(zip(sizes, ends))])
    bound = k * 2.0**-24 * np.concatenate([np.abs(x64[e - s:e]) @ np.abs(w_EKN[g]) for g, (s, e) in
                                           enumerate(zip(sizes, ends))])
    assert np.all(np.abs(got[:ends[-1]] - exact) <= bound) and not got[ends[-1]:].any()

def _int8_bound(x, packed_EHN, scale_EGN, sizes) -> np.ndarray:
    """[M, N]: how far rounding x to int8 can move each output (0 where the kernel multiplies float x): each x
    value moves by at most max|x| / 254 of its 32 (half a step of max|x| / 127), so an output moves by at most
    the sum over K groups of that times the group's sum of |W[k, n]|."""
    x = np.asarray(x, np.float64)
    m, k = x.shape
    sizes = np.asarray(sizes)
    w_EKN = np.abs(np.asarray(int4_layout.dequantize(packed_EHN, scale_EGN), np.float64))
    wsum_EGN = w_EKN.reshape(w_EKN.shape[0], k // 32, 32, -1).sum(2)
    step_MG = np.abs(x).reshape(m, k // 32, 32).max(-1) / 254
    expert_M = np.minimum(np.searchsorted(np.cumsum(sizes), np.arange(m), side="right"), len(sizes) - 1)
    rounded_M = (np.arange(m) < sizes.sum()) & C.rounds_x_to_int8()
    return np.einsum("mg,mgn->mn", step_MG, wsum_EGN[expert_M]) * rounded_M[:, None]


def _check_int4(got, x, packed_EHN, scale_EGN, sizes) -> None:
    """The kernel's contract to float32 summation order, and within the int8 bound of the exact float32 product."""
    assert max_rel_err(got, C.grouped_int4_matmul_reference(x, packed_EHN, scale_EGN, sizes)) < 1e-5
    exact = np.asarray(I.grouped_int4_matmul_reference(x, packed_EHN, scale_EGN, sizes), np.float64)
    slack = 1e-5 * np.abs(exact).max()  # float32 sums of K products in another order
    assert np.all(np.abs(np.asarray(got, np.float64) - exact) <= _int8_bound(x, packed_EHN, scale_EGN, sizes) + slack)
    assert not jnp.any(got[int(np.sum(sizes)):])


@pytest.mark.parametrize("m,e,k,n", [s for s in SHAPES if s[2] % 32 == 0])
def test_int4_equals_reference(m, e, k, n):
    rng = np.random.default_rng()
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
    packed, scale = int4_layout.quantize(jnp.asarray(rng.normal(size=(2, e, k, n)), jnp.float32))
    sizes = _sizes(rng, m, e)
    got = C.grouped_int4_matmul(x, packed, scale, sizes, layer=jnp.int32(1))
    _check_int4(got, x, packed[1], scale[1], sizes)


# Group sizes (decode's single rows, odd counts, empty groups, trailing rows in no group) with K over each planar
# block (96: 32, 320: 64, 512: 256) and N under, across and over 64-column blocks and 512-column chunks; 131 rows
# span two blocks of rows of the VNNI tiled path (128 + 3) with N over its 256-column tiles and a short last block;
# N = 2100 gives the AVX2 streamed path (up to 12 rows, 4 per pass) a 2048-column chunk and a short one.
GROUPS = [([1, 0, 1, 1, 0, 0, 1, 1], 1, 512, 77), ([3, 0, 11, 2, 0, 7], 0, 320, 600),
          ([12, 1, 0, 5], 2, 96, 130), ([2, 9, 0, 4, 1], 1, 256, 1000), ([0, 6], 0, 32, 5), ([5, 0, 2], 0, 2304, 600),
          ([1, 0, 3, 4, 2], 0, 64, 2100), ([131, 2, 0, 1], 1, 256, 300)]


@pytest.mark.parametrize("sizes,extra,k,n", GROUPS)
@pytest.mark.parametrize("spread", ["normal", "one_large_per_group"])
def test_int4_groups_round_x_to_int8(rng, sizes, extra, k, n, spread):
    """Every row against the kernel's contract and within the int8 bound of the exact product. With one value per
    32 a thousand times the rest (int8's worst case: the rest round to a few levels) and a zero group."""
    x = rng.normal(size=(sum(sizes) + extra, k)).astype(np.float32)
    if spread == "one_large_per_group":
        rows, groups = np.indices((x.shape[0], k // 32))
        x[rows, groups * 32 + rng.integers(0, 32, groups.shape)] *= 1000
        x[0, 32 * rng.integers(0, k // 32):][:32] = 0
    x = jnp.asarray(x)
    packed, scale = int4_layout.quantize(jnp.asarray(rng.normal(size=(3, len(sizes), k, n)), jnp.float32))
    gs = jnp.asarray(sizes, jnp.int32)
    got = jax.jit(lambda x, layer: C.grouped_int4_matmul(x, packed, scale, gs, layer=layer))(x, jnp.int32(2))
    _check_int4(got, x, packed[2], scale[2], gs)


@pytest.mark.parametrize("k,n", [(2048, 96), (1024, 1000), (2304, 300)])
def test_one_row_of_one_group_equals_reference(rng, k, n):
    """Decode at batch 1 (one row, one expert; over 256 KiB of weights: K split among threads, partial sums added),
    dense and INT4."""
    x = jnp.asarray(rng.normal(size=(2, k)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(2, 3, k, n)), jnp.float32)
    gs = jnp.asarray([0, 1, 0], jnp.int32)
    dense = C.grouped_matmul(x, w.astype(jnp.bfloat16), gs, layer=jnp.int32(1))
    ref = np.asarray(x[:1], np.float64) @ np.asarray(w[1, 1].astype(jnp.bfloat16).astype(jnp.float32), np.float64)
    assert max_rel_err(dense[:1], ref) < 1e-5 and not dense[1:].any()
    packed, scale = int4_layout.quantize(w)
    _check_int4(C.grouped_int4_matmul(x, packed, scale, gs, layer=jnp.int32(1)), x, packed[1], scale[1], gs)


@pytest.mark.parametrize("weights", ["all_7", "all_-8", "random_extremes"])
@pytest.mark.parametrize("rows,k", [(1, 2048), (9, 2048), (3, 96), (7, 96)])
def test_int4_extreme_values_do_not_overflow(rng, weights, rows, k):
    """Every x at +-max|x| of its group (int8 +-127) times nibbles at their extremes (q = 7 or -8), the largest
    sums the integer paths hold per column and per group (16-bit lanes on AVX2): within rounding of the exact
    sum, streamed (few rows) and tiled (many). Rounding is relative to the size of the sum's terms, not of the sum:
    random signs can cancel to an exact 0, which a wrapped lane (an error of 2^16 or more) would miss by far."""
    n, signs = 64, rng.choice([-1.0, 1.0], size=(rows, k))
    q = {"all_7": np.full((2, k, n), 7), "all_-8": np.full((2, k, n), -8),
         "random_extremes": rng.choice([-8, 7], size=(2, k, n))}[weights]
    packed = int4_layout.pack(jnp.asarray(q, jnp.int8))
    scale = jnp.ones((2, k // 32, n), jnp.bfloat16)
    for x in (np.ones((rows, k)), -np.ones((rows, k)), signs):
        gs = jnp.asarray([0, rows], jnp.int32)
        got = np.asarray(C.grouped_int4_matmul(jnp.asarray(x, jnp.float32), packed, scale, gs))
        assert np.all(np.abs(got - x @ q[1]) <= 1e-5 * (np.abs(x) @ np.abs(q[1])))


@pytest.mark.parametrize("rows", [1, 5, 12])
def test_int4_nan_in_x_reaches_only_its_row(rng, rows):
    """A NaN in x makes its whole output row NaN, as the float product does; the other rows are unaffected."""
    x = rng.normal(size=(rows + 1, 64)).astype(np.float32)
    x[rows - 1, 40] = np.nan
    packed, scale = int4_layout.quantize(jnp.asarray(rng.normal(size=(2, 64, 96)), jnp.float32))
    gs = jnp.asarray([rows, 1], jnp.int32)
    got = np.asarray(C.grouped_int4_matmul(jnp.asarray(x), packed, scale, gs))
    assert np.isnan(got[rows - 1]).all() and not np.isnan(np.delete(got, rows - 1, axis=0)).any()
    x[rows - 1] = 0
    _check_int4(jnp.asarray(np.nan_to_num(got, nan=0.0)), jnp.asarray(x), packed, scale, gs)


def test_unstacked_weights_and_native_dispatch(monkeypatch):
    """Weights without a layer axis, and the default CPU mode routing the model's calls to the kernel."""
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert dispatch.kernel_mode("cpu") == "native"
    rng = np.random.default_rng()
    x = jnp.asarray(rng.normal(size=(12, 64)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(4, 64, 48)), jnp.float32)
    sizes = jnp.asarray([3, 0, 7, 2], jnp.int32)
    ref = C.grouped_matmul_reference(x, w, sizes)
    assert max_rel_err(dispatch.grouped_matmul(x, w, sizes), ref) < 1e-5
    assert max_rel_err(dispatch.grouped_matmul_xla(x, w, sizes), ref) < 1e-5


def test_bad_sizes_and_layer_are_errors():
    x = jnp.ones((4, 32), jnp.float32)
    w = jnp.ones((2, 3, 32, 16), jnp.float32)
    with pytest.raises(jax.errors.JaxRuntimeError, match="group sizes exceed the rows"):
        jax.block_until_ready(C.grouped_matmul(x, w, jnp.asarray([3, 2, 0], jnp.int32), layer=0))
    with pytest.raises(jax.errors.JaxRuntimeError, match="layer index out of range"):
        jax.block_until_ready(C.grouped_matmul(x, w, jnp.asarray([1, 1, 1], jnp.int32), layer=5))


def test_concurrent_calls_do_not_wait_on_each_other():
    """Independent kernel calls in one program and from several Python threads at once all finish.

    XLA may run independent custom calls on its pool threads at the same time; a call that waited for a
    pool thread to help it would then deadlock.
    """
    rng = np.random.default_rng()
    w = jnp.asarray(rng.normal(size=(2, 8, 64, 256)), jnp.float32)
    sizes = jnp.asarray([4, 0, 3, 1, 0, 2, 2, 4], jnp.int32)
    xs = [jnp.asarray(rng.normal(size=(16, 64)), jnp.float32) for _ in range(4)]
    f = jax.jit(lambda a, b: [C.grouped_matmul(x, w, sizes, layer=1) for x in (a, b, a + b)])
    expect = [C.grouped_matmul_reference(x, w[1], sizes) for x in (xs[0], xs[1], xs[0] + xs[1])]
    results = {}

    def run(i: int) -> None:
        for _ in range(20):
            results[i] = jax.block_until_ready(f(xs[0], xs[1]))

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "kernel calls deadlocked"
    for out in results.values():
        assert all(max_rel_err(o, e) < 1e-5 for o, e in zip(out, expect))


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="an x86 kernel path")
def test_avx2_int4_stream_compiles_with_its_prefetches(tmp_path):
    """The AVX2 INT4 stream (built for an AVX2 + FMA CPU without AVX-512, whatever this machine is) fetches ahead
    with both hints in every row count: a compiler can drop prefetches (GCC 12.2 emitted none while they sat under a
    branch in the loop), which no numeric test would notice."""
    compiler = cpu_build.compiler()
    source = cpu_build.HERE / "cpu_grouped_matmul.cc"
    flags = [f for f in cpu_build.FLAGS if not f.startswith("-march")]
    asm = tmp_path / "int4.s"
    subprocess.run([compiler, *flags, "-march=haswell", "-DK2JAX_MATMUL_PART=2", f"-I{jax.ffi.include_dir()}", "-S",
                    str(source), "-o", str(asm)], check=True)
    bodies = re.findall(r"^(\S*int4_stream\S*):\n(.*?)\.cfi_endproc", asm.read_text(), re.S | re.M)
    assert len(bodies) == 4, [name for name, _ in bodies]  # rows of x 1-4
    for name, body in bodies:
        assert "prefetchnta" in body and "prefetcht0" in body, name
