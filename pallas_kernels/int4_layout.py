"""In-memory INT4 format of the kernels, and conversions to and from compressed-tensors.

Format: `packed` uint8 [..., K//2, N], `scale` bf16 [..., K//32, N]; W[k, n] = q[k, n] * scale[k // 32, n]
with q in -8..7 stored offset-binary (nibble = q + 8), as compressed-tensors stores it.

Nibbles are planar inside blocks of `planar_block(K)` rows of K (256 for every K2 matrix): byte row r of
block j holds k = j*P + r in its low nibble and k = j*P + P/2 + r in its high nibble. A kernel that loads
P/2 byte rows gets two contiguous, group-aligned halves of K with shifts and masks alone, no interleave.

Every function takes numpy or jax arrays and returns the same kind (the loader converts on host with numpy).
"""

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

GROUP = 32
QMIN, QMAX = -8, 7
SCALE_DTYPE = jnp.bfloat16
MAX_PLANAR_BLOCK = 256
# compressed-tensors' symmetric int scale: max|w| / ((QMAX - QMIN) / 2), zero scales replaced by eps(bf16).
SCALE_DIVISOR = (QMAX - QMIN) / 2
ZERO_SCALE = float(ml_dtypes.finfo(ml_dtypes.bfloat16).eps)


def _xp(a):
    """numpy for host arrays, jax.numpy otherwise, so each function keeps its input's kind."""
    return np if isinstance(a, np.ndarray) else jnp


def planar_block(k: int) -> int:
    """Rows of K per planar nibble block: gcd(K, 256); K must be a multiple of the scale group (32)."""
    if k % GROUP:
        raise ValueError(f"K={k} must be a multiple of {GROUP}")
    return math.gcd(k, MAX_PLANAR_BLOCK)


def pack(q_KN):
    """int8 values -8..7 [..., K, N] -> planar offset-binary uint8 [..., K//2, N]."""
    xp = _xp(q_KN)
    *lead, k, n = q_KN.shape
    p = planar_block(k)
    u = (q_KN.astype(xp.int32) - QMIN).reshape(*lead, k // p, 2, p // 2, n)
    byte = u[..., 0, :, :] | (u[..., 1, :, :] << 4)
    return byte.reshape(*lead, k // 2, n).astype(xp.uint8)


def unpack(packed_KN):
    """Planar uint8 [..., K//2, N] -> int8 values -8..7 [..., K, N]."""
    xp = _xp(packed_KN)
    *lead, half_k, n = packed_KN.shape
    k = 2 * half_k
    p = planar_block(k)
    b = packed_KN.astype(xp.int32).reshape(*lead, k // p, p // 2, n)
    q = xp.stack([b & 0xF, b >> 4], axis=-3) + QMIN
    return q.reshape(*lead, k, n).astype(xp.int8)


def _group_view(a_KN):
    """[..., K, N] -> [..., K//32, 32, N]: one scale group per slice of the third-from-last axis."""
    *lead, k, n = a_KN.shape
    return a_KN.reshape(*lead, k // GROUP, GROUP, n)


def quantize(w_KN):
    """Symmetric group-32 INT4 quantization, bit-exact with compressed-tensors' rule -> (packed, scale)."""
    xp = _xp(w_KN)
    w_GgN = _group_view(w_KN)
    amax_GN = xp.max(xp.abs(w_GgN.astype(xp.float32)), axis=-2)
    scale_GN = (amax_GN / SCALE_DIVISOR).astype(SCALE_DTYPE)
    scale_GN = xp.where(scale_GN == 0, xp.asarray(ZERO_SCALE, SCALE_DTYPE), scale_GN)
    # The quotient is rounded to w's dtype before rounding to an integer, as torch does for bf16 weights.
    ratio = (w_GgN.astype(xp.float32) / scale_GN[..., None, :].astype(xp.float32)).astype(w_KN.dtype)
    q_GgN = xp.clip(xp.round(ratio.astype(xp.float32)), QMIN, QMAX)
    return pack(q_GgN.reshape(w_KN.shape).astype(xp.int8)), scale_GN


def dequantize(packed_KN, scale_GN, dtype=jnp.float32):
    """(packed, scale) -> W [..., K, N] in dtype; the product is exact in fp32 before the cast."""
    xp = _xp(packed_KN)
    q_GgN = _group_view(unpack(packed_KN)).astype(xp.float32)
    w_GgN = q_GgN * scale_GN[..., None, :].astype(xp.float32)
    return w_GgN.reshape(*packed_KN.shape[:-2], 2 * packed_KN.shape[-2], packed_KN.shape[-1]).astype(dtype)


def _int32_to_uint32(a):
    """Reinterpret int32 bits as uint32 (host view or device bitcast)."""
    return a.view(np.uint32) if isinstance(a, np.ndarray) else jax.lax.bitcast_convert_type(a, jnp.uint32)


def _uint32_to_int32(a):
    """Reinterpret uint32 bits as int32 (host view or device bitcast)."""
    return a.view(np.int32) if isinstance(a, np.ndarray) else jax.lax.bitcast_convert_type(a, jnp.int32)


def from_compressed_tensors(weight_packed_NW, weight_scale_NG):
    """compressed-tensors (int32 [..., N, K//8] lowest nibble first, bf16 [..., N, K//32]) -> (packed, scale)."""
    xp = _xp(weight_packed_NW)
    *lead, n, words = weight_packed_NW.shape
    u_NW = _int32_to_uint32(weight_packed_NW)
    shifts = xp.arange(0, 32, 4, dtype=xp.uint32)
    nib_NWe = (u_NW[..., None] >> shifts) & 0xF
    q_NK = nib_NWe.reshape(*lead, n, 8 * words).astype(xp.int32) + QMIN
    packed = pack(xp.swapaxes(q_NK, -1, -2).astype(xp.int8))
    return packed, xp.swapaxes(weight_scale_NG, -1, -2).astype(SCALE_DTYPE)


def to_compressed_tensors(packed_KN, scale_GN):
    """(packed, scale) -> compressed-tensors (weight_packed int32 [..., N, K//8], weight_scale [..., N, K//32])."""
    xp = _xp(packed_KN)
    q_NK = xp.swapaxes(unpack(packed_KN), -1, -2)
    *lead, n, k = q_NK.shape
    nib_NWe = (q_NK.astype(xp.int32) - QMIN).astype(xp.uint32).reshape(*lead, n, k // 8, 8)
    shifts = xp.arange(0, 32, 4, dtype=xp.uint32)
    # Nibbles occupy disjoint bits, so their sum is their bitwise or.
    words_NW = xp.sum(nib_NWe << shifts, axis=-1, dtype=xp.uint32)
    return _uint32_to_int32(words_NW), xp.swapaxes(scale_GN, -1, -2)
