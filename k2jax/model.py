"""The Kimi K2 forward pass: MLA attention over a latent cache, sigmoid-routed MoE, in functional Flax NNX.

Modules only declare parameters (shape, dtype, logical axes); the forward pass is plain functions of them,
read top to bottom. Layers [0, first_k_dense_replace) form one stacked dense module, the rest one stacked
MoE module; each stack is iterated with `lax.scan`, so compile time does not grow with depth.
Shape suffixes: B batch, T new tokens, S cache length, H heads, D head dim, R kv_lora_rank, P rope dim,
C cache lanes, E experts, K top-k, M hidden, F intermediate, V vocab, L layers, N rows; the page pool is
pool_LPNC [layers, pages, page_size, C] and page tables table_BM [rows, pages per row] (k2jax.cache).

On a mesh (jax.set_mesh; axes from sharding.rules) attention and the routed experts run in explicit
shard_maps: attention per row shard and head shard (o_proj partials summed over 'tensor'), each device on
the pages it holds with the ragged kernel (partial softmaxes combined by log-sum-exp when a row's pages are
spread over devices); the routed experts per expert shard on the tokens of its data group (partials
reduce-scattered back to their rows). Expert weights are never gathered and the pool never copied.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec as P

from k2jax.cache import Packing, PagedCache, PoolLayout, pool_sharding
from k2jax.config import K2Config, yarn_mscale
from pallas_kernels import dispatch, int4_layout
from sharding.rules import partition_spec, spec_axes

Array = jax.Array


def _param(rngs: nnx.Rngs | None, shape: tuple[int, ...], axes: tuple[str | None, ...], dtype: Any,
           stack: int | None, fill: float | None = None, zero_cols: int = 0) -> nnx.Param:
    """A parameter with logical axis names; `stack` prepends a 'layers' axis; `fill` makes it constant;
    its last `zero_cols` columns are zero (padding)."""
    if stack is not None:
        shape, axes = (stack, *shape), ("layers", *axes)
    if fill is not None:
        value = jnp.full(shape, fill, dtype)
    else:
        value = (0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    value = value.at[..., shape[-1] - zero_cols:].set(0) if zero_cols else value
    return nnx.Param(value, axes=axes)


class MLA(nnx.Module):
    """Multi-head latent attention weights; heads are an explicit axis so they can be sharded."""

    def __init__(self, cfg: K2Config, rngs: nnx.Rngs, dtype: Any, stack: int | None = None):
        M, H, R = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank
        if cfg.q_lora_rank is not None:
            Q = cfg.q_lora_rank
            self.q_a = _param(rngs, (M, Q), ("embed", "q_lora"), dtype, stack)
            self.q_a_norm = _param(rngs, (Q,), ("q_lora",), dtype, stack, fill=1.0)
            self.q_b = _param(rngs, (Q, H, cfg.qk_head_dim), ("q_lora", "heads", "head_dim"), dtype, stack)
        else:
            self.q_proj = _param(rngs, (M, H, cfg.qk_head_dim), ("embed", "heads", "head_dim"), dtype, stack)
        # kv_a's outputs are a cached token's lanes (c_kv | k_pe), zero columns padding them to the cache's 128-lane
        # multiple: with 576 columns libtpu lays the stack out hidden-axis-minor, and the layer loop copied it whole.
        self.kv_a = _param(rngs, (M, cfg.cache_lanes), ("embed", "kv_lora"), dtype, stack,
                           zero_cols=cfg.cache_pad)
        self.kv_a_norm = _param(rngs, (R,), ("kv_lora",), dtype, stack, fill=1.0)
        # kv_b_proj split into the two per-head matrices of the absorbed path, each [in, out] per head.
        self.w_uk = _param(rngs, (H, cfg.qk_nope_head_dim, R), ("heads", "head_dim", "kv_lora"), dtype, stack)
        self.w_uv = _param(rngs, (H, R, cfg.v_head_dim), ("heads", "kv_lora", "head_dim"), dtype, stack)
        self.o_proj = _param(rngs, (H, cfg.v_head_dim, M), ("heads", "head_dim", "embed"), dtype, stack)


class MLP(nnx.Module):
    """SwiGLU feed-forward: the dense layers' MLP and the MoE layers' shared expert."""

    def __init__(self, hidden: int, inter: int, rngs: nnx.Rngs, dtype: Any, stack: int | None = None):
        self.gate = _param(rngs, (hidden, inter), ("embed", "mlp"), dtype, stack)
        self.up = _param(rngs, (hidden, inter), ("embed", "mlp"), dtype, stack)
        self.down = _param(rngs, (inter, hidden), ("mlp", "embed"), dtype, stack)


class ExpertProj(nnx.Module):
    """One projection of all routed experts, [E, K_in, N_out]: dense, or INT4 (packed + group-32 scales)."""

    def __init__(self, n_exp: int, k_in: int, n_out: int, axes: tuple[str, str], int4: bool, rngs: nnx.Rngs,
                 dtype: Any, stack: int | None = None):
        axes = ("experts", *axes)
        if int4:
            packed, scale = int4_layout.quantize(_param(rngs, (n_exp, k_in, n_out), axes, jnp.float32, stack)[...])
            self.packed = nnx.Param(packed, axes=(("layers",) if stack else ()) + axes)
            self.scale = nnx.Param(scale.astype(dtype), axes=(("layers",) if stack else ()) + axes)
        else:
            self.weight = _param(rngs, (n_exp, k_in, n_out), axes, dtype, stack)


class MoE(nnx.Module):
    """Sigmoid router with score-correction bias, routed experts, and the shared expert."""

    def __init__(self, cfg: K2Config, rngs: nnx.Rngs, dtype: Any, stack: int | None = None):
        M, E, F = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
        int4 = cfg.quant is not None
        self.router = _param(rngs, (M, E), ("embed", None), dtype, stack)
        self.router_bias = _param(rngs, (E,), (None,), jnp.float32, stack, fill=0.0)
        self.gate = ExpertProj(E, M, F, ("embed", "expert_mlp"), int4, rngs, dtype, stack)
        self.up = ExpertProj(E, M, F, ("embed", "expert_mlp"), int4, rngs, dtype, stack)
        self.down = ExpertProj(E, F, M, ("expert_mlp", "embed"), int4, rngs, dtype, stack)
        self.shared = MLP(M, F * cfg.n_shared_experts, rngs, dtype, stack) if cfg.n_shared_experts else None


class Block(nnx.Module):
    """One decoder layer (stacked over layers): attention, then a dense MLP or the MoE."""

    def __init__(self, cfg: K2Config, moe: bool, rngs: nnx.Rngs, dtype: Any, stack: int):
        M = cfg.hidden_size
        self.attn_norm = _param(rngs, (M,), ("embed",), dtype, stack, fill=1.0)
        self.attn = MLA(cfg, rngs, dtype, stack)
        self.mlp_norm = _param(rngs, (M,), ("embed",), dtype, stack, fill=1.0)
        self.mlp = MoE(cfg, rngs, dtype, stack) if moe else MLP(M, cfg.intermediate_size, rngs, dtype, stack)


class K2Model(nnx.Module):
    """All parameters of a Kimi K2 model."""

    def __init__(self, cfg: K2Config, rngs: nnx.Rngs, dtype: Any = jnp.bfloat16):
        n_dense, n_moe = cfg.first_k_dense_replace, cfg.num_moe_layers
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dtype, None)
        self.dense_layers = Block(cfg, False, rngs, dtype, n_dense) if n_dense else None
        self.moe_layers = Block(cfg, True, rngs, dtype, n_moe) if n_moe else None
        self.final_norm = _param(rngs, (cfg.hidden_size,), ("embed",), dtype, None, fill=1.0)
        self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), dtype, None)


def context_mesh() -> AbstractMesh | None:
    """The mesh set by jax.set_mesh around the traced call, or None (single-device code paths)."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def rms_norm(x: Array, scale: Array, eps: float) -> Array:
    """RMSNorm computed in float32, scaled in the input dtype (as HF DeepseekV3RMSNorm)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * y.astype(x.dtype)


def rope_inv_freq(cfg: K2Config) -> Array:
    """Inverse rotary frequencies over the rope dim, with YaRN's ramp between interpolation and extrapolation."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    pos_freqs = base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    if cfg.rope_type != "yarn":
        return 1.0 / pos_freqs

    def correction_dim(rotations: float) -> float:
        return dim * jnp.log(cfg.original_max_position_embeddings / (rotations * 2 * jnp.pi)) / (2 * jnp.log(base))

    low, high = correction_dim(cfg.beta_fast), correction_dim(cfg.beta_slow)
    if cfg.rope_truncate:
        low, high = jnp.floor(low), jnp.ceil(high)
    low, high = jnp.maximum(low, 0), jnp.minimum(high, dim - 1)
    high = jnp.where(low == high, high + 0.001, high)
    ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    return (1.0 / (cfg.rope_factor * pos_freqs)) * ramp + (1.0 / pos_freqs) * extrapolation


