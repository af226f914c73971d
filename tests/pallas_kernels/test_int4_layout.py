"""INT4 layout: bit-exact against compressed-tensors' packing and quantization, on numpy and jax inputs."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize
from compressed_tensors.quantization.utils import calculate_qparams

from pallas_kernels import int4_layout as L

SHAPES_KN = [(32, 8), (96, 5), (64, 8), (128, 3), (256, 16), (320, 24), (512, 128), (7168, 16)]


def _random_q(rng, shape):
    """Uniform random int4 values over the full -8..7 range."""
    return rng.integers(L.QMIN, L.QMAX + 1, size=shape, dtype=np.int8)


def _random_scale(rng, shape):
    """Positive random bf16 scales."""
    return rng.uniform(0.001, 0.1, size=shape).astype(ml_dtypes.bfloat16)


def _ct_pack(q_NK):
    """compressed-tensors' own int32 packing of int8 values [..., N, K]."""
    return pack_to_int32(torch.from_numpy(q_NK), 4).numpy()


@pytest.mark.parametrize("k,n", SHAPES_KN)
def test_pack_unpack_roundtrip_and_planar_order(k, n):
    rng = np.random.default_rng(k * 1000 + n)
    q = _random_q(rng, (2, k, n))
    packed = L.pack(q)
    assert packed.dtype == np.uint8 and packed.shape == (2, k // 2, n)
    np.testing.assert_array_equal(L.unpack(packed), q)
    p = L.planar_block(k)
    # Low nibble of byte row r in block j is k = j*P + r, high nibble is k = j*P + P/2 + r.
    row = (k // p - 1) * (p // 2) + 3
    np.testing.assert_array_equal(packed[:, row] & 0xF, q[:, (k // p - 1) * p + 3] + 8)
    np.testing.assert_array_equal(packed[:, row] >> 4, q[:, (k // p - 1) * p + p // 2 + 3] + 8)


@pytest.mark.parametrize("k,n", SHAPES_KN)
def test_from_compressed_tensors_bit_exact(k, n):
    rng = np.random.default_rng(k + n)
    q_ENK = _random_q(rng, (3, n, k))
    scale_ENG = _random_scale(rng, (3, n, k // 32))
    packed, scale = L.from_compressed_tensors(_ct_pack(q_ENK), scale_ENG)
    np.testing.assert_array_equal(L.unpack(packed), np.swapaxes(q_ENK, -1, -2))
    np.testing.assert_array_equal(scale, np.swapaxes(scale_ENG, -1, -2))
    w = L.dequantize(packed, scale)
    expect = np.swapaxes(q_ENK.astype(np.float32) * np.repeat(scale_ENG.astype(np.float32), 32, axis=-1), -1, -2)
    np.testing.assert_array_equal(w, expect)


@pytest.mark.parametrize("k,n", SHAPES_KN)
def test_to_compressed_tensors_bit_exact(k, n):
    rng = np.random.default_rng(7 * k + n)
    q_EKN = _random_q(rng, (2, k, n))
    scale = _random_scale(rng, (2, k // 32, n))
    words, scale_ct = L.to_compressed_tensors(L.pack(q_EKN), scale)
    assert words.dtype == np.int32 and words.shape == (2, n, k // 8)
    np.testing.assert_array_equal(words, _ct_pack(np.ascontiguousarray(np.swapaxes(q_EKN, -1, -2))))
    unpacked = unpack_from_int32(torch.from_numpy(words), 4, torch.Size((2, n, k))).numpy()
    np.testing.assert_array_equal(unpacked, np.swapaxes(q_EKN, -1, -2))
    np.testing.assert_array_equal(scale_ct, np.swapaxes(scale, -1, -2))


def test_jax_inputs_match_numpy():
    rng = np.random.default_rng(3)
    q = _random_q(rng, (512, 32))
    scale = _random_scale(rng, (16, 32))
    words_np, _ = L.to_compressed_tensors(L.pack(q), scale)
    words_jx, scale_jx = L.to_compressed_tensors(L.pack(jnp.asarray(q)), jnp.asarray(scale))
    np.testing.assert_array_equal(np.asarray(words_jx), words_np)
    packed_jx, scale_back = L.from_compressed_tensors(jnp.asarray(words_np), scale_jx)
    np.testing.assert_array_equal(np.asarray(packed_jx), L.pack(q))
    np.testing.assert_array_equal(np.asarray(L.dequantize(packed_jx, scale_back)), L.dequantize(L.pack(q), scale))


@pytest.mark.parametrize("as_jax", [False, True])
def test_quantize_matches_compressed_tensors(as_jax):
    rng = np.random.default_rng(11)
    w_NK = (rng.standard_normal((48, 256)) * rng.uniform(0.01, 2, size=(48, 1))).astype(np.float32)
    w_NK[3, 32:64] = 0  # an all-zero group takes compressed-tensors' eps scale
    wt = torch.from_numpy(w_NK).to(torch.bfloat16)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32)
    g = wt.unflatten(-1, (-1, 32))
    scale_ct, zp = calculate_qparams(g.amin(-1), g.amax(-1), args)
    q_ct = ct_quantize(wt, scale_ct, zp, args, dtype=torch.int8).numpy()
    w_KN = np.swapaxes(wt.float().numpy().astype(ml_dtypes.bfloat16), 0, 1)
    packed, scale = L.quantize(jnp.asarray(w_KN) if as_jax else w_KN)
    np.testing.assert_array_equal(np.asarray(L.unpack(packed)), q_ct.T)
    np.testing.assert_array_equal(np.asarray(scale).astype(np.float32), scale_ct.float().numpy().T)
    assert q_ct.min() == -8 and q_ct.max() == 7


def test_k_must_be_whole_scale_groups():
    with pytest.raises(ValueError):
        L.planar_block(48)
