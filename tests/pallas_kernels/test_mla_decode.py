"""MLA flash-decoding kernels, Mosaic and Triton (Pallas interpreter on CPU), against the plain-jnp reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_testutils import random_normal

from pallas_kernels import mla_decode as M

# fp32: only the summation order differs (outputs are convex combinations of N(0,1) values, |o| <~ 4).
# bf16: probabilities are rounded to bf16 before p @ c_kv (2^-9 relative) and the output to bf16
# (half an ulp at |o| < 4 is 2^-7); 2e-2 absolute covers both with margin.
ATOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


def _inputs(rng, b, h, s, r, p, c, dtype):
    """Random queries and a latent cache whose padding lanes [r+p, c) are zero, as the model writes it."""
    kv = random_normal(rng, (b, s, c), dtype)
    kv = kv.at[..., r + p:].set(0)
    return random_normal(rng, (b, h, r), dtype), random_normal(rng, (b, h, p), dtype), kv


CASES = [
    # (B, H, S, lengths, block_s, num_splits, (R, P, C))
    (2, 8, 100, [1, 100], None, None, (512, 64, 640)),      # K2 lanes, one block = all of S, lengths 1 and S
    (4, 4, 300, [300, 1, 129, 256], 128, 2, (64, 32, 128)),  # S not a multiple of the block, 2 splits
    (2, 8, 1000, [999, 500], 128, 4, (64, 32, 128)),         # long context split 4 ways
    (1, 64, 512, [130], 64, 8, (512, 64, 640)),              # 64 heads, most splits past the length (empty)
    (3, 2, 64, [64, 63, 1], 16, 1, (128, 64, 256)),    # one split, many blocks, boundary lengths
]


@pytest.mark.parametrize("kernel", ["mosaic", "triton"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("b,h,s,lengths,block_s,splits,dims", CASES)
def test_matches_reference(rng, b, h, s, lengths, block_s, splits, dims, dtype, kernel):
    q_lat, q_pe, kv = _inputs(rng, b, h, s, *dims, dtype)
    lengths = jnp.asarray(lengths, jnp.int32)
    sm_scale = float(rng.uniform(0.05, 0.2))
    if kernel == "mosaic":
        out = M.mla_decode(q_lat, q_pe, kv, lengths, sm_scale=sm_scale, interpret=True, block_s=block_s,
                           num_splits=splits)
    else:  # Triton blocks are fixed (32 rows); splits still vary, None lets it fill the GPU.
        out = M.mla_decode_triton(q_lat, q_pe, kv, lengths, sm_scale=sm_scale, interpret=True, num_splits=splits)
    ref = M.mla_decode_reference(q_lat, q_pe, kv, lengths, sm_scale=sm_scale)
    assert out.shape == q_lat.shape and out.dtype == dtype
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=ATOL[dtype], rtol=0)


@pytest.mark.parametrize("kernel,kwargs", [(M.mla_decode, dict(block_s=64, num_splits=2)),
                                           (M.mla_decode_triton, dict(num_splits=2))])
def test_ignores_cache_past_length(rng, kernel, kwargs):
    """Garbage (even inf) at or past a sequence's length, as stale cache slots may hold, changes nothing."""
    q_lat, q_pe, kv = _inputs(rng, 2, 4, 200, 64, 32, 128, jnp.float32)
    lengths = jnp.asarray([37, 200], jnp.int32)
    dirty = kv.at[0, 37:].set(jnp.inf)
    run = functools.partial(kernel, sm_scale=0.1, interpret=True, **kwargs)
    np.testing.assert_array_equal(np.asarray(run(q_lat, q_pe, dirty, lengths)),
                                  np.asarray(run(q_lat, q_pe, kv, lengths)))


def test_reference_against_numpy(rng):
    """The reference itself against a float64 numpy softmax attention for one sequence."""
    q_lat, q_pe, kv = _inputs(rng, 1, 3, 20, 16, 8, 32, jnp.float32)
    q, qp, c = (np.asarray(a, np.float64)[0] for a in (q_lat, q_pe, kv))
    scores = (q @ c[:11, :16].T + qp @ c[:11, 16:24].T) * 0.3
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    expect = (probs / probs.sum(-1, keepdims=True)) @ c[:11, :16]
    out = M.mla_decode_reference(q_lat, q_pe, kv, jnp.asarray([11]), sm_scale=0.3)
    np.testing.assert_allclose(np.asarray(out)[0], expect, atol=1e-5)


@pytest.mark.parametrize("kernel", [M.mla_decode, M.mla_decode_triton])
def test_layer_of_a_stacked_cache_matches_that_layer(rng, kernel):
    """A stacked cache [L, B, S, C] with a traced layer index gives that layer's attention."""
    q_lat, q_pe, kv = _inputs(rng, 2, 4, 3 * 50, 64, 32, 128, jnp.float32)
    kv_LBSC = kv.reshape(2, 3, 50, 128).transpose(1, 0, 2, 3)
    lengths = jnp.asarray([50, 17], jnp.int32)
    run = jax.jit(lambda layer: kernel(q_lat, q_pe, kv_LBSC, lengths, sm_scale=0.1, layer=layer, interpret=True))
    expect = M.mla_decode_reference(q_lat, q_pe, kv_LBSC[1], lengths, sm_scale=0.1)
    np.testing.assert_allclose(np.asarray(run(jnp.int32(1))), np.asarray(expect), atol=ATOL[jnp.float32], rtol=0)