def rope_cos_sin(cfg: K2Config, pos_BT: Array) -> tuple[Array, Array]:
    """cos and sin [B, T, P/2] for absolute positions, times the YaRN attention factor."""
    if cfg.rope_type != "yarn":
        factor = 1.0
    elif cfg.rope_attention_factor is not None:
        factor = cfg.rope_attention_factor
    elif cfg.mscale and cfg.mscale_all_dim:
        factor = yarn_mscale(cfg.rope_factor, cfg.mscale) / yarn_mscale(cfg.rope_factor, cfg.mscale_all_dim)
    else:
        factor = yarn_mscale(cfg.rope_factor)
    angles = pos_BT.astype(jnp.float32)[..., None] * rope_inv_freq(cfg)
    return jnp.cos(angles) * factor, jnp.sin(angles) * factor


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate interleaved pairs (2i, 2i+1); the output holds the rotated evens then odds (as HF does).

    q and k get the same permutation, so their dot products are those of the interleaved rotation.
    """
    if x.ndim == 4:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x1, x2 = x[..., 0::2].astype(jnp.float32), x[..., 1::2].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def _proj(x_K: Array, w: Array, layer: Array | None, out_dims: int = 1, out_dtype: Any = None) -> Array:
    """x [..., K] times layer `layer` of the weight stack w [L, *in, *out] ([*in, *out] when layer is None), its
    `out_dims` trailing axes the output: [..., *out] in out_dtype (default x's). Weights are read in place."""
    out = w.shape[w.ndim - out_dims:]
    w_KN = w.reshape(*w.shape[:0 if layer is None else 1], x_K.shape[-1], math.prod(out))
    y_XN = dispatch.matmul(x_K.reshape(-1, x_K.shape[-1]), w_KN, layer=layer, out_dtype=out_dtype)
    return y_XN.reshape(*x_K.shape[:-1], *out)


def _per_head(x_BTHK: Array, w_LHKN: Array, layer: Array) -> Array:
    """Each head's rows times its own matrix of layer `layer`: x [B, T, H, K] -> [B, T, H, N]."""
    B, T, H, K = x_BTHK.shape
    y_HXN = dispatch.head_matmul(x_BTHK.reshape(B * T, H, K).transpose(1, 0, 2), w_LHKN, layer=layer)
    return y_HXN.transpose(1, 0, 2).reshape(B, T, H, -1)


def mla(p: MLA, xs_BTM: tuple[Array, ...], pos_BT: tuple[Array, ...], pool_LPNC: Array | None,
        caches: tuple[PagedCache | None, ...], layer: Array, cfg: K2Config) -> tuple[tuple[Array, ...], Array | None]:
    """Multi-head latent attention over segments of rows; with a page pool, writes every segment's latents into
    layer `layer` first, then each segment attends over its rows' pages (absorbed: queries projected into the
    latent space, the cache never expanded).

    Writing all segments before any reads keeps the pool's updates one in-place chain: a read between two writes
    would make XLA copy the whole pool per layer. With no pool each segment attends to itself (a full causal
    prefill), keys and values expanded per head.
    """
    qkv = [project_qkv(p, x_BTM, pos, layer, cfg) for x_BTM, pos in zip(xs_BTM, pos_BT)]
    mesh = context_mesh()
    h = None if mesh is None else partition_spec(("heads",), mesh)[0]
    head_axes = tuple(a for a in spec_axes(h) if mesh.shape[a] > 1)
    weights = (p.w_uk[...], p.w_uv[...], p.o_proj[...])
    if pool_LPNC is None:
        causal = functools.partial(causal_attention, cfg=cfg, head_axes=head_axes)
        outs = []
        for (q_nope_BTHD, q_pe_BTHP, new_BTC), pos in zip(qkv, pos_BT):
            attend = causal
            if mesh is not None:
                b = partition_spec(("batch",), mesh, pos.shape[:1])[0]
                attend = jax.shard_map(causal, mesh=mesh, check_vma=False, out_specs=P(b),
                                       in_specs=(P(b, None, h), P(b, None, h), P(b), P(b), P(), P(None, h),
                                                 P(None, h), P(None, h)))
            outs.append(attend(q_nope_BTHD, q_pe_BTHP, new_BTC, pos, layer, *weights))
        return tuple(outs), None
    layout = caches[0].layout
    # A segment over all the layout's rows splits them as the pages are split; a segment over other rows (prompt
    # chunks of any slots, however many) runs on every device, each attending over the pages it holds.
    row_axes = [layout.row_axes if c.all_rows and pos.shape[0] == layout.n_rows else ()
                for pos, c in zip(pos_BT, caches)]
    combine_axes = tuple(tuple(a for a in layout.pool_axes if a not in rows) for rows in row_axes)
    segments = tuple((*q, pos, c.table_BM, c.kv_len_B, c.packing) for q, pos, c in zip(qkv, pos_BT, caches))
    attend = functools.partial(paged_attention, cfg=cfg, layout=layout, head_axes=head_axes,
                               combine_axes=combine_axes)
    if mesh is None:
        return attend(segments, pool_LPNC, layer, *weights)
    b = [rows if len(rows) > 1 else (rows[0] if rows else None) for rows in row_axes]
    pool_spec = pool_sharding(layout, mesh).spec
    seg_specs = tuple((P(bi, None, h), P(bi, None, h), P(bi), P(bi), P(bi), P(bi), P()) for bi in b)
    return jax.shard_map(attend, mesh=mesh, check_vma=False,
                         in_specs=(seg_specs, pool_spec, P(), P(None, h), P(None, h), P(None, h)),
                         out_specs=(tuple(P(bi) for bi in b), pool_spec))(segments, pool_LPNC, layer, *weights)


def project_qkv(p: MLA, x_BTM: Array, pos_BT: Array, layer: Array, cfg: K2Config) -> tuple[Array, Array, Array]:
    """Queries (no-rope part q_nope_BTHD, roped q_pe_BTHP) and the new latents new_BTC (normed kv latent and roped
    key, the cache's layout) of layer `layer`."""
    eps, R, P = cfg.rms_norm_eps, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    if cfg.q_lora_rank is not None:
        q_BTQ = rms_norm(_proj(x_BTM, p.q_a[...], layer), p.q_a_norm[...][layer], eps)
        q_BTHD = _proj(q_BTQ, p.q_b[...], layer, out_dims=2)
    else:
        q_BTHD = _proj(x_BTM, p.q_proj[...], layer, out_dims=2)
    cos, sin = rope_cos_sin(cfg, pos_BT)
    Dn = cfg.qk_nope_head_dim
    q_nope_BTHD, q_pe_BTHP = q_BTHD[..., :Dn], apply_rope(q_BTHD[..., Dn:], cos, sin)
    kv_BTX = _proj(x_BTM, p.kv_a[...], layer)
    new_BTC = jnp.concatenate([rms_norm(kv_BTX[..., :R], p.kv_a_norm[...][layer], eps),
                               apply_rope(kv_BTX[..., R:R + P], cos, sin)], axis=-1)
    return q_nope_BTHD, q_pe_BTHP, new_BTC


def causal_attention(q_nope_BTHD: Array, q_pe_BTHP: Array, new_BTC: Array, pos_BT: Array, layer: Array,
                     w_uk_LHDR: Array, w_uv_LHRD: Array, o_proj_LHDM: Array, *, cfg: K2Config,
                     head_axes: tuple[str, ...]) -> Array:
    """The chunk attending to itself (no cache): keys and values expanded per head; o_proj partials summed."""
    R, dtype = cfg.kv_lora_rank, q_nope_BTHD.dtype
    ckv_BSR, kpe_BSP = new_BTC[..., :R], new_BTC[..., R:]
    k_nope_BSHD = jnp.einsum("bsr,hdr->bshd", ckv_BSR, w_uk_LHDR[layer].astype(dtype),
                             preferred_element_type=jnp.float32).astype(dtype)
    v_BSHD = jnp.einsum("bsr,hrd->bshd", ckv_BSR, w_uv_LHRD[layer].astype(dtype),
                        preferred_element_type=jnp.float32).astype(dtype)
    scores_BHTS = (jnp.einsum("bthd,bshd->bhts", q_nope_BTHD, k_nope_BSHD, preferred_element_type=jnp.float32)
                   + jnp.einsum("bthp,bsp->bhts", q_pe_BTHP, kpe_BSP, preferred_element_type=jnp.float32))
    visible_B1TS = (pos_BT[:, None, :] <= pos_BT[:, :, None])[:, None]
    probs_BHTS = jax.nn.softmax(jnp.where(visible_B1TS, scores_BHTS * cfg.softmax_scale, -jnp.inf), axis=-1)
    o_BTHD = jnp.einsum("bhts,bshd->bthd", probs_BHTS.astype(dtype), v_BSHD)
    return project_out(o_BTHD, o_proj_LHDM, layer, head_axes)


def project_out(o_BTHD: Array, o_proj_LHDM: Array, layer: Array, head_axes: tuple[str, ...]) -> Array:
    """o_proj of layer `layer` over this shard's heads, partial sums added over `head_axes` (in float32)."""
    B, T = o_BTHD.shape[:2]
    o_BTM = _proj(o_BTHD.reshape(B, T, -1), o_proj_LHDM, layer, out_dtype=jnp.float32)
    return (jax.lax.psum(o_BTM, head_axes) if head_axes else o_BTM).astype(o_BTHD.dtype)


def paged_attention(segments: tuple[tuple[Array, ...], ...], pool_LPNC: Array, layer: Array, w_uk_LHDR: Array,
                    w_uv_LHRD: Array, o_proj_LHDM: Array, *, cfg: K2Config, layout: PoolLayout,
                    head_axes: tuple[str, ...], combine_axes: tuple[tuple[str, ...], ...]
                    ) -> tuple[tuple[Array, ...], Array]:
    """Write every segment's new latents into this device's pages, then attend each segment (q_nope_BTHD,
    q_pe_BTHP, new_BTC, pos_BT, table_BM, kv_len_B, packing) over them with the ragged kernel, combining shards over
    its `combine_axes`. A packed segment's tokens go to its rows' [B, T] layout for the write and the kernel only.

    This device holds pages [first, first + pages_per_group) of the pool: its own rows' pages of its position
    shard (every `seq_shards`-th page of a row, from the shard index on). Rows whose pages live elsewhere see
    nothing here; partial outputs combine by log-sum-exp over the pool axes that do not split the segment's rows.
    When heads are split over a combining axis, queries of all heads are gathered and the combined outputs
    reduce-scattered back to this shard's heads.
    """
    first = (jax.lax.axis_index(layout.pool_axes) if layout.pool_axes else 0) * layout.pages_per_group
    places_BT = [pos_BT if packing is None else packing.pos_BT for *_, pos_BT, _, _, packing in segments]
    for (_, _, new_BTC, _, table_BM, kv_len_B, packing), pos_BT in zip(segments, places_BT):
        new_BTC = new_BTC if packing is None else packing.to_places(new_BTC)
        pool_LPNC = write_latents(pool_LPNC, new_BTC, pos_BT, table_BM - first, kv_len_B, layer, layout)
    outs = tuple(attend_pages(q_nope_BTHD, q_pe_BTHP, pos_BT, table_BM - first, kv_len_B, pool_LPNC, layer, w_uk_LHDR,
                              w_uv_LHRD, o_proj_LHDM, packing, cfg=cfg, layout=layout, head_axes=head_axes,
                              combine_axes=combine)
                 for (q_nope_BTHD, q_pe_BTHP, _, _, table_BM, kv_len_B, packing), pos_BT, combine
                 in zip(segments, places_BT, combine_axes))
    return outs, pool_LPNC


def write_latents(pool_LPNC: Array, new_BTC: Array, pos_BT: Array, local_BM: Array, kv_len_B: Array, layer: Array,
                  layout: PoolLayout) -> Array:
    """The pool with layer `layer`'s latents of positions below kv_len_B written into the pages this device holds
    (local_BM: page ids relative to its first page; the rest dropped)."""
    N, ppg, M = layout.page_size, layout.pages_per_group, local_BM.shape[1]
    page_BT = jnp.take_along_axis(local_BM, jnp.clip(pos_BT // N, 0, M - 1), axis=1)
    mine_BT = (pos_BT < kv_len_B[:, None]) & (page_BT >= 0) & (page_BT < ppg)
    new_BTC = jnp.pad(new_BTC, ((0, 0), (0, 0), (0, pool_LPNC.shape[-1] - new_BTC.shape[-1])))
    return pool_LPNC.at[layer, jnp.where(mine_BT, page_BT, ppg), pos_BT % N].set(new_BTC.astype(pool_LPNC.dtype),
                                                                                  mode="drop")


def attend_pages(q_nope_BTHD: Array, q_pe_BTHP: Array, pos_BT: Array, local_BM: Array, kv_len_B: Array,
                 pool_LPNC: Array, layer: Array, w_uk_LHDR: Array, w_uv_LHRD: Array, o_proj_LHDM: Array,
                 packing: Packing | None = None, *, cfg: K2Config, layout: PoolLayout, head_axes: tuple[str, ...],
                 combine_axes: tuple[str, ...]) -> Array:
    """One segment's absorbed attention over the pages this device holds of its rows (the ragged kernel), partial
    softmaxes combined over `combine_axes`, then W_UV and o_proj. A packed segment's queries go to its rows' layout
    (whose positions pos_BT are) for the kernel alone: the projections before and after it run over its tokens, no
    padding between them."""
    R, ppg, dtype = cfg.kv_lora_rank, layout.pages_per_group, q_nope_BTHD.dtype
    shard = jax.lax.axis_index(layout.seq_axes) if layout.seq_axes else 0
    B, M = local_BM.shape
    stripe_BM = jax.lax.dynamic_index_in_dim(local_BM.reshape(B, M // layout.seq_shards, layout.seq_shards), shard,
                                             axis=2, keepdims=False)
    holds_B = (stripe_BM[:, 0] >= 0) & (stripe_BM[:, 0] < ppg)
    q_lat_BTHR = _per_head(q_nope_BTHD, w_uk_LHDR, layer)
    gathered = head_axes if set(head_axes) & set(combine_axes) else ()
    if gathered:
        q_lat_BTHR, q_pe_BTHP = (jax.lax.all_gather(q, gathered, axis=2, tiled=True) for q in (q_lat_BTHR, q_pe_BTHP))
    pad = pool_LPNC.shape[-1] - R - q_pe_BTHP.shape[-1]
    q_BTHC = jnp.concatenate([q_lat_BTHR, q_pe_BTHP, jnp.zeros((*q_pe_BTHP.shape[:3], pad), dtype)], axis=-1)
    if packing is not None:
        q_BTHC = packing.to_places(q_BTHC)
    o_BTHR, lse_BTH = dispatch.ragged_mla(
        q_BTHC.astype(pool_LPNC.dtype), pool_LPNC, jnp.clip(stripe_BM, 0, ppg - 1), jnp.where(holds_B, kv_len_B, 0),
        pos_BT[:, 0], layer, jnp.asarray(shard, jnp.int32), sm_scale=cfg.softmax_scale, rank=R,
        page_stride=layout.seq_shards, width=R + q_pe_BTHP.shape[-1])
    if combine_axes:
        o_BTHR = combine_shards(o_BTHR, lse_BTH, combine_axes, gathered)
    if packing is not None:
        o_BTHR = packing.to_tokens(o_BTHR)
    o_BTHD = _per_head(o_BTHR.astype(dtype), w_uv_LHRD, layer)
    return project_out(o_BTHD, o_proj_LHDM, layer, head_axes)


def combine_shards(o_BTHR: Array, lse_BTH: Array, axes: tuple[str, ...], scatter_axes: tuple[str, ...]) -> Array:
    """Exact softmax over all shards' keys from per-shard normalized outputs and log-sum-exps (float32).

    With `scatter_axes`, the sums are reduce-scattered over heads along them (each shard keeps its heads).
    """
    max_BTH = jax.lax.pmax(lse_BTH, axes)
    w_BTH = jnp.exp(lse_BTH - jnp.where(jnp.isfinite(max_BTH), max_BTH, 0))
    num_BTHR = o_BTHR * w_BTH[..., None]
    if scatter_axes:
        num_BTHR, w_BTH = (jax.lax.psum_scatter(x, scatter_axes, scatter_dimension=2, tiled=True)
                           for x in (num_BTHR, w_BTH))
    rest = tuple(a for a in axes if a not in scatter_axes)
    if rest:
        num_BTHR, w_BTH = jax.lax.psum(num_BTHR, rest), jax.lax.psum(w_BTH, rest)
    return num_BTHR / jnp.where(w_BTH > 0, w_BTH, 1)[..., None]


def mlp(p: MLP, x_NM: Array, layer: Array) -> Array:
    """down(silu(gate x) * up x) with layer `layer`'s weights."""
    h_NF = jax.nn.silu(_proj(x_NM, p.gate[...], layer)) * _proj(x_NM, p.up[...], layer)
    return _proj(h_NF, p.down[...], layer)


def route(p: MoE, x_NM: Array, layer: Array, cfg: K2Config) -> tuple[Array, Array]:
    """noaux_tc sigmoid routing in float32: biased choice (group-limited), unbiased normalised weights."""
    scores_NE = jax.nn.sigmoid(_proj(x_NM.astype(jnp.float32), p.router[...], layer))
    choice_NE = scores_NE + p.router_bias[...][layer]
    if cfg.n_group > 1:
        N, E, G = choice_NE.shape[0], cfg.n_routed_experts, cfg.n_group
        grouped_NGX = choice_NE.reshape(N, G, E // G)
        group_score_NG = jax.lax.top_k(grouped_NGX, 2)[0].sum(-1)
        keep_NG = jax.nn.one_hot(jax.lax.top_k(group_score_NG, cfg.topk_group)[1], G).sum(1) > 0
        choice_NE = jnp.where(keep_NG[:, :, None], grouped_NGX, -jnp.inf).reshape(N, E)
    idx_NK = jax.lax.top_k(choice_NE, cfg.num_experts_per_tok)[1]
    w_NK = jnp.take_along_axis(scores_NE, idx_NK, axis=-1)
    if cfg.norm_topk_prob:
        w_NK = w_NK / (w_NK.sum(-1, keepdims=True) + 1e-20)
    return w_NK * cfg.routed_scaling_factor, idx_NK


def expert_matmul(p: ExpertProj, layer: Array, x_XK: Array, sizes_E: Array) -> Array:
    """Rows grouped by expert (sizes_E rows each, in id order) times their expert's matrix, dense or INT4.

    The weights are the whole layer stack; every path reads the experts of `layer` that got rows, in place.
    """
    if hasattr(p, "packed"):
        return dispatch.grouped_int4_matmul(x_XK, p.packed[...], p.scale[...], sizes_E, layer=layer)
    return dispatch.grouped_matmul(x_XK, p.weight[...], sizes_E, layer=layer)


def expert_sum(projs: tuple[ExpertProj, ExpertProj, ExpertProj], x_NM: Array, w_NK: Array, idx_NK: Array,
               layer: Array, first: Array | int, n_local: int) -> Array:
    """float32 [N, M]: sum over k of w_k * expert_k(x) for the experts first..first+n_local held here (others 0)."""
    gate, up, down = projs
    N, K = idx_NK.shape
    local_NK = idx_NK - first
    mine_NK = (local_NK >= 0) & (local_NK < n_local)
    key_NK = jnp.where(mine_NK, local_NK, n_local)
    order_X = jnp.argsort(key_NK.reshape(-1))
    xs_XM = x_NM[order_X // K]
    sizes_E = jnp.bincount(key_NK.reshape(-1), length=n_local).astype(jnp.int32)  # key n_local: not here
    h_XF = jax.nn.silu(expert_matmul(gate, layer, xs_XM, sizes_E)) * expert_matmul(up, layer, xs_XM, sizes_E)
    ys_XM = expert_matmul(down, layer, h_XF, sizes_E)
    y_NKM = jnp.zeros_like(ys_XM).at[order_X].set(ys_XM).reshape(N, K, -1).astype(jnp.float32)
    return jnp.einsum("nkm,nk->nm", jnp.where(mine_NK[..., None], y_NKM, 0.0), w_NK)


def routed_experts(p: MoE, x_NM: Array, w_NK: Array, idx_NK: Array, layer: Array, cfg: K2Config) -> Array:
    """float32 [N, M] routed-expert output; on a mesh, expert-parallel in a shard_map (weights never gathered).

    Each device runs its own experts (and its slice of their columns) on the tokens of its data group:
    token rows split over the expert axis are all-gathered (decode-sized), the partial sums reduce-scattered
    back to their rows, and summed over the expert-column axis.
    """
    projs, E = (p.gate, p.up, p.down), cfg.n_routed_experts
    mesh = context_mesh()
    if mesh is None:
        return expert_sum(projs, x_NM, w_NK, idx_NK, layer, 0, E)
    graphdef, state = nnx.split(projs)
    state_specs = jax.tree.map(lambda v: partition_spec(v.get_metadata()["axes"], mesh), state,
                               is_leaf=lambda v: isinstance(v, nnx.Variable))
    ep, tp = (spec_axes(partition_spec((axis,), mesh)[0]) for axis in ("experts", "expert_mlp"))
    _check_column_split(cfg, math.prod(mesh.shape[a] for a in tp))
    b = partition_spec(("batch",), mesh, x_NM.shape[:1])[0]
    gathered = tuple(a for a in spec_axes(b) if a in ep)
    summed = tuple(a for a in ep + tp if a not in gathered)
    n_local = E // math.prod(mesh.shape[a] for a in ep)

    def local(state: nnx.State, x_NM: Array, w_NK: Array, idx_NK: Array, layer: Array) -> Array:
        if gathered:
            x_NM, w_NK, idx_NK = (jax.lax.all_gather(a, gathered, tiled=True) for a in (x_NM, w_NK, idx_NK))
        first = jax.lax.axis_index(ep) * n_local if ep else 0
        y_NM = expert_sum(nnx.merge(graphdef, state), x_NM, w_NK, idx_NK, layer, first, n_local)
        y_NM = jax.lax.psum(y_NM, summed) if summed else y_NM
        return jax.lax.psum_scatter(y_NM, gathered, tiled=True) if gathered else y_NM

    return jax.shard_map(local, mesh=mesh, in_specs=(state_specs, P(b), P(b), P(b), P()), out_specs=P(b),
                         check_vma=False)(state, x_NM, w_NK, idx_NK, layer)


def _check_column_split(cfg: K2Config, ways: int) -> None:
    """INT4 expert columns split `ways` ways must keep whole planar nibble blocks (see int4_layout)."""
    F = cfg.moe_intermediate_size
    if ways > 1 and cfg.quant is not None and (F // ways) % int4_layout.planar_block(F):
        raise ValueError(f"moe_intermediate_size {F} over {ways} devices splits INT4 planar blocks of "
                         f"{int4_layout.planar_block(F)} rows; use a smaller 'tensor' axis")


def moe(p: MoE, x_BTM: Array, layer: Array, cfg: K2Config, real_N: Array | None = None) -> Array:
    """Routed experts (rows sorted by expert, grouped matmuls) weighted and summed, plus the shared expert. Tokens
    that real_N marks False (padding) go to no expert: the grouped matmuls skip their rows (their output is junk)."""
    B, T, M = x_BTM.shape
    x_NM = x_BTM.reshape(B * T, M)
    w_NK, idx_NK = route(p, x_NM, layer, cfg)
    if real_N is not None:
        idx_NK = jnp.where(real_N[:, None], idx_NK, cfg.n_routed_experts)  # an id past every device's experts
    y_NM = routed_experts(p, x_NM, w_NK, idx_NK, layer, cfg).astype(x_BTM.dtype)
    if p.shared is not None:
        y_NM = y_NM + mlp(p.shared, x_NM, layer)
    return y_NM.reshape(B, T, M)


def real_tokens(pos_BT: Array, cache: PagedCache | None) -> Array:
    """Which tokens of a segment are real: with a cache those below their row's kv_len (the rest pads a chunk or a
    row that takes no part, and nothing reads them) or a packed segment's chunks' tokens, all without one."""
    if cache is None:
        return jnp.ones(pos_BT.shape, bool)
    if cache.packing is not None:
        return cache.packing.real_N().reshape(pos_BT.shape)
    return pos_BT < cache.kv_len_B[:, None]


def block(p: Block, xs_BTM: tuple[Array, ...], pos_BT: tuple[Array, ...], pool_LPNC: Array | None,
          caches: tuple[PagedCache | None, ...], layer: Array, cfg: K2Config) -> tuple[tuple[Array, ...], Array | None]:
    """Pre-norm residual layer `layer` of the stack p over segments of rows (e.g. a prefill chunk and decode rows):
    attention over all segments (each reads what every segment wrote into the pool), then the MLP or
    MoE once over all tokens."""
    normed = tuple(rms_norm(x_BTM, p.attn_norm[...][layer], cfg.rms_norm_eps) for x_BTM in xs_BTM)
    attn_BTM, pool_LPNC = mla(p.attn, normed, pos_BT, pool_LPNC, caches, layer, cfg)
    hs_BTM = [x_BTM + h_BTM for x_BTM, h_BTM in zip(xs_BTM, attn_BTM)]
    x_NM = jnp.concatenate([x.reshape(-1, x.shape[-1]) for x in hs_BTM])
    h_NM = rms_norm(x_NM, p.mlp_norm[...][layer], cfg.rms_norm_eps)
    if isinstance(p.mlp, MoE):
        real_N = jnp.concatenate([real_tokens(pos, cache).reshape(-1) for pos, cache in zip(pos_BT, caches)])
        h_NM = moe(p.mlp, h_NM[None], layer, cfg, real_N)[0]
    else:
        h_NM = mlp(p.mlp, h_NM, layer)
    ends = list(itertools.accumulate(math.prod(x.shape[:2]) for x in hs_BTM))
    return tuple(y.reshape(x.shape) for x, y in zip(hs_BTM, jnp.split(x_NM + h_NM, ends[:-1]))), pool_LPNC


def run_stack(layers: Block, xs_BTM: tuple[Array, ...], pos_BT: tuple[Array, ...], pool_LPNC: Array | None,
              caches: tuple[PagedCache | None, ...], cfg: K2Config) -> tuple[tuple[Array, ...], Array | None]:
    """Scan one stacked module over its layers; the pool rides in the carry and is updated in place.

    The scan runs over layer indices only: every weight is read from the whole stack at its layer (matmul
    weights in place by the kernels), never sliced out per layer, which would copy each layer's weights every step.
    """
    def step(carry, layer):
        xs_BTM, pool_LPNC = carry
        return block(layers, xs_BTM, pos_BT, pool_LPNC, caches, layer, cfg), None

    n_layers = layers.attn_norm.shape[0]
    (xs_BTM, pool_LPNC), _ = jax.lax.scan(step, (xs_BTM, pool_LPNC), jnp.arange(n_layers))
    return xs_BTM, pool_LPNC


def embed_rows(embed_VM: Array, tokens_BT: Array, dtype: Any) -> Array:
    """Embedding rows [B, T, M] in dtype. The table passes a barrier with the tokens (dispatch.in_loop): XLA:CPU
    gathers bf16 rows from a float32 conversion of the whole table, which it would hoist out of the decode loop."""
    embed_VM, tokens_BT = dispatch.in_loop(embed_VM, tokens_BT)
    return embed_VM[tokens_BT].astype(dtype)


def hidden(model: K2Model, tokens_BT: tuple[Array, ...], pos_BT: tuple[Array, ...],
           caches: tuple[PagedCache | None, ...], cfg: K2Config, dtype: Any
           ) -> tuple[tuple[Array, ...], dict[str, Array] | None]:
    """Final-normed hidden states [B, T, M] of segments of rows that run together (one pool: caches[0].pool; the
    caches differ in their rows' page tables and lengths), and the updated pool (None without caches)."""
    xs_BTM = tuple(embed_rows(model.embed[...], t, dtype) for t in tokens_BT)
    pool = None if caches[0] is None else {}
    for name, layers in (("dense", model.dense_layers), ("moe", model.moe_layers)):
        if layers is not None:
            xs_BTM, layer_pool = run_stack(layers, xs_BTM, pos_BT, None if pool is None else caches[0].pool[name],
                                           caches, cfg)
            if pool is not None:
                pool[name] = layer_pool
    return tuple(rms_norm(x, model.final_norm[...], cfg.rms_norm_eps) for x in xs_BTM), pool


def lm_head(model: K2Model, x_NM: Array) -> Array:
    """float32 logits [..., V] of final hidden states (the head's weights read in place)."""
    return _proj(x_NM, model.lm_head[...], None, out_dtype=jnp.float32)


def forward(model: K2Model, tokens_BT: Array, pos_BT: Array, cache: PagedCache | None, cfg: K2Config,
            dtype: Any) -> tuple[Array, PagedCache | None]:
    """Logits [B, T, V] (float32) for tokens at positions pos_BT (consecutive per row); returns the updated cache.

    With a cache, row b's tokens at positions below cache.kv_len_B[b] are written into its pages and attend to
    all its cached positions up to their own; the rest of the chunk is padding (not written, logits unused).
    """
    (x_BTM,), pool = hidden(model, (tokens_BT,), (pos_BT,), (cache,), cfg, dtype)
    return lm_head(model, x_BTM), (None if cache is None else dataclasses.replace(cache, pool=pool))
