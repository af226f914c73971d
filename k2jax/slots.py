"""Cache slots: a fixed batch of sequences that join and leave between decode steps (serving, agents).

Each slot is one row of a shared page pool: a page table that grows as the slot's sequence does. A slot
is prefilled on its own (from any position, so a conversation keeps its cached prefix and only new tokens
are computed), then all slots decode together; only active slots write, and only into their own pages.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from k2jax import engine
from k2jax.cache import PoolFull, copy_pages, read_pages, write_pages
from k2jax.sampling import SamplingParams, sample, stack_params


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
    """`n_slots` cached sequences of up to `capacity` tokens over one model, in a pool of `num_pages` pages
    (default: enough for every slot at capacity)."""

    def __init__(self, model: engine.Model, n_slots: int, capacity: int, num_pages: int | None = None):
        limit = model.config.max_position_embeddings
        if not 0 < capacity <= limit:
            raise ValueError(f"slot capacity must be in [1, {limit}] (max_position_embeddings), got {capacity}")
        if n_slots < 1:
            raise ValueError(f"need at least one slot, got {n_slots}")
        self.model, self.capacity = model, capacity
        self.pages, self.pool = model.paged(n_slots, capacity, num_pages)
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
        self._copy(self.pages.truncate(slot, start))
        self.lengths[slot] = start
        self._reserve(slot, end)
        chunk = min(engine.bucket(len(tokens)), engine.PREFILL_CHUNK)
        padded = np.zeros(-(-len(tokens) // chunk) * chunk, np.int32)
        padded[: len(tokens)] = tokens
        out = []
        for lo in range(0, len(tokens), chunk):
            pos = np.arange(start + lo, start + lo + chunk, dtype=np.int32)[None]
            cache = m.cache_view(self.pages, self.pool, [slot], [min(end, start + lo + chunk)])
            logits, cache = m._call(engine.step, m.graphdef, m.state, jnp.asarray(padded[None, lo:lo + chunk]),
                                    jnp.asarray(pos), cache, m.config, m.dtype)
            self.pool = cache.pool
            out.append(host_value(logits)[0])
        self.lengths[slot] = end
        return np.concatenate(out)[: len(tokens)]

    def sample(self, logits_V: np.ndarray, params: SamplingParams, position: int,
               mask_W: np.ndarray | None = None) -> tuple[int, float]:
        """One token (and its log-prob) from a row of logits, keyed by the request seed and its position; mask_W
        (packed allowed tokens, see k2jax.grammar) limits the choice."""
        mask = None if mask_W is None else jnp.asarray(mask_W, jnp.int32)[None]
        tok, logp = _sample(jnp.asarray(logits_V)[None], stack_params([params]), jnp.asarray([position]), mask)
        return int(tok[0]), float(logp[0])

    def decode(self, tokens: np.ndarray, params: Sequence[SamplingParams | None],
               n_steps: int = engine.DECODE_STEPS, masks: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Feed each active slot its last token and sample n_steps more: ([slots, n] tokens, log-probs).

        A slot is active where params is not None; inactive slots write nothing and keep their cached prefix
        (their returned tokens are junk). masks [slots, words] (packed allowed tokens) holds for all n steps.
        """
        m = self.model
        active = np.array([p is not None for p in params])
        if not active.any():
            raise ValueError("decode needs at least one active slot")
        if (self.lengths[active] + n_steps > self.capacity).any():
            raise ValueError(f"decoding {n_steps} more tokens would overflow a slot's capacity of {self.capacity}")
        for slot in np.flatnonzero(active):
            self._reserve(int(slot), int(self.lengths[slot]) + n_steps)
        cache = m.cache_view(self.pages, self.pool, range(self.n_slots), np.where(active, self.lengths + n_steps, 0))
        sampling = stack_params([p or SamplingParams() for p in params])
        mask = None if masks is None else jnp.asarray(masks, jnp.int32)
        toks, logps, cache = m._call(engine.decode, m.graphdef, m.state, jnp.asarray(tokens, jnp.int32),
                                     jnp.asarray(self.lengths), jnp.asarray(active), cache, sampling, m.config,
                                     m.dtype, n_steps, mask)
        self.pool = cache.pool
        self.lengths = np.where(active, self.lengths + n_steps, self.lengths).astype(np.int32)
        return host_value(toks), host_value(logps)

    def rewind(self, slot: int, length: int) -> None:
        """Keep only the slot's first `length` cached tokens (the rest of a decoded run was not taken)."""
        if not 0 <= length <= self.lengths[slot]:
            raise ValueError(f"slot {slot} holds {self.lengths[slot]} tokens; cannot rewind it to {length}")
        self._copy(self.pages.truncate(slot, length))
        self.lengths[slot] = length

    def release(self, slot: int) -> None:
        """Forget a slot's sequence and give its pages back, so a new one can use it."""
        self.pages.release(slot)
        self.lengths[slot] = 0

    def read(self, slot: int) -> dict[str, np.ndarray]:
        """A host copy of the pages holding the slot's tokens, [L, pages, page_size, C] per layer stack."""
        held = math.ceil(int(self.lengths[slot]) / self.pages.layout.page_size)
        return {k: host_value(v) for k, v in read_pages(self.pool, jnp.asarray(self.pages.pages(slot)[:held])).items()}

    def write(self, slot: int, pages: dict[str, np.ndarray], length: int) -> None:
        """Make the slot hold `length` tokens from pages as `read` returned them (its old sequence is dropped)."""
        self.release(slot)
        self._reserve(slot, length)
        self.pool = write_pages(self.pool, jnp.asarray(self.pages.pages(slot)), pages)
        self.lengths[slot] = length

    def _reserve(self, slot: int, tokens: int) -> None:
        """Pages for the slot's first `tokens` positions; PoolFull names the slot and what it holds."""
        try:
            self.pages.reserve(slot, tokens)
        except PoolFull as err:
            raise PoolFull(f"slot {slot} (holding {self.lengths[slot]} tokens): {err}") from None

    def _copy(self, copies: list[tuple[int, int]]) -> None:
        """Apply the allocator's page copies on device."""
        if copies:
            src, dst = np.array(copies, np.int32).T
            self.pool = copy_pages(self.pool, jnp.asarray(src), jnp.asarray(dst))
