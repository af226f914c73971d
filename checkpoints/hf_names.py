"""Where each k2jax parameter lives in a Hugging Face Kimi K2 / DeepseekV3 checkpoint, and how it is laid out.

HF stores one [out, in] matrix per layer (and per expert); k2jax stacks layers (and experts) on leading axes
and keeps matrices [in, out] with heads as their own axis. `Source` records both sides of that mapping so
the reader, the streaming loader and the writer share one table.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from k2jax.config import K2Config


@dataclasses.dataclass(frozen=True)
class Source:
    """One k2jax parameter: its path, its HF name template, and the per-tensor layout change.

    The parameter is the HF tensors `template.format(layer=l, expert=e)` for l in `layers` (stacked on axis 0,
    when `layers` is not None) and e < `experts` (stacked next, when `experts` is not None), each reshaped
    by `k2_shape` after an optional transpose (`flat_shape` is the 2-D shape between the two).
    """

    path: tuple[str, ...]
    template: str
    layers: tuple[int, ...] | None = None
    experts: int | None = None
    transpose: bool = False
    k2_shape: tuple[int, ...] | None = None
    flat_shape: tuple[int, int] | None = None

    def names(self) -> list[str]:
        """Every HF tensor name this parameter is assembled from, in stacking order."""
        layers = self.layers if self.layers is not None else (None,)
        experts = range(self.experts) if self.experts is not None else (None,)
        return [self.template.format(layer=l, expert=e) for l in layers for e in experts]

    def to_k2(self, hf: np.ndarray) -> np.ndarray:
        """One HF tensor -> its slice of the k2jax parameter."""
        out = hf.T if self.transpose else hf
        return out.reshape(self.k2_shape) if self.k2_shape is not None else out

    def to_hf(self, k2: np.ndarray) -> np.ndarray:
        """One slice of the k2jax parameter -> the HF tensor (inverse of to_k2)."""
        if self.flat_shape is not None:
            k2 = k2.reshape(self.flat_shape)
        return np.ascontiguousarray(k2.T if self.transpose else k2)


def _attention(cfg: K2Config, stack: str, layers: tuple[int, ...]) -> list[Source]:
    """The MLA weights of one layer stack."""
    H, M, R = cfg.num_attention_heads, cfg.hidden_size, cfg.kv_lora_rank
    Dq, Dkv, Dv = cfg.qk_head_dim, cfg.qk_nope_head_dim + cfg.v_head_dim, cfg.v_head_dim
    pre = "model.layers.{layer}."
    att = pre + "self_attn."
    out = [
        Source((stack, "attn_norm"), pre + "input_layernorm.weight", layers),
        Source((stack, "mlp_norm"), pre + "post_attention_layernorm.weight", layers),
        Source((stack, "attn", "kv_a"), att + "kv_a_proj_with_mqa.weight", layers, transpose=True),
        Source((stack, "attn", "kv_a_norm"), att + "kv_a_layernorm.weight", layers),
        Source((stack, "attn", "kv_b"), att + "kv_b_proj.weight", layers, transpose=True,
               k2_shape=(R, H, Dkv), flat_shape=(R, H * Dkv)),
        Source((stack, "attn", "o_proj"), att + "o_proj.weight", layers, transpose=True,
               k2_shape=(H, Dv, M), flat_shape=(H * Dv, M)),
    ]
    if cfg.q_lora_rank is not None:
        out += [
            Source((stack, "attn", "q_a"), att + "q_a_proj.weight", layers, transpose=True),
            Source((stack, "attn", "q_a_norm"), att + "q_a_layernorm.weight", layers),
            Source((stack, "attn", "q_b"), att + "q_b_proj.weight", layers, transpose=True,
                   k2_shape=(cfg.q_lora_rank, H, Dq), flat_shape=(cfg.q_lora_rank, H * Dq)),
        ]
    else:
        out.append(Source((stack, "attn", "q_proj"), att + "q_proj.weight", layers, transpose=True,
                          k2_shape=(M, H, Dq), flat_shape=(M, H * Dq)))
    return out


def _mlp(path: tuple[str, ...], prefix: str, layers: tuple[int, ...]) -> list[Source]:
    """gate/up/down of a SwiGLU MLP."""
    return [Source((*path, proj), f"{prefix}.{proj}_proj.weight", layers, transpose=True)
            for proj in ("gate", "up", "down")]


def dense_expert_sources(cfg: K2Config, layers: tuple[int, ...]) -> list[Source]:
    """Routed experts stored unquantized: one [out, in] matrix per expert."""
    return [Source(("moe_layers", "mlp", proj, "weight"),
                   "model.layers.{layer}.mlp.experts.{expert}." + f"{proj}_proj.weight",
                   layers, cfg.n_routed_experts, transpose=True)
            for proj in ("gate", "up", "down")]


def sources(cfg: K2Config) -> list[Source]:
    """The HF source of every k2jax parameter except the routed experts (see dense_expert_sources)."""
    dense = tuple(range(cfg.first_k_dense_replace))
    moe = tuple(range(cfg.first_k_dense_replace, cfg.num_hidden_layers))
    out = [
        Source(("embed",), "model.embed_tokens.weight"),
        Source(("final_norm",), "model.norm.weight"),
        Source(("lm_head",), "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight",
               transpose=True),
    ]
    if dense:
        out += _attention(cfg, "dense_layers", dense)
        out += _mlp(("dense_layers", "mlp"), "model.layers.{layer}.mlp", dense)
    if moe:
        out += _attention(cfg, "moe_layers", moe)
        out += [
            Source(("moe_layers", "mlp", "router"), "model.layers.{layer}.mlp.gate.weight", moe, transpose=True),
            Source(("moe_layers", "mlp", "router_bias"), "model.layers.{layer}.mlp.gate.e_score_correction_bias",
                   moe),
        ]
        if cfg.n_shared_experts:
            out += _mlp(("moe_layers", "mlp", "shared"), "model.layers.{layer}.mlp.shared_experts", moe)
    return out
