"""Cache slots: a fixed batch of sequences that join and leave between engine steps (serving, agents).

Each slot is one row of a shared page pool: a page table that grows as the slot's sequence does. Every model call
is one engine step (k2jax.engine.run_step): prefill chunks of some slots (from any position, so a conversation keeps
its cached prefix and only new tokens are computed) beside the decode rows of the active slots; only those rows are
in the step, and each writes only into its own pages. A prompt's last token is not prefilled: the first decode
step feeds it and samples the first new token (so no logits ever go to the host).
With a prefix cache (k2jax.prefix_cache), every full page a slot prefills or ends with is cached, and a new
sequence starts by mapping the longest cached prefix of its prompt into its table (attach).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from k2jax import engine
from k2jax.cache import PoolFull, apply_copies
from k2jax.prefix_cache import PrefixCache
from k2jax.sampling import TOP_LOGPROBS, Logprobs, SamplingParams, StepMasks, mask_words


MAP_HEADROOM = 0.9  # warm-up stops once this share of the process's memory maps is in use


def check_memory_maps() -> None:
    """Raise before Linux's per-process memory-map limit turns the next compile into a crash: each compiled CPU
    program holds a few hundred maps, and LLVM segfaults when it cannot map more."""
    try:
        limit = int(Path("/proc/sys/vm/max_map_count").read_text())
        with open("/proc/self/maps") as maps:
            used = sum(1 for _ in maps)
    except OSError:  # not Linux
        return
    if used > MAP_HEADROOM * limit:
        raise RuntimeError(f"compiled programs hold {used} of the {limit} memory maps this process may have "
                           "(vm.max_map_count); compiling more would crash. Serve fewer slots (--max-batch) or raise "
                           "the limit: sudo sysctl -w vm.max_map_count=262144")


class Slots:
    """`n_slots` cached sequences of up to `capacity` tokens over one model, in a pool of `num_pages` pages
    (default: enough for every slot at capacity), with a prefix cache over the pool if `prefix_cache`; steps write
    chunks of at most `max_chunk` tokens (and capacity) and decode up to `max_steps` tokens per row (defaults: the
    engine's).

    tokens[s] lists the tokens whose latents slot s holds.
    """

    def __init__(self, model: engine.Engine, n_slots: int, capacity: int, num_pages: int | None = None,
                 prefix_cache: bool = False, max_chunk: int | None = None, max_steps: int | None = None):
        limit = model.config.max_position_embeddings
        if not 0 < capacity <= limit:
            raise ValueError(f"slot capacity must be in [1, {limit}] (max_position_embeddings), got {capacity}")
        if n_slots < 1:
            raise ValueError(f"need at least one slot, got {n_slots}")
        self.model, self.capacity = model, capacity
        self.max_chunk = min(max_chunk or engine.PREFILL_CHUNK, capacity)
        self.max_steps = max_steps or engine.DECODE_STEPS
        self.pages, self.pool = model.paged(n_slots, capacity, num_pages)
        self.lengths = np.zeros(n_slots, np.int32)
        self.tokens: list[list[int]] = [[] for _ in range(n_slots)]
        self.prefix = PrefixCache(self.pages) if prefix_cache else None

    @property
    def n_slots(self) -> int:
        return len(self.lengths)

    @property
    def mask_words(self) -> int:
        """Words per slot of a step's token masks."""
        return mask_words(self.model.config.vocab_size)

    def cached(self, slot: int, prompt: Sequence[int]) -> int:
        """How many tokens attach(slot, prompt) would map from the prefix cache now (changes nothing)."""
        if self.prefix is None:
            return 0
        return len(self.prefix.match(slot, prompt[: len(prompt) - 1])) * self.pages.layout.page_size

    def attach(self, slot: int, prompt: Sequence[int]) -> int:
        """Map the longest cached page-aligned prefix of `prompt` into empty `slot`, short of the prompt's last
        token (which the first decode step feeds); returns the tokens it holds then (0 without a prefix cache)."""
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

    def decode(self, tokens: np.ndarray, params: Sequence[SamplingParams | None],
               n_steps: int = engine.DECODE_STEPS, masks: StepMasks | None = None) -> tuple[np.ndarray, Logprobs]:
        """Feed each active slot its last token and sample n_steps more: a step with no chunk (see `step`)."""
        return self.step(tokens, params, n_steps, masks)

    def step(self, tokens: np.ndarray, params: Sequence[SamplingParams | None], n_steps: int = engine.DECODE_STEPS,
             masks: StepMasks | None = None, chunks: Sequence[engine.Chunk] = ()) -> tuple[np.ndarray, Logprobs]:
        """One engine step: write `chunks` (each up to max_chunk tokens of a distinct slot at positions start..,
        keeping its first start tokens; several only when engine.chunk_shape holds them), and feed each active slot
        (params not None; a chunk's slot may be one) tokens[slot] at its length, sampling n_steps tokens (one with
        chunks): [slots, n] tokens and their Logprobs (junk for inactive slots).

        Only active slots are in the step's decode rows; they write nothing else and other slots keep their cache.
        masks (rows: slots) are each row's token automaton for the n steps (k2jax.sampling.StepMasks).
        """
        active = [s for s, p in enumerate(params) if p is not None]
        lengths = self.lengths.copy()
        for chunk in chunks:
            self.check_chunk(chunk)
            lengths[chunk.row] = chunk.start + len(chunk.tokens)
        if len({c.row for c in chunks}) < len(chunks):
            raise ValueError(f"a step writes one chunk per slot, got slots {[c.row for c in chunks]}")
        if chunks and n_steps != 1:
            raise ValueError(f"a step with a prefill chunk samples one token per row, not {n_steps}")
        if not chunks and not active:
            raise ValueError("a step needs a prefill chunk or at least one active slot")
        if (lengths[active] + n_steps > self.capacity).any():
            raise ValueError(f"decoding {n_steps} more tokens would overflow a slot's capacity of {self.capacity}")
        for chunk in chunks:
            slot, start = chunk.row, chunk.start
            self._copy(self.pages.truncate(slot, start))
            self.lengths[slot] = start
            del self.tokens[slot][start:]
            self._reserve(slot, int(lengths[slot]))
        for s in active:
            self._reserve(s, int(lengths[s]) + n_steps)
        pool, toks, logps = self.model.run(
            self.pages, self.pool, active, np.asarray(tokens)[active], lengths[active], [params[s] for s in active],
            n_steps, None if masks is None else masks.rows(active), chunks,
            self.max_chunk, max(n_steps, self.max_steps))
        self.pool = pool
        for chunk in chunks:
            slot, start = chunk.row, chunk.start
            self.lengths[slot] = lengths[slot]
            self.tokens[slot] += [int(t) for t in chunk.tokens]
            if self.prefix is not None:
                self.prefix.insert(slot, self.tokens[slot], start // self.pages.layout.page_size)
        for s, row in zip(active, toks):  # written: the fed token, then every sampled one but the last
            self.tokens[s] += [int(tokens[s]), *row[:-1].tolist()]
            self.lengths[s] += n_steps
        out_toks = np.zeros((self.n_slots, n_steps), np.int32)
        out_logps = Logprobs(np.zeros((self.n_slots, n_steps), np.float32),
                             np.zeros((self.n_slots, n_steps, TOP_LOGPROBS), np.int32),
                             np.zeros((self.n_slots, n_steps, TOP_LOGPROBS), np.float32))
        out_toks[active] = toks
        for out, got in zip(out_logps, logps):
            out[active] = got
        return out_toks, out_logps

    def check_chunk(self, chunk: engine.Chunk) -> None:
        """Raise ValueError when `chunk` cannot be written: a gap after the slot's tokens, empty, over max_chunk or
        the capacity, or token ids outside the vocabulary."""
        slot, start, end = chunk.row, chunk.start, chunk.start + len(chunk.tokens)
        if not 0 <= start <= self.lengths[slot]:
            raise ValueError(f"slot {slot} holds {self.lengths[slot]} tokens; cannot keep a prefix of {start}")
        if not chunk.tokens or end > self.capacity or len(chunk.tokens) > self.max_chunk:
            raise ValueError(f"slot {slot}: a chunk of {len(chunk.tokens)} tokens (at most {self.max_chunk}) "
                             f"ending at {end} does not fit its capacity of {self.capacity} (or is empty)")
        self.model._check_ids(list(chunk.tokens), end)

    def warmup(self, prefill_tokens: int, decode_steps: int, progress: bool = False) -> int:
        """Compile (and run once, writing nothing) every step a caller can need: for each count of decode rows and
        table width, a decode step (of up to max(decode_steps, max_steps) steps: one program for every count) and a
        step beside each prefill shape of chunks of up to `prefill_tokens` tokens; and a page copy. Returns how
        many."""
        layout, columns = self.pages.layout, self.pages.table.shape[1]
        top = engine.chunk_shape([min(prefill_tokens, self.max_chunk)], self.max_chunk)[1]
        shapes = [(p, t, n) for p, t, n in engine.chunk_shapes(self.max_chunk) if t <= top]
        widths = engine.table_widths(layout, columns)
        programs = [(d, p, t, n, w) for p, t, n in [(0, 0, 0), *shapes] for d in engine.row_buckets(self.n_slots, p > 0)
                    for w in widths if w >= engine.table_width(layout, columns, max(t, 1))]
        programs.append(None)  # the page copy
        if progress:
            from tqdm import tqdm

            programs = tqdm(programs, desc="compiling", unit="program")
        steps = max(decode_steps, self.max_steps)
        for shape in programs:
            check_memory_maps()
            if shape is None:
                self._copy([(0, 0)])
                continue
            chunks = [engine.Chunk(0, [], 0)] if shape[1] else []  # writes nothing
            self.pool = self.model.run(self.pages, self.pool, [], [], [], [], 1, None, chunks, self.max_chunk, steps,
                                       shape)[0]
        return len(programs)

    def rewind(self, slot: int, length: int) -> None:
        """Keep only the slot's first `length` cached tokens (the rest of a decoded run was not taken)."""
        if not 0 <= length <= self.lengths[slot]:
            raise ValueError(f"slot {slot} holds {self.lengths[slot]} tokens; cannot rewind it to {length}")
        self._copy(self.pages.truncate(slot, length))
        self.lengths[slot] = length
        del self.tokens[slot][length:]

    def release(self, slot: int) -> None:
        """Forget a slot's sequence and give its pages back (its full pages stay in the prefix cache, if any)."""
        if self.prefix is not None and self.tokens[slot]:
            self.prefix.insert(slot, self.tokens[slot])
        self.pages.release(slot)
        self.lengths[slot] = 0
        self.tokens[slot] = []

    def _reserve(self, slot: int, tokens: int) -> None:
        """Pages for the slot's first `tokens` positions; PoolFull names the slot and what it holds."""
        try:
            self.pages.reserve(slot, tokens)
        except PoolFull as err:
            raise PoolFull(f"slot {slot} (holding {self.lengths[slot]} tokens): {err}") from None

    def _copy(self, copies: list[tuple[int, int]]) -> None:
        """Apply the allocator's page copies on device."""
        self.pool = apply_copies(self.pool, copies)
