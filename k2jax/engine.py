"""The user-facing model: jitted prefill and decode over a donated latent cache, logits and generate."""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from k2jax.config import K2Config
from k2jax.model import forward, init_cache


@dataclasses.dataclass
class GenerateOutput:
    """Generated token ids (prompt excluded), their texts when a tokenizer is present, and timing stats."""

    ids: list[list[int]]
    texts: list[str] | None
    stats: dict[str, float]


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "dtype"))
def _logits(graphdef: nnx.GraphDef, state: nnx.State, tokens_BT: jax.Array, cfg: K2Config, dtype: Any) -> jax.Array:
    """Full causal prefill without a cache: float32 logits [B, T, V]."""
    pos_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
    return forward(nnx.merge(graphdef, state), tokens_BT, pos_BT, None, cfg, dtype)[0]


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "dtype"), donate_argnames=("cache",))
def step(graphdef: nnx.GraphDef, state: nnx.State, tokens_BT: jax.Array, pos_BT: jax.Array,
         cache: dict[str, jax.Array], cfg: K2Config, dtype: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Run T new tokens per row at positions pos_BT through the model, writing their latents into the cache."""
    return forward(nnx.merge(graphdef, state), tokens_BT, pos_BT, cache, cfg, dtype)


class Model:
    """A loaded Kimi K2 model: config, parameters, tokenizer, and the jitted entry points."""

    def __init__(self, cfg: K2Config, graphdef: nnx.GraphDef, state: nnx.State, tokenizer: Any = None,
                 dtype: Any = jnp.float32):
        self.config, self.graphdef, self.state = cfg, graphdef, state
        self.tokenizer, self.dtype = tokenizer, dtype

    def logits(self, token_ids: Any) -> np.ndarray:
        """int [B, T] -> float32 logits [B, T, vocab] of a full causal prefill."""
        tokens = jnp.asarray(token_ids, jnp.int32)
        if tokens.ndim != 2:
            raise ValueError(f"token_ids must be [batch, time], got shape {tokens.shape}")
        self._check_ids(tokens, tokens.shape[1])
        return np.asarray(_logits(self.graphdef, self.state, tokens, self.config, self.dtype))

    def init_cache(self, batch: int, length: int) -> dict[str, jax.Array]:
        """An empty latent cache for `batch` sequences of up to `length` tokens."""
        return init_cache(self.config, batch, length, self.dtype)

    def generate(self, prompts: Sequence[str] | Sequence[Sequence[int]], max_new_tokens: int = 64,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0) -> GenerateOutput:
        """Greedy continuation of each prompt (token ids, or text when a tokenizer is loaded)."""
        if temperature != 0.0 or top_p != 1.0 or top_k != 0:
            raise ValueError("only greedy decoding (temperature=0, top_p=1, top_k=0) is available")
        del seed
        ids = [self._encode(p) for p in prompts]
        lengths = np.array([len(p) for p in ids], np.int32)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        total = int(lengths.max()) + max_new_tokens
        self._check_ids(jnp.asarray([t for p in ids for t in p], jnp.int32), total)
        B, T = len(ids), int(lengths.max())
        tokens = np.zeros((B, T), np.int32)
        for b, p in enumerate(ids):
            tokens[b, : len(p)] = p
        start = time.perf_counter()
        cache = self.init_cache(B, total)
        pos = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
        logits, cache = step(self.graphdef, self.state, jnp.asarray(tokens), jnp.asarray(pos), cache,
                             self.config, self.dtype)
        nxt = jnp.argmax(logits[jnp.arange(B), jnp.asarray(lengths) - 1], axis=-1).astype(jnp.int32)
        out = [nxt]
        nxt.block_until_ready()
        ttft = time.perf_counter() - start
        for i in range(max_new_tokens - 1):
            logits, cache = step(self.graphdef, self.state, nxt[:, None], jnp.asarray(lengths + i)[:, None], cache,
                                 self.config, self.dtype)
            nxt = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
            out.append(nxt)
        gen = np.asarray(jnp.stack(out, axis=1)).tolist()
        elapsed = time.perf_counter() - start
        texts = [self.tokenizer.decode(g) for g in gen] if self.tokenizer is not None else None
        stats = {"prompt_tokens": int(lengths.sum()), "generated_tokens": B * max_new_tokens,
                 "time_to_first_token_s": ttft,
                 "decode_tokens_per_s": B * (max_new_tokens - 1) / max(elapsed - ttft, 1e-9)}
        return GenerateOutput(ids=gen, texts=texts, stats=stats)

    def _encode(self, prompt: str | Sequence[int]) -> list[int]:
        """Token ids of one prompt; text needs the tokenizer."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompts as lists of token ids")
            return self.tokenizer.encode(prompt)
        ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("empty prompt: give at least one token")
        return ids

    def _check_ids(self, tokens: jax.Array, total_len: int) -> None:
        """Token ids must index the vocabulary and the sequence must fit the context."""
        cfg = self.config
        if total_len > cfg.max_position_embeddings:
            raise ValueError(f"sequence of {total_len} tokens exceeds the context of {cfg.max_position_embeddings}")
        if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= cfg.vocab_size):
            raise ValueError(f"token ids must be in [0, {cfg.vocab_size}), got [{int(tokens.min())}, {int(tokens.max())}]")
