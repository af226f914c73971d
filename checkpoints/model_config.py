"""What checkpoints needs of a model config (k2jax.config.K2Config has it): the shapes that name and lay out tensors,
and the HF config.json it writes. A Protocol, so checkpoints never imports k2jax (k2jax imports checkpoints)."""

from __future__ import annotations

from typing import Any, Protocol


class ModelConfig(Protocol):
    """The config fields checkpoints reads; `quant` is None for an unquantized model."""

    num_hidden_layers: int
    first_k_dense_replace: int
    hidden_size: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    tie_word_embeddings: bool
    quant: Any

    @property
    def qk_head_dim(self) -> int: ...

    @property
    def cache_pad(self) -> int: ...

    def to_hf_dict(self) -> dict[str, Any]: ...
