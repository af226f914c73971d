"""Grouped and dense INT4 matmul kernels, Mosaic and Triton (Pallas interpreter on CPU), against the jnp references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_testutils import INT4_F32_TOL, max_rel_err, random_int4, random_normal, wrapping_triton_operands

from pallas_kernels import int4_layout
from pallas_kernels import int4_matmul as I

# fp32: INT4_F32_TOL says why Mosaic needs 5e-5 (used here for both kernels). bf16: the kernel rounds each dequantized
# weight (q * scale needs up to 11 significant bits, bf16 keeps 8: 2^-9 relative) and the output to bf16; with
# random signs both stay well under 1% of the largest output.
TOL = {jnp.float32: INT4_F32_TOL["mosaic"], jnp.bfloat16: 1e-2}
GROUPED = {"mosaic": I.grouped_int4_matmul, "triton": I.grouped_int4_matmul_triton}
DENSE = {"mosaic": I.int4_matmul, "triton": I.int4_matmul_triton}


@pytest.fixture
def small_tiles(monkeypatch):
    """Shrink the tile caps so small shapes span several row, K and N tiles."""
    monkeypatch.setattr(I, "TM_MAX", 16)
    monkeypatch.setattr(I, "TK_MAX", 512)
    monkeypatch.setattr(I, "BLOCK_BYTES", 128 * 256)


GROUPED_CASES = [
    # (K, N, group sizes, extra rows past the sum)
    (256, 128, [3, 0, 5], 0),                       # decode-like, one empty expert
    (256, 128, [0, 0, 1], 0),                       # one row
    (512, 256, [0, 10, 0, 0, 27, 0], 4),            # ragged, empty experts, rows past the sum
    (256, 128, [0, 0, 0], 8),                       # no rows at all: all zeros
    (320, 24, [2, 2, 1, 3], 0),                     # K not a multiple of 256 (planar block 64), N < 128
    (96, 16, [1, 0, 2], 1),                         # K = 3 groups (planar block 32, both halves one group)
    (1024, 384, [1, 1, 1, 1, 1, 1, 1, 1] + [0] * 40, 0),  # 8 rows over 48 experts
]


@pytest.mark.parametrize("kernel", GROUPED)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("k,n,sizes,extra", GROUPED_CASES)
def test_grouped_matches_reference(rng, k, n, sizes, extra, dtype, kernel):
    packed, scale = random_int4(rng, len(sizes), k, n)
    x = random_normal(rng, (sum(sizes) + extra, k), dtype)
    gs = jnp.asarray(sizes, jnp.int32)
    out = GROUPED[kernel](x, packed, scale, gs, interpret=True)
    ref = I.grouped_int4_matmul_reference(x, packed, scale, gs)
    assert out.shape == ref.shape and out.dtype == dtype
    assert np.all(np.asarray(out)[sum(sizes):] == 0)
    if sum(sizes):
        assert max_rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("kernel", GROUPED)
@pytest.mark.parametrize("sizes,extra", [([20, 0, 7, 13, 0, 1], 3), ([16, 16, 0, 16], 0), ([0, 37, 0], 11),
                                         ([70, 0, 30, 45], 9)])
def test_grouped_many_tiles(rng, small_tiles, sizes, extra, kernel):
    """Experts straddling row tiles, partial last row tile, several K and N tiles (Triton: 16-row tiles, and
    64-row tiles for the last case, whose experts average more than 16 rows)."""
    k, n = 1024, 384
    packed, scale = random_int4(rng, len(sizes), k, n)
    x = random_normal(rng, (sum(sizes) + extra, k))
    gs = jnp.asarray(sizes, jnp.int32)
    assert I._tiles(x.shape[0], k, n) == (16, 512, 128)
    assert I.triton_tiling(x.shape[0], len(sizes)).block_m == (64 if sum(sizes) > 16 * len(sizes) else 16)
    out = GROUPED[kernel](x, packed, scale, gs, interpret=True)
    assert max_rel_err(out, I.grouped_int4_matmul_reference(x, packed, scale, gs)) < TOL[jnp.float32]
    assert np.all(np.asarray(out)[sum(sizes):] == 0)


@pytest.mark.parametrize("kernel", DENSE)
@pytest.mark.parametrize("m,k,n", [(1, 256, 128), (7, 512, 256), (40, 1024, 384), (3, 64, 8), (2, 32, 16)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense_matches_reference(rng, small_tiles, m, k, n, dtype, kernel):
    packed, scale = random_int4(rng, 1, k, n)
    x = random_normal(rng, (m, k), dtype)
    out = DENSE[kernel](x, packed[0], scale[0], interpret=True)
    assert out.dtype == dtype
    assert max_rel_err(out, I.int4_matmul_reference(x, packed[0], scale[0])) < TOL[dtype]


def test_reference_is_dequantize_then_matmul(rng):
    """The reference itself against numpy on compressed-tensors-defined weights (int4_layout is bit-exact)."""
    packed, scale = random_int4(rng, 1, 256, 32)
    x = random_normal(rng, (5, 256))
    w = np.asarray(int4_layout.unpack(np.asarray(packed[0])), np.float64) * np.repeat(
        np.asarray(scale[0], np.float64), 32, axis=0)
    expect = np.asarray(x, np.float64) @ w
    np.testing.assert_allclose(np.asarray(I.int4_matmul_reference(x, packed[0], scale[0])), expect,
                               rtol=1e-5, atol=1e-5 * np.abs(expect).max())


def _experts_read(sizes, m, k, n) -> set[int]:
    """Experts whose weight blocks the grouped kernel's pipeline fetches, replaying its index maps."""
    tm, tk, _ = I._tiles(m, k, n, len(sizes))
    expert, num_visits = (np.asarray(a) for a in I._padded_rows(jnp.asarray(sizes, jnp.int32), m, tm)[:2])
    w_map = I._index_maps(k // tk)[1]
    layer = np.zeros(1, np.int32)
    return {int(w_map(0, v, k_i, expert, num_visits, layer)[1]) for v in range(len(expert)) for k_i in range(k // tk)}


@pytest.mark.parametrize("sizes", [[0, 0, 3, 0, 0, 1, 0, 0], [1] + [0] * 46 + [1], [0, 2, 0, 2, 0, 2, 0, 2]])
def test_decode_reads_only_active_experts(sizes):
    assert _experts_read(sizes, sum(sizes), 7168, 2048) == {e for e, s in enumerate(sizes) if s}


def test_schedule_covers_each_expert_row_tile_once():
    sizes = jnp.asarray([5, 0, 40, 3, 0, 0, 17], jnp.int32)
    starts, ends, expert, tile, num_visits = (np.asarray(a) for a in I._visit_schedule(sizes, 70, 16))
    visits = list(zip(expert[:num_visits[0]], tile[:num_visits[0]]))
    expect = [(e, t) for e in range(7) for t in range(70 // 16 + 1)
              if ends[e] > starts[e] and t * 16 < ends[e] and (t + 1) * 16 > starts[e]]
    assert visits == expect


def test_padded_rows_give_each_expert_whole_tiles():
    """Mosaic's row space: each expert's rows start a tile of their own, in order; other padded rows read none."""
    sizes = [5, 0, 40, 3, 0, 0, 17]
    m, tm = 70, 16
    expert, num_visits, src, dest = (np.asarray(a) for a in I._padded_rows(jnp.asarray(sizes, jnp.int32), m, tm))
    tiles = [-(-s // tm) for s in sizes]
    assert num_visits[0] == sum(tiles) and list(expert[:sum(tiles)]) == [e for e, t in enumerate(tiles) for _ in range(t)]
    assert np.array_equal(src[dest[:sum(sizes)]], np.arange(sum(sizes)))
    owners = np.repeat(np.arange(len(sizes)), sizes)
    assert np.array_equal(expert[dest[:sum(sizes)] // tm], owners)
    assert np.sum(src < m) == sum(sizes) and np.all(src[src < m] < sum(sizes))


def test_kernel_inside_outer_jit_with_traced_group_sizes(rng):
    """The kernel traces inside an outer jit with traced group sizes (as the model calls it)."""
    packed, scale = random_int4(rng, 4, 256, 128)
    x = random_normal(rng, (9, 256))
    sizes = jnp.asarray([2, 0, 4, 3], jnp.int32)
    f = jax.jit(lambda x, gs: I.grouped_int4_matmul(x, packed, scale, gs, interpret=True))
    assert max_rel_err(f(x, sizes), I.grouped_int4_matmul_reference(x, packed, scale, sizes)) < INT4_F32_TOL["mosaic"]


@pytest.mark.parametrize("kernel", GROUPED)
@pytest.mark.parametrize("scale_dtype", [jnp.bfloat16, jnp.float32])
def test_layer_of_a_stack_matches_that_layer(rng, kernel, scale_dtype):
    """Stacked [L, E, ...] weights with a traced layer index give the same rows as that layer's slice; scales in
    the model's dtype (float32 on CPU) as well as bf16."""
    packed, scale = random_int4(rng, 3 * 4, 256, 128)
    packed_LEHN, scale_LEGN = packed.reshape(3, 4, 128, 128), scale.reshape(3, 4, 8, 128).astype(scale_dtype)
    x = random_normal(rng, (6, 256))
    sizes = jnp.asarray([1, 0, 3, 2], jnp.int32)
    run = jax.jit(lambda layer: GROUPED[kernel](x, packed_LEHN, scale_LEGN, sizes, layer=layer, interpret=True))
    expect = I.grouped_int4_matmul_reference(x, packed_LEHN[2], scale_LEGN[2], sizes)
    assert max_rel_err(run(jnp.int32(2)), expect) < TOL[jnp.float32]


@pytest.mark.parametrize("layers,tokens,k,n", [(1, 1, 2048, 7168), (1, 64, 7168, 4096), (4, 8, 2048, 7168)])
def test_triton_operands_are_indexed_within_32_bit_offsets(layers, tokens, k, n):
    """Pallas' Triton lowering indexes an operand of at most 2^32 bytes with signed 32-bit element offsets (64-bit
    only above). A one-byte operand of 2-4 GB (one K2 layer's down projection on one GPU: 2.8 GB) wraps past 2^31
    and the kernel reads other weights; on an H200 that gave relative errors of 1.3. Every operand, at K2 shapes
    with all 384 experts on one device, must hold fewer than 2^31 elements or pass 2^32 bytes."""
    args = (jax.ShapeDtypeStruct((tokens, k), jnp.bfloat16),
            jax.ShapeDtypeStruct((layers, 384, k // 2, n), jnp.uint8),
            jax.ShapeDtypeStruct((layers, 384, k // 32, n), jnp.bfloat16),
            jax.ShapeDtypeStruct((384,), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32))
    operands, wrapping = wrapping_triton_operands(
        lambda x, p, s, gs, layer: I.grouped_int4_matmul_triton(x, p, s, gs, layer=layer), *args)
    assert any(a.size >= 2**30 for a in operands)  # the weights are among them
    assert not wrapping


@pytest.mark.parametrize("options", [{"split_k": 2}, {"split_k": 3}, {"split_k": 8},
                                     {"tiling": I.TritonTiling(32, 128, 2, 2)},
                                     {"tiling": I.TritonTiling(16, 32, 8, 4)}])
def test_triton_options_match_reference(rng, options):
    """K shared by several programs (4 planar blocks in 2, 2 and 4 runs; the last run shorter when uneven), or a
    tiling other than the default (as the GPU benchmark's sweep passes): the result equals the reference, rows past
    the sum stay 0."""
    packed, scale = random_int4(rng, 4, 1024, 256)
    x = random_normal(rng, (40, 1024))
    sizes = jnp.asarray([20, 0, 13, 5], jnp.int32)
    out = I.grouped_int4_matmul_triton(x, packed, scale, sizes, interpret=True, **options)
    assert max_rel_err(out, I.grouped_int4_matmul_reference(x, packed, scale, sizes)) < INT4_F32_TOL["other"]
    assert np.all(np.asarray(out)[38:] == 0)


def test_triton_tiling_that_cannot_run_is_refused(rng):
    packed, scale = random_int4(rng, 1, 256, 128)
    with pytest.raises(ValueError, match="block_m at least 16"):
        I.grouped_int4_matmul_triton(random_normal(rng, (4, 256)), packed, scale, jnp.asarray([4], jnp.int32),
                                     interpret=True, tiling=I.TritonTiling(8, 64))
