"""Random inputs shared by the kernel tests (uniform INT4 bytes, positive scales, normal activations, paged MLA
pools and queries), the attention outputs' comparison, and the Triton operands' offset check."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

# fp32 INT4 matmul against its reference. Triton and the native kernel only sum in another order (measured
# <= 2e-6). Mosaic (also what `interpret` mode runs) dots x with 128 + nibble and subtracts 136 * sum(x) * scale
# afterwards, so its fp32 partial sums are ~20x the output's size and so is their rounding: measured up to
# 1.2e-5 (median 5e-6) over 100 draws, hence 5e-5 for it.
INT4_F32_TOL = {"mosaic": 5e-5, "other": 1e-5}


def random_int4(rng: np.random.Generator, e: int, k: int, n: int):
    """Uniformly random packed bytes (every nibble -8..7) and bf16 scales for E experts [K, N]."""
    packed = rng.integers(0, 256, size=(e, k // 2, n), dtype=np.uint8)
    scale = rng.uniform(0.005, 0.05, size=(e, k // 32, n)).astype(jnp.bfloat16)
    return jnp.asarray(packed), jnp.asarray(scale)


def random_normal(rng: np.random.Generator, shape, dtype=jnp.float32):
    """Standard normal array in dtype."""
    return jnp.asarray(rng.standard_normal(shape).astype(np.float32), dtype)


def max_rel_err(out, ref) -> float:
    """max |out - ref| / max |ref|, both in fp32."""
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    return float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))


def paged_pool_and_tables(rng, *, kv_len, n, width, layers, layer, dims, dtype, page_first=0, stride=1):
    """A NaN-filled pool [L, P, N, C] whose rows' pages hold random latents (zero padding lanes) below kv_len;
    rows get shuffled, non-contiguous page ids and random garbage (often NaN pages) past their pages."""
    r, p, c = dims
    kv_len = np.asarray(kv_len, np.int32)
    needed = [-(-max(-(-int(length) // n) - page_first, 0) // stride) for length in kv_len]
    pages = 2 * sum(needed) + 4
    ids = rng.permutation(pages)
    table = rng.integers(0, pages, size=(len(kv_len), width)).astype(np.int32)
    pool = np.full((layers, pages, n, c), np.nan, np.float32)
    used = 0
    for b, count in enumerate(needed):
        table[b, :count] = ids[used:used + count]
        used += count
        for m in range(count):
            pos = (page_first + m * stride) * n + np.arange(n)
            page = np.zeros((n, c), np.float32)
            page[:, :r + p] = rng.standard_normal((n, r + p))
            pool[layer, table[b, m]] = np.where((pos < kv_len[b])[:, None], page, np.nan)
    return jnp.asarray(pool, dtype), jnp.asarray(table), jnp.asarray(kv_len)


def absorbed_queries(rng, b, t, h, dims, dtype):
    """Absorbed queries laid out like the cache lanes: random in [0, R+P), zeros after."""
    r, p, c = dims
    return random_normal(rng, (b, t, h, c), dtype).at[..., r + p:].set(0)


def assert_attention_close(got, ref, *, o_atol: float, lse_atol: float) -> None:
    """o within o_atol everywhere; lse -inf exactly where the reference's is, else within lse_atol."""
    (o, lse), (o_ref, lse_ref) = got, ref
    assert o.dtype == jnp.float32 and lse.dtype == jnp.float32 and o.shape == o_ref.shape
    o, lse, o_ref, lse_ref = (np.asarray(a) for a in (o, lse, o_ref, lse_ref))
    assert np.isfinite(o).all()
    np.testing.assert_allclose(o, o_ref, atol=o_atol, rtol=0)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(lse_ref))
    assert not np.isnan(lse).any() and not np.isposinf(lse).any()
    seen = np.isfinite(lse_ref)
    np.testing.assert_allclose(lse[seen], lse_ref[seen], atol=lse_atol, rtol=0)
    assert not o_ref[~seen].any() and not o[~seen].any()


def _pallas_operands(jaxpr) -> list:
    """Avals of every operand of every pallas_call in a jaxpr, nested calls included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            found += [v.aval for v in eqn.invars]
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _pallas_operands(sub)
    return found


def wrapping_triton_operands(fn, *args) -> tuple[list, list]:
    """(all pallas_call operands of fn traced on abstract args, those whose element offsets wrap).

    Pallas' Triton lowering indexes an operand of at most 2^32 bytes with signed 32-bit element offsets (64-bit
    only above), so one of fewer bytes but 2^31 elements or more (a one-byte array of 2-4 GB) reads other memory."""
    operands = _pallas_operands(jax.make_jaxpr(fn)(*args).jaxpr)
    return operands, [a for a in operands if a.size >= 2**31 and a.size * a.dtype.itemsize <= 2**32]
