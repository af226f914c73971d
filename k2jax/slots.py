"""Cache slots: a fixed batch of sequences that join and leave between decode steps (serving, agents).

Each slot is one row of a shared page pool: a page table that grows as the slot's sequence does. A slot
is prefilled on its own (from any position, so a conversation keeps its cached prefix and only new tokens
are computed), then all slots decode together; only active slots write, and only into their own pages.
With a prefix cache (k2jax.prefix_cache), every full page a slot prefills or ends with is cached, and a new
sequence starts by mapping the longest cached prefix of its prompt into its table (attach).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np

from k2jax import engine
from k2jax.cache import PoolFull, apply_copies, read_pages, write_pages
from k2jax.prefix_cache import PrefixCache
from k2jax.sampling import Logprobs, SamplingParams, sample, stack_params


_sample = jax.jit(sample)


def on_device(x: np.ndarray | Sequence, dtype: np.dtype | type) -> jax.Array:
    """A host array on the default device as `dtype` (a plain transfer: jnp.asarray compiles a program per shape)."""
    return jax.device_put(np.asarray(x, dtype))


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
    (default: enough for every slot at capacity), with a prefix cache over the pool if `prefix_cache`.

    tokens[s] lists the tokens whose latents slot s holds (None once `write` put pages of unknown tokens there).
    """

    def __init__(self, model: engine.Model, n_slots: int, capacity: int, num_pages: int | None = None,
                 prefix_cache: bool = False):
        limit = model.config.max_position_embeddings
        if not 0 < capacity <= limit:
            raise ValueError(f"slot capacity must be in [1, {limit}] (max_position_embeddings), got {capacity}")
        if n_slots < 1:
            raise ValueError(f"need at least one slot, got {n_slots}")
        self.model, self.capacity = model, capacity
        self.pages, self.pool = model.paged(n_slots, capacity, num_pages)
        self.lengths = np.zeros(n_slots, np.int32)
        self.tokens: list[list[int] | None] = [[] for _ in range(n_slots)]
        self.prefix = PrefixCache(self.pages) if prefix_cache else None

    @property
    def n_slots(self) -> int:
        return len(self.lengths)

    def prefill(self, slot: int, tokens: Sequence[int], start: int = 0) -> np.ndarray:
        """Write `tokens` at positions start.. of `slot`, keeping its first `start` cached tokens.

        Returns float32 logits [len(tokens), vocab]; the slot then holds start + len(tokens) tokens.
        """
        if not 0 <= start <= self.lengths[slot]:
            raise ValueError(f"slot {slot} holds {self.lengths[slot]} tokens; cannot keep a prefix of {start}")
        end = start + len(tokens)
        if not tokens or end > self.capacity:
            raise ValueError(f"slot {slot}: {end} tokens do not fit its capacity of {self.capacity} (or none given)")
        self.model._check_ids(list(tokens), end)
        self._copy(self.pages.truncate(slot, start))
        self.lengths[slot] = start
        held = self.tokens[slot]
        self.tokens[slot] = None if held is None else held[:start]
        self._reserve(slot, end)
        chunk = min(engine.bucket(len(tokens)), engine.PREFILL_CHUNK)
        padded = np.zeros(-(-len(tokens) // chunk) * chunk, np.int32)
        padded[: len(tokens)] = tokens
        out = [host_value(self._step(slot, padded[lo:lo + chunk], start + lo, min(end, start + lo + chunk)))[0]
               for lo in range(0, len(tokens), chunk)]
        self.lengths[slot] = end
        if self.tokens[slot] is not None:
            self.tokens[slot] += [int(t) for t in tokens]
            if self.prefix is not None:
                self.prefix.insert(slot, self.tokens[slot], start // self.pages.layout.page_size)
        return np.concatenate(out)[: len(tokens)]

    def attach(self, slot: int, prompt: Sequence[int]) -> int:
        """Map the longest cached page-aligned prefix of `prompt` into empty `slot`, short of the prompt's last
        token (whose logits the caller needs); returns the tokens it holds then (0 without a prefix cache)."""
        nodes = self.prefix.match(slot, prompt[: len(prompt) - 1]) if self.prefix is not None else []
        return self.attach_cached(slot, nodes[-1].page if nodes else -1)

    def attach_cached(self, slot: int, page: int) -> int:
        """Make empty `slot` hold the cached prefix that ends with page `page` (-1: none); returns its tokens."""
        if self.lengths[slot] or self.pages.held[slot]:
            raise ValueError(f"slot {slot} holds {self.lengths[slot]} tokens; release it before attaching to it")
        nodes = self.prefix.path(page) if page >= 0 else []
        self.pages.share(slot, [n.page for n in nodes])
        if self.prefix is not None:
            self.prefix.touch(nodes)
        self.tokens[slot] = [t for n in nodes for t in n.block]
        self.lengths[slot] = len(self.tokens[slot])
        return int(self.lengths[slot])

    def shortfall(self, wants: dict[int, int]) -> int:
        """Pages missing for each slot of `wants` to hold that many tokens, after evicting every cached page
        that no slot holds."""
        return self.pages.shortfall(wants)

    def sample(self, logits_V: np.ndarray, params: SamplingParams, position: int,
               mask_W: np.ndarray | None = None) -> tuple[int, Logprobs]:
        """One token and its host Logprobs ([1] and [1, TOP_LOGPROBS]) from a row of logits, keyed by the request
        seed and its position; mask_W (packed allowed tokens, see k2jax.grammar) limits the choice."""
        mask = None if mask_W is None else on_device(np.asarray(mask_W)[None], np.int32)
        tok, logp = _sample(on_device(logits_V[None], np.float32), stack_params([params]),
                            on_device([position], np.int32), mask)
        return int(tok[0]), Logprobs(*map(np.asarray, logp))

    def decode(self, tokens: np.ndarray, params: Sequence[SamplingParams | None],
               n_steps: int = engine.DECODE_STEPS, masks: np.ndarray | None = None) -> tuple[np.ndarray, Logprobs]:
        """Feed each active slot its last token and sample n_steps more: [slots, n] tokens and their host Logprobs.

        A slot is active where params is not None; inactive slots write nothing and keep their cached prefix
        (their returned tokens are junk). masks [slots, words] (packed allowed tokens) holds for all n steps.
        """
        active = np.array([p is not None for p in params])
        if not active.any():
            raise ValueError("decode needs at least one active slot")
        if (self.lengths[active] + n_steps > self.capacity).any():
            raise ValueError(f"decoding {n_steps} more tokens would overflow a slot's capacity of {self.capacity}")
        for slot in np.flatnonzero(active):
            self._reserve(int(slot), int(self.lengths[slot]) + n_steps)
        toks, logps = self._decode(tokens, active, params, n_steps, masks=masks)
        toks, logps = host_value(toks), Logprobs(*map(host_value, logps))
        for slot in np.flatnonzero(active):  # written: the fed token, then every sampled one but the last
            if self.tokens[slot] is not None:
                self.tokens[slot] += [int(tokens[slot]), *toks[slot, :-1].tolist()]
        self.lengths = np.where(active, self.lengths + n_steps, self.lengths).astype(np.int32)
        return toks, logps

    def warmup(self, prefill_tokens: int, decode_steps: int, progress: bool = False) -> int:
        """Compile (and run once, writing nothing) every program that prefill calls of up to `prefill_tokens` tokens,
        decode calls of `decode_steps` steps (and, with a grammar's token masks, of 1 step), sample and a page copy
        can need; returns how many there are."""
        layout, columns = self.pages.layout, self.pages.table.shape[1]
        top = min(engine.bucket(min(prefill_tokens, self.capacity)), engine.PREFILL_CHUNK)
        chunks = [16 << k for k in range(top.bit_length()) if 16 << k <= top]
        widths = engine.table_widths(layout, columns)
        programs = [("prefill", c, w) for c in chunks for w in widths if w >= engine.table_width(layout, columns, c)]
        programs += [(kind, steps, w) for kind, steps in (("decode", decode_steps), ("masked", decode_steps),
                                                          ("masked", 1)) for w in widths
                     if w >= engine.table_width(layout, columns, steps + 1)]
        programs += [("sample", 1, 0), ("sample-masked", 1, 0), ("copy", 1, 0)]
        if progress:
            from tqdm import tqdm

            programs = tqdm(programs, desc="compiling", unit="program")
        idle = np.zeros(self.n_slots, bool)
        all_tokens = np.full((self.n_slots, -(-self.model.config.vocab_size // 32)), -1, np.int32)  # grammar rows
        for kind, size, width in programs:
            if kind == "prefill":
                self._step(0, np.zeros(size, np.int32), 0, 0, width)
            elif kind in ("decode", "masked"):
                masks = all_tokens if kind == "masked" else None
                self._decode(np.zeros(self.n_slots, np.int32), idle, [None] * self.n_slots, size, width, masks)
            elif kind.startswith("sample"):
                self.sample(np.zeros(self.model.config.vocab_size, np.float32), SamplingParams(), 0,
                            all_tokens[0] if kind == "sample-masked" else None)
            else:
                self._copy([(0, 0)])
        return len(programs)

    def rewind(self, slot: int, length: int) -> None:
        """Keep only the slot's first `length` cached tokens (the rest of a decoded run was not taken)."""
        if not 0 <= length <= self.lengths[slot]:
            raise ValueError(f"slot {slot} holds {self.lengths[slot]} tokens; cannot rewind it to {length}")
        self._copy(self.pages.truncate(slot, length))
        self.lengths[slot] = length
        if self.tokens[slot] is not None:
            del self.tokens[slot][length:]

    def release(self, slot: int) -> None:
        """Forget a slot's sequence and give its pages back (its full pages stay in the prefix cache, if any)."""
        if self.prefix is not None and self.tokens[slot]:
            self.prefix.insert(slot, self.tokens[slot])
        self.pages.release(slot)
        self.lengths[slot] = 0
        self.tokens[slot] = []

    def read(self, slot: int) -> dict[str, np.ndarray]:
        """A host copy of the pages holding the slot's tokens, [L, pages, page_size, C] per layer stack."""
        held = math.ceil(int(self.lengths[slot]) / self.pages.layout.page_size)
        return {k: host_value(v) for k, v in read_pages(self.pool, on_device(self.pages.pages(slot)[:held], np.int32)).items()}

    def write(self, slot: int, pages: dict[str, np.ndarray], length: int) -> None:
        """Make the slot hold `length` tokens from pages as `read` returned them (its old sequence is dropped)."""
        self.release(slot)
        self._reserve(slot, length)
        self.pool = write_pages(self.pool, on_device(self.pages.pages(slot), np.int32), pages)
        self.lengths[slot] = length
        self.tokens[slot] = None

    def _step(self, slot: int, tokens: np.ndarray, start: int, kv_len: int, width: int | None = None) -> jax.Array:
        """One prefill chunk of `slot` at positions start..: its logits [1, chunk, vocab] (kv_len 0 writes nothing)."""
        m = self.model
        pos = np.arange(start, start + len(tokens), dtype=np.int32)[None]
        cache = m.cache_view(self.pages, self.pool, [slot], [kv_len], width)
        logits, cache = m._call(engine.step, m.graphdef, m.state, on_device(tokens[None], np.int32),
                                on_device(pos, np.int32), cache, m.config, m.dtype)
        self.pool = cache.pool
        return logits

    def _decode(self, tokens: np.ndarray, active: np.ndarray, params: Sequence[SamplingParams | None], n_steps: int,
                width: int | None = None, masks: np.ndarray | None = None) -> tuple[jax.Array, Logprobs]:
        """The decode call on device: [slots, n_steps] tokens and their Logprobs; inactive slots write nothing."""
        m = self.model
        cache = m.cache_view(self.pages, self.pool, range(self.n_slots), np.where(active, self.lengths + n_steps, 0),
                             width)
        sampling = stack_params([p or SamplingParams() for p in params])
        mask = None if masks is None else on_device(masks, np.int32)
        toks, logps, cache = m._call(engine.decode, m.graphdef, m.state, on_device(tokens, np.int32),
                                     on_device(self.lengths, np.int32), on_device(active, bool), cache, sampling,
                                     m.config, m.dtype, n_steps, mask)
        self.pool = cache.pool
        return toks, logps

    def _reserve(self, slot: int, tokens: int) -> None:
        """Pages for the slot's first `tokens` positions; PoolFull names the slot and what it holds."""
        try:
            self.pages.reserve(slot, tokens)
        except PoolFull as err:
            raise PoolFull(f"slot {slot} (holding {self.lengths[slot]} tokens): {err}") from None

    def _copy(self, copies: list[tuple[int, int]]) -> None:
        """Apply the allocator's page copies on device."""
        self.pool = apply_copies(self.pool, copies)
