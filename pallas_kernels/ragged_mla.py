"""Placeholder reference of the ragged paged MLA attention (replaced by the kernels branch)."""

import jax
import jax.numpy as jnp

TPU_PAGE_SIZE = 128
GPU_PAGE_SIZE = 64


def ragged_mla_reference(q_BTHC, kv_LPNC, table_BM, kv_len_B, q_start_B, layer, page_first, *, sm_scale: float,
                         rank: int, page_stride: int = 1):
    """Plain jnp in float32: gather the row's pages, mask by length and causality."""
    b, m = table_BM.shape
    n, c = kv_LPNC.shape[2:]
    kv_BSC = kv_LPNC[layer][table_BM].reshape(b, m * n, c).astype(jnp.float32)
    pos_S = ((page_first + jnp.arange(m) * page_stride)[:, None] * n + jnp.arange(n)).reshape(-1)
    q_pos_BT = q_start_B[:, None] + jnp.arange(q_BTHC.shape[1])
    visible_BTS = (pos_S[None, None] < kv_len_B[:, None, None]) & (pos_S[None, None] <= q_pos_BT[..., None])
    hi = jax.lax.Precision.HIGHEST
    s_BTHS = jnp.einsum("bthc,bsc->bths", q_BTHC.astype(jnp.float32), kv_BSC, precision=hi) * sm_scale
    s_BTHS = jnp.where(visible_BTS[:, :, None], s_BTHS, -jnp.inf)
    m_BTH = jnp.max(s_BTHS, axis=-1)
    safe_BTH = jnp.where(jnp.isfinite(m_BTH), m_BTH, 0)
    p_BTHS = jnp.exp(s_BTHS - safe_BTH[..., None])
    l_BTH = jnp.sum(p_BTHS, axis=-1)
    o_BTHR = jnp.einsum("bths,bsr->bthr", p_BTHS, kv_BSC[..., :rank], precision=hi)
    seen = l_BTH > 0
    o_BTHR = o_BTHR / jnp.where(seen, l_BTH, 1)[..., None]
    return o_BTHR, jnp.where(seen, safe_BTH + jnp.log(jnp.where(seen, l_BTH, 1)), -jnp.inf)
