"""The Triton dense layer matmul (interpret mode) against its reference, and its operands' offsets at K2 sizes."""

import jax
import jax.numpy as jnp
import pytest
from kernel_testutils import max_rel_err, random_normal, wrapping_triton_operands

from pallas_kernels import layer_matmul as D

# float32: the kernel only sums in another order (blocks of 128, split partials); bf16 inputs: the dots take bf16
# operands exactly and accumulate in float32, so the same.
TOL = 1e-5


@pytest.mark.parametrize("m,k,n", [(1, 512, 192), (5, 300, 64), (40, 1024, 136), (16, 128, 128)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matches_reference_on_every_layer(rng, m, k, n, dtype):
    """Rows, K and columns that are and are not multiples of the blocks; each layer of the stack picks its own
    weights (layers differ, so reading the wrong one fails)."""
    w = random_normal(rng, (3, k, n), dtype)
    x = random_normal(rng, (m, k), dtype)
    for layer in range(3):
        out = D.layer_matmul_triton(x, w, jnp.int32(layer), interpret=True)
        assert out.shape == (m, n) and out.dtype == jnp.float32
        assert max_rel_err(out, D.layer_matmul_reference(x, w, layer)) < TOL


@pytest.mark.parametrize("m,k,n", [(1, 7168, 1536), (8, 1536, 12288), (64, 8192, 7168), (1, 300, 64)])
def test_k_is_split_to_fill_the_gpu(m, k, n):
    """Decode-sized products have few (row, column) tiles: K is split so that there are enough programs, each split
    a run of whole blocks, the last one non-empty, never more splits than K blocks."""
    per_split, splits = D.k_splits(m, k, n)
    blocks, tiles = -(-k // D.BLOCK_K), -(-m // D._blocks(m)[0]) * -(-n // D._blocks(m)[1])
    assert (splits - 1) * per_split < blocks <= splits * per_split
    assert splits * tiles >= D.TRITON_MIN_PROGRAMS or splits == blocks


def test_operands_are_indexed_within_32_bit_offsets():
    """K2's largest dense stack on one GPU (60 layers of o_proj, 8192 x 7168 bf16: 7 GB, past 2^32 bytes) and one
    of 2-4 GB: two-byte elements never sit in the range where 32-bit offsets wrap."""
    for shape in ((60, 8192, 7168), (60, 1536, 12288)):
        operands, wrapping = wrapping_triton_operands(
            lambda x, w: D.layer_matmul_triton(x, w, jnp.int32(3)),
            jax.ShapeDtypeStruct((8, shape[1]), jnp.bfloat16), jax.ShapeDtypeStruct(shape, jnp.bfloat16))
        assert any(a.size * a.dtype.itemsize >= 2**31 for a in operands) and not wrapping
