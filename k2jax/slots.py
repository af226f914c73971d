"""Cache slots: a fixed batch of sequences that join and leave between decode steps (serving, agents).

Each slot is one row of a shared latent cache. A slot is prefilled on its own (from any position, so a
conversation keeps its cached prefix and only new tokens are computed), then all slots decode together.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from k2jax import engine
from k2jax.config import K2Config
from k2jax.model import forward
from k2jax.sampling import SamplingParams, sample, stack_params


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "dtype", "kv_len"), donate_argnames=("cache",))
def prefill_slot(graphdef: nnx.GraphDef, state: nnx.State, tokens_1T: jax.Array, pos_1T: jax.Array,
                 cache: dict[str, jax.Array], slot: jax.Array, cfg: K2Config, dtype: Any,
                 kv_len: int) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Run one slot's new tokens through the model in its own row of the shared cache."""
    row = jax.tree.map(lambda c: jax.lax.dynamic_slice_in_dim(c, slot, 1, axis=1), cache)
    logits_1TV, row = forward(nnx.merge(graphdef, state), tokens_1T, pos_1T, row, cfg, dtype, kv_len)
    cache = jax.tree.map(lambda c, r: jax.lax.dynamic_update_slice_in_dim(c, r, slot, axis=1), cache, row)
    return logits_1TV, cache


_sample = jax.jit(sample)


def host_value(x: jax.Array) -> np.ndarray:
    """An output's value on this host, also when it spans several processes (multi-host serving)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class Slots:
    """`n_slots` cached sequences of up to `capacity` tokens over one model."""

    def __init__(self, model: engine.Model, n_slots: int, capacity: int):
        limit = model.config.max_position_embeddings
        if not 0 < capacity <= limit:
            raise ValueError(f"slot capacity must be in [1, {limit}] (max_position_embeddings), got {capacity}")
        if n_slots < 1:
            raise ValueError(f"need at least one slot, got {n_slots}")
        self.model, self.capacity = model, capacity
        self.cache = model.init_cache(n_slots, capacity)
        self.lengths = np.zeros(n_slots, np.int32)

    @property
    def n_slots(self) -> int:
        return len(self.lengths)

    def prefill(self, slot: int, tokens: Sequence[int], start: int = 0) -> np.ndarray:
        """Write `tokens` at positions start.. of `slot`, keeping its first `start` cached tokens.

        Returns float32 logits [len(tokens), vocab]; the slot then holds start + len(tokens) tokens.
        """
        m = self.model
        if not 0 <= start <= self.lengths[slot]:
            raise ValueError(f"slot {slot} holds {self.lengths[slot]} tokens; cannot keep a prefix of {start}")
        end = start + len(tokens)
        if not tokens or end > self.capacity:
            raise ValueError(f"slot {slot}: {end} tokens do not fit its capacity of {self.capacity} (or none given)")
        m._check_ids(list(tokens), end)
        chunk = min(engine.bucket(len(tokens)), engine.PREFILL_CHUNK)
        padded = np.zeros(-(-len(tokens) // chunk) * chunk, np.int32)
        padded[: len(tokens)] = tokens
        out = []
        for lo in range(0, len(tokens), chunk):
            pos = np.arange(start + lo, start + lo + chunk, dtype=np.int32)[None]
            logits, self.cache = m._call(prefill_slot, m.graphdef, m.state, jnp.asarray(padded[None, lo:lo + chunk]),
                                         jnp.asarray(pos), self.cache, jnp.int32(slot), m.config, m.dtype,
                                         min(engine.bucket(start + lo + chunk), self.capacity))
            out.append(host_value(logits)[0])
        self.lengths[slot] = end
        return np.concatenate(out)[: len(tokens)]

    def sample(self, logits_V: np.ndarray, params: SamplingParams, position: int) -> tuple[int, float]:
        """One token (and its log-prob) from a row of logits, keyed by the request seed and its position."""
        tok, logp = _sample(jnp.asarray(logits_V)[None], stack_params([params]), jnp.asarray([position]))
        return int(tok[0]), float(logp[0])

    def decode(self, tokens: np.ndarray, params: Sequence[SamplingParams | None],
               n_steps: int = engine.DECODE_STEPS) -> tuple[np.ndarray, np.ndarray]:
        """Feed each active slot its last token and sample n_steps more: ([slots, n] tokens, log-probs).

        A slot is active where params is not None; inactive slots compute junk past their length, which
        their next prefill overwrites, and keep their cached prefix.
        """
        m = self.model
        active = np.array([p is not None for p in params])
        if not active.any():
            raise ValueError("decode needs at least one active slot")
        if (self.lengths[active] + n_steps > self.capacity).any():
            raise ValueError(f"decoding {n_steps} more tokens would overflow a slot's capacity of {self.capacity}")
        kv_len = min(engine.bucket(int(self.lengths[active].max()) + n_steps), self.capacity)
        sampling = stack_params([p or SamplingParams() for p in params])
        toks, logps, self.cache = m._call(engine.decode, m.graphdef, m.state, jnp.asarray(tokens, jnp.int32),
                                          jnp.asarray(self.lengths), self.cache, sampling, m.config, m.dtype,
                                          n_steps, kv_len)
        self.lengths = np.where(active, self.lengths + n_steps, self.lengths).astype(np.int32)
        return host_value(toks), host_value(logps)

    def release(self, slot: int) -> None:
        """Forget a slot's sequence so a new one can use it."""
        self.lengths[slot] = 0
