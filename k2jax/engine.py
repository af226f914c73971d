"""The engine step that every caller drives (generate, the agent and the server, all through k2jax.scheduler), and
Engine: a loaded model's parameters and jitted entry points.

The step (run_step) runs a ragged batch over the donated page pool: prompt chunks (one row's tokens padded to a
chunk_sizes length, at most PREFILL_CHUNK for generate, or up to PACKED_CHUNKS short ones or FULL_CHUNKS long ones
of several rows packed one after another, padded only at the end) and the decode rows of the running sequences only
(padded to a row bucket), their tokens through the dense and MoE layers together, attention per segment (the
chunks' in their rows' [chunks, length] layout).
Decode rows sample on device; a prompt's last token is fed as a decode row (in the step whose chunk ends the
prompt, or later), so no logits go to the host. Decode-only steps loop up to DECODE_STEPS sampled steps on device
per host round trip. Page tables are cut to a power-of-two bucket of positions that covers the longest row (at
most MAX_TABLE_WIDTHS widths), so short contexts stay cheap. Engine.run calls it through packed_step, which keeps
the host's cost per call low: the model's static parts hashed once (Program), its host inputs in one buffer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from k2jax.cache import Packing, PageAllocator, PagedCache, PoolLayout, default_page_size, init_pool, make_layout
from k2jax.config import K2Config
from k2jax.model import forward, hidden, lm_head
from k2jax.sampling import (TOP_LOGPROBS, Logprobs, SamplingParams, StepMasks, host_params, mask_words,
                            sample)
from pallas_kernels import dispatch
from sharding.mesh import mesh_of

PREFILL_CHUNK = 512
DECODE_STEPS = 8
PACKED_CHUNKS = 8  # prompt chunks of several rows one step carries when each is short (at most PACKED_LENGTH)
PACKED_LENGTH = 128
PACKED_TOKENS = (128, 256, 512)  # the token counts such steps are compiled for
FULL_CHUNKS = 2  # chunks of the longest length one step carries, each over half of it (alone it pads to it too)
MAX_TABLE_WIDTHS = 6


@functools.cache
def _one_process() -> bool:
    """Whether JAX runs in one process, asked once (fixed since the backend started): asking it, or an array whether
    it is fully addressable, takes 10-20 us, and each step reads four outputs."""
    return jax.process_count() == 1


def host_value(x: jax.Array) -> np.ndarray:
    """An output's value on this host, also when it spans several processes (multi-host serving)."""
    if _one_process() or x.is_fully_addressable:
        return np.asarray(x)
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def enable_compilation_cache() -> None:
    """Persist compiled programs across runs (K2JAX_COMPILATION_CACHE='' turns it off), small ones too: a warm start
    compiles nothing (the loader's few 10-60 ms programs are read back in ~1 ms each)."""
    path = os.environ.get("K2JAX_COMPILATION_CACHE", str(Path.home() / ".cache" / "k2jax" / "xla"))
    if path and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def bucket(n: int, minimum: int = 16) -> int:
    """The smallest power of two >= n (and >= minimum): the shapes programs are compiled for."""
    return max(minimum, 1 << max(n - 1, 0).bit_length())


def table_widths(layout: PoolLayout, columns: int) -> tuple[int, ...]:
    """The page-table widths steps read: one per power-of-two bucket of positions, only the MAX_TABLE_WIDTHS widest
    (attention kernels stop at each row's length, so a wider table costs accelerators next to nothing); only the
    widest where CPU attention runs in the native kernel, for the same reason and because every compiled CPU
    program holds ~400 of the memory maps Linux allows a process (vm.max_map_count, 65,530)."""
    return _widths(layout, columns, 1 if dispatch.native_attention() else MAX_TABLE_WIDTHS)


@functools.lru_cache(maxsize=64)
def _widths(layout: PoolLayout, columns: int, most: int) -> tuple[int, ...]:
    """The `most` widest page-table widths of the power-of-two buckets of positions."""
    widths, n = {min(columns, layout.pages_for(bucket(1)))}, bucket(1)
    while max(widths) < columns:
        n *= 2
        widths.add(min(columns, layout.pages_for(n)))
    return tuple(sorted(widths))[-most:]


def table_width(layout: PoolLayout, columns: int, tokens: int) -> int:
    """The page-table width a step over rows of up to `tokens` positions reads: the narrowest that covers them."""
    need = min(columns, layout.pages_for(bucket(tokens)))
    return next(w for w in table_widths(layout, columns) if w >= need)


def decode_rows(table: np.ndarray, idx: np.ndarray, rows: Sequence[int], tokens: Sequence[int],
                positions: Sequence[int], params: Sequence[SamplingParams], masks: StepMasks | None, D: int,
                width: int, pad_row: int, words: int, steps: int) -> DecodeRows:
    """The decode segment as host arrays (Engine.run sends them over in one buffer): row rows[i] at index idx[i] of D
    (the rest padding over row pad_row's table, or, when D is every row, each row at its own index), `width` columns
    of its page table, token automata of masks of `words` words and chains of `steps` steps (rows without: every token
    allowed)."""
    n_rows = table.shape[0]
    table_rows = np.arange(n_rows) if D == n_rows else np.full(D, pad_row)
    table_rows[idx] = rows
    tok, pos, live = np.zeros(D, np.int32), np.zeros(D, np.int32), np.zeros(D, bool)
    tok[idx], pos[idx], live[idx] = tokens, positions, True
    row_params = [SamplingParams()] * D
    for i, p in zip(idx, params):
        row_params[i] = p
    automaton = StepMasks.unconstrained(D, words, steps)
    if masks is not None:
        for field, given in zip(automaton, masks.with_steps(steps)):
            field[idx] = given
    return DecodeRows(tok, pos, live, table[table_rows, :width], host_params(row_params), automaton)


def prefill_chunks(table: np.ndarray, chunks: Sequence[Chunk], P: int, T: int, N: int, width: int) -> PrefillChunk:
    """The prefill segment, on the host: the chunks' N tokens one after another (padded at the end), chunk i at row i
    of the kernels' [P, T] layout with `width` columns of its row's page table; rows past the chunks write and see
    nothing."""
    tok_N, place_N, token_PT = np.zeros(N, np.int32), np.full(N, P * T, np.int32), np.zeros((P, T), np.int32)
    start_P, kv_len_P = np.zeros(P, np.int32), np.zeros(P, np.int32)
    table_rows, n = np.full(P, chunks[0].row), 0
    for i, chunk in enumerate(chunks):
        t = np.arange(len(chunk.tokens), dtype=np.int32)
        tok_N[n + t], place_N[n + t], token_PT[i, t] = chunk.tokens, i * T + t, n + t
        start_P[i], kv_len_P[i], table_rows[i] = chunk.start, chunk.start + len(chunk.tokens), chunk.row
        n += len(chunk.tokens)
    return PrefillChunk(tok_N, place_N, token_PT, start_P, kv_len_P, table[table_rows, :width])


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "dtype"))
def _logits(graphdef: nnx.GraphDef, state: nnx.State, tokens_BT: jax.Array, cfg: K2Config, dtype: Any) -> jax.Array:
    """Full causal prefill without a cache: float32 logits [B, T, V]."""
    pos_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
    return forward(nnx.merge(graphdef, state), tokens_BT, pos_BT, None, cfg, dtype)[0]


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "dtype"), donate_argnames=("cache",))
def step(graphdef: nnx.GraphDef, state: nnx.State, tokens_BT: jax.Array, pos_BT: jax.Array, cache: PagedCache,
         cfg: K2Config, dtype: Any) -> tuple[jax.Array, PagedCache]:
    """Run T new tokens per row at positions pos_BT through the model, writing their latents into the pages (the
    model-level building block: full logits, no sampling; serving runs `run_step`)."""
    return forward(nnx.merge(graphdef, state), tokens_BT, pos_BT, cache, cfg, dtype)


class Walk(NamedTuple):
    """Where each decode row stands in its token automaton (k2jax.sampling.StepMasks): its state (-1: off the
    automaton, drawing from every token), how many of the state's chain tokens it took, and whether every token so
    far followed the chains and edges (a row off them keeps a stale mask and follows no edge)."""

    state_D: jax.Array
    at_D: jax.Array
    on_D: jax.Array

    @staticmethod
    def start(D: int) -> Walk:
        """Every row at state 0, none of its chain taken."""
        return Walk(jnp.zeros(D, jnp.int32), jnp.zeros(D, jnp.int32), jnp.ones(D, bool))


def _bits(tokens: jax.Array, words: int) -> tuple[jax.Array, jax.Array]:
    """The packed-mask word of each listed token and its bit (padding: word `words`, out of range, and no bit)."""
    listed = tokens >= 0
    return jnp.where(listed, tokens // 32, words), jnp.where(listed, jnp.uint32(1) << (tokens % 32).astype(jnp.uint32),
                                                            jnp.uint32(0))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeRows:
    """The decode segment of a step: row d feeds tok_D[d] at position pos_D[d] through page table table_DM[d] and
    samples as its token automaton says (masks, see k2jax.sampling.StepMasks; a Walk follows it). Rows not live write
    and read nothing; their tokens are junk."""

    tok_D: jax.Array
    pos_D: jax.Array
    live_D: jax.Array
    table_DM: jax.Array
    sampling: dict[str, jax.Array]
    masks: StepMasks

    def states(self, S: int | None = None) -> jax.Array:
        """The first S (default: all) states of every row's automaton as one int32 row [D, S, W + N + 2E + 1], so
        that a step reads its rows' states in one gather (`current`): the packed tokens it allows (its row's words if
        based on them, plus the tokens it adds, whose bits are not set there, minus those it drops, whose bits are),
        its chain, its edges, their targets, and whether it holds. Built once per call."""
        D, W = self.masks.words.shape
        m = self.masks._replace(**{f: getattr(self.masks, f)[:, :S] for f in StepMasks._fields if f != "words"})
        S = m.base.shape[1]
        row_words_D1W = jax.lax.bitcast_convert_type(m.words, jnp.uint32)[:, None]
        words_DSW = jnp.where(m.base[:, :, None], row_words_D1W, jnp.uint32(0))
        d_DSE, s_DSE = jnp.arange(D)[:, None, None], jnp.arange(S)[None, :, None]
        col_DSE, bit_DSE = _bits(m.add, W)
        words_DSW = words_DSW.at[d_DSE, s_DSE, col_DSE].add(bit_DSE, mode="drop")
        col_DSE, bit_DSE = _bits(m.drop, W)
        words_DSW = words_DSW.at[d_DSE, s_DSE, col_DSE].add(jnp.uint32(0) - bit_DSE, mode="drop")
        return jnp.concatenate([jax.lax.bitcast_convert_type(words_DSW, jnp.int32), m.chain, m.edges, m.to,
                                m.hold[:, :, None].astype(jnp.int32)], axis=2)

    def current(self, walk: Walk, states_DSK: jax.Array) -> jax.Array:
        """Each row's state now [D, K] (of `states`; state 0 for a row off the automaton, which nothing reads)."""
        return states_DSK[jnp.arange(states_DSK.shape[0]), jnp.maximum(walk.state_D, 0)]

    def step_mask(self, walk: Walk, state_DK: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The next step's masks [D, W] (packed; all bits set off the automaton) and forced tokens [D] (-1: sample):
        each row's state's next chain token, else the tokens its state allows."""
        W, N = self.masks.words.shape[1], self.masks.chain.shape[2]
        chain_D = jnp.sum(jnp.where(jnp.arange(N) == walk.at_D[:, None], state_DK[:, W:W + N], 0), axis=1)
        forced_D = jnp.where(walk.on_D & (walk.at_D < N), chain_D, -1)
        return jnp.where((walk.state_D >= 0)[:, None], state_DK[:, :W], -1), forced_D

    def advance(self, walk: Walk, state_DK: jax.Array, tok_D: jax.Array, forced_D: jax.Array) -> Walk:
        """The Walk after each row took tok_D (forced_D: from its chain): a sampled token that its state lists as an
        edge moves it there; any other keeps the state (if it holds) or takes the row off the automaton."""
        W, N, E = self.masks.words.shape[1], self.masks.chain.shape[2], self.masks.edges.shape[2]
        edges_DE, to_DE, hold_D = (state_DK[:, W + N:W + N + E], state_DK[:, W + N + E:W + N + 2 * E],
                                   state_DK[:, -1] != 0)
        chained_D = forced_D >= 0
        hit_DE = (edges_DE == tok_D[:, None]) & (edges_DE >= 0) & walk.on_D[:, None]
        found_D = hit_DE.any(axis=1)
        target_D = jnp.sum(jnp.where(hit_DE, to_DE, 0), axis=1)
        kept_D = jnp.where(hold_D, walk.state_D, -1)
        state_D = jnp.where(chained_D, walk.state_D, jnp.where(found_D, target_D, kept_D))
        at_D = jnp.where(chained_D, walk.at_D + 1, jnp.where(found_D, 0, walk.at_D))
        return Walk(state_D, at_D, walk.on_D & (chained_D | found_D))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PrefillChunk:
    """The prefill segment of a step: prompt tokens tok_N, chunk after chunk, each at place_N of the kernels' [P, T]
    layout (token_PT: the token at each place), of rows table_PM at positions start_P.., of which those below kv_len_P
    are written (the rest is padding); nothing is sampled from them."""

    tok_N: jax.Array
    place_N: jax.Array
    token_PT: jax.Array
    start_P: jax.Array
    kv_len_P: jax.Array
    table_PM: jax.Array


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "dtype", "layout", "max_steps"),
                   donate_argnames=("pool",))
def run_step(graphdef: nnx.GraphDef, state: nnx.State, pool: dict[str, jax.Array], rows: DecodeRows,
             chunk: PrefillChunk | None, n_steps: jax.Array, cfg: K2Config, dtype: Any, layout: PoolLayout,
             max_steps: int) -> tuple[jax.Array, Logprobs, dict[str, jax.Array]]:
    """The engine step. With chunks: the chunks and one step of the decode rows in one pass. Without: n_steps (a
    device scalar, at most max_steps: one program for every count) steps of the decode rows, looped on device.
    Returns sampled tokens [D, max_steps] (the first n_steps are real; one with chunks), their Logprobs, the pool.

    Both segments write their latents before either attends, so a decode row may feed the last prompt token of a
    chunk that ends in this step (its first token is sampled here); the dense and MoE layers run over both
    segments' tokens at once.
    Each row samples as its token automaton says (DecodeRows.step_mask, advance).
    """
    model = nnx.merge(graphdef, state)

    states_DSK = rows.states(1 if chunk is not None else None)  # a step with chunks samples at state 0 only

    def one(tok_D: jax.Array, pos_D: jax.Array, pool: dict[str, jax.Array], chunk: PrefillChunk | None,
            walk: Walk):
        segments = [(tok_D[:, None], pos_D[:, None],
                     PagedCache(pool, rows.table_DM, jnp.where(rows.live_D, pos_D + 1, 0), layout))]
        if chunk is not None:
            pos_PT = chunk.start_P[:, None] + jnp.arange(chunk.token_PT.shape[1], dtype=jnp.int32)
            packing = Packing(chunk.place_N, chunk.token_PT, pos_PT)
            chunk_cache = PagedCache(pool, chunk.table_PM, chunk.kv_len_P, layout, all_rows=False, packing=packing)
            segments.insert(0, (chunk.tok_N[None], packing.to_tokens(pos_PT), chunk_cache))
        tokens, positions, caches = zip(*segments)
        xs_BTM, pool = hidden(model, tokens, positions, caches, cfg, dtype)
        logits_DV = lm_head(model, xs_BTM[-1][:, 0])
        state_DK = rows.current(walk, states_DSK)
        mask_DW, forced_D = rows.step_mask(walk, state_DK)
        nxt_D, logp_D = sample(logits_DV, rows.sampling, pos_D + 1, mask_DW, forced_D)
        return nxt_D, logp_D, pool, rows.advance(walk, state_DK, nxt_D, forced_D)

    D = rows.tok_D.shape[0]
    if chunk is not None:
        nxt_D, logp_D, pool, _ = one(rows.tok_D, rows.pos_D, pool, chunk, Walk.start(D))
        return nxt_D[:, None], jax.tree.map(lambda x: x[:, None], logp_D), pool

    def body(i, carry):
        tok_D, pos_D, pool, walk, toks_DN, logp_DN = carry
        nxt_D, logp_D, pool, walk = one(tok_D, pos_D, pool, None, walk)
        logp_DN = jax.tree.map(lambda acc, x: acc.at[:, i].set(x), logp_DN, logp_D)
        return nxt_D, pos_D + 1, pool, walk, toks_DN.at[:, i].set(nxt_D), logp_DN

    logp_DN = Logprobs(jnp.zeros((D, max_steps), jnp.float32), jnp.zeros((D, max_steps, TOP_LOGPROBS), jnp.int32),
                       jnp.zeros((D, max_steps, TOP_LOGPROBS), jnp.float32))
    init = (rows.tok_D, rows.pos_D, pool, Walk.start(D), jnp.zeros((D, max_steps), jnp.int32), logp_DN)
    _, _, pool, _, toks_DN, logp_DN = jax.lax.fori_loop(0, n_steps, body, init)
    return toks_DN, logp_DN, pool


class Program:
    """What an engine's step programs are specialised on, as one jit static argument whose hash is taken once: the
    model's graph, its state's tree structure, config and compute dtype. jit hashes static arguments on every call,
    and a GraphDef's hash walks the whole graph (0.17 ms a call on the 2-core box)."""

    def __init__(self, graphdef: nnx.GraphDef, treedef: Any, cfg: K2Config, dtype: Any):
        self.graphdef, self.treedef, self.cfg, self.dtype = graphdef, treedef, cfg, dtype
        self._key = (graphdef, treedef, cfg, dtype)
        self._hash = hash(self._key)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return self is other or (isinstance(other, Program) and self._hash == other._hash and self._key == other._key)


@dataclasses.dataclass(frozen=True)
class HostLayout:
    """Where each host input of a step lies in the one int32 buffer it travels in (pack_host): the inputs' tree
    structure, each leaf's shape, dtype and offset, and the buffer's length (all in 4-byte words)."""

    treedef: Any
    leaves: tuple[tuple[tuple[int, ...], str, int], ...]
    words: int


def host_layout(tree: Any) -> HostLayout:
    """The layout pack_host gives a tree of arrays (numpy, or ShapeDtypeStructs to compile ahead)."""
    return _layout(*jax.tree.flatten(tree))


def _layout(leaves: Sequence[Any], treedef: Any) -> HostLayout:
    """Leaves end to end in tree order, one word per element; ValueError for a dtype that is not 4 bytes or bool."""
    where, offset = [], 0
    for leaf in leaves:
        if leaf.dtype.itemsize != 4 and leaf.dtype != np.bool_:
            raise ValueError(f"a step's host inputs are 4-byte or bool arrays, not {leaf.dtype} {tuple(leaf.shape)}")
        where.append((tuple(leaf.shape), leaf.dtype.str, offset))
        offset += leaf.size
    return HostLayout(treedef, tuple(where), offset)


def pack_host(tree: Any) -> tuple[np.ndarray, HostLayout]:
    """A tree of host arrays (4-byte dtypes or bool) as one int32 buffer and its layout: a jitted call transfers
    each numpy argument on its own, and a decode step has some twenty (with the Program, a call returns in 0.74 ms
    instead of 1.11 on the 2-core box). Words, not bytes, so that unpacking is a slice and a same-width bitcast:
    byte-wise, each leaf's shifts and ors were fusions of their own, 10% more compile time per step program."""
    leaves, treedef = jax.tree.flatten(tree)
    leaves = [np.asarray(leaf) for leaf in leaves]
    layout = _layout(leaves, treedef)
    return np.concatenate([leaf.astype(np.int32) if leaf.dtype == np.bool_ else leaf.view(np.int32)
                           for leaf in leaves], axis=None), layout


def unpack_host(buf_N: np.ndarray | jax.Array, layout: HostLayout) -> Any:
    """pack_host's tree back from its buffer: numpy arrays from a numpy buffer (what the multi-host link shares), or
    inside a jitted program. There, on a mesh, each leaf stays whole on every device, as the buffer is: left free,
    the partitioner split the buffer as a later use splits a leaf and exchanged halos to slice it (116-117
    collective-permutes and a third more compiled program on an 8-device CPU mesh, 10% more compile time; the mesh
    test counts them)."""
    host = isinstance(buf_N, np.ndarray)
    pin = not host and not jax.sharding.get_abstract_mesh().empty
    leaves = []
    for shape, dtype_str, offset in layout.leaves:
        dtype = np.dtype(dtype_str)
        part = buf_N[offset:offset + math.prod(shape)].reshape(shape)
        if dtype == np.bool_:
            leaf = part != 0
        else:
            leaf = part.view(dtype) if host else jax.lax.bitcast_convert_type(part, dtype)
        leaves.append(jax.lax.with_sharding_constraint(leaf, jax.sharding.PartitionSpec()) if pin else leaf)
    return jax.tree.unflatten(layout.treedef, leaves)


@functools.partial(jax.jit, static_argnames=("program", "host_layout", "layout", "max_steps"),
                   donate_argnames=("pool",))
def packed_step(program: Program, leaves: list[jax.Array], pool: dict[str, jax.Array], host_N: jax.Array,
                host_layout: HostLayout, layout: PoolLayout, max_steps: int
                ) -> tuple[jax.Array, Logprobs, dict[str, jax.Array]]:
    """run_step as Engine.run calls it: the state as its leaves, the host inputs (decode rows, prefill chunk, step
    count) as one int32 buffer (pack_host)."""
    rows, chunk, n_steps = unpack_host(host_N, host_layout)
    state = jax.tree.unflatten(program.treedef, leaves)
    return run_step(program.graphdef, state, pool, rows, chunk, n_steps, program.cfg, program.dtype, layout, max_steps)


def row_buckets(n_rows: int, chunk: bool = False) -> tuple[int, ...]:
    """The decode-row counts steps are compiled for: powers of two below n_rows, and n_rows; beside a prefill chunk
    (whose tokens outnumber a few padded rows) powers of four, so there are fewer programs to compile."""
    base = 4 if chunk else 2
    return tuple(sorted({min(base ** k, n_rows) for k in range(n_rows.bit_length() + 1)}))


def row_bucket(n: int, n_rows: int, chunk: bool = False) -> int:
    """The decode-row count a step over n running rows pads to (beside a prefill chunk if `chunk`)."""
    return next(b for b in row_buckets(n_rows, chunk) if b >= n)


def chunk_sizes(limit: int) -> tuple[int, ...]:
    """The prefill-chunk lengths steps are compiled for when chunks hold at most `limit` tokens: 16, 64, 256, ...
    (x4: a chunk pads to under 4x its tokens) up to the power of two covering limit."""
    top, sizes = bucket(limit), []
    while not sizes or sizes[-1] < top:
        sizes.append(min(16 * 4 ** len(sizes), top))
    return tuple(sizes)


def chunk_shapes(limit: int) -> tuple[tuple[int, int, int], ...]:
    """The (chunks, length, tokens) shapes of prefill segments steps are compiled for: one chunk of each
    chunk_sizes(limit) length; up to PACKED_CHUNKS chunks of at most PACKED_LENGTH tokens, each PACKED_TOKENS count
    that fits the largest length in all; and FULL_CHUNKS of the largest (so a burst of long prompts prefills in fewer
    steps, each step's decode rows and weight reads shared)."""
    top = chunk_sizes(limit)[-1]
    return tuple((1, t, t) for t in chunk_sizes(limit)) + tuple(
        (PACKED_CHUNKS, PACKED_LENGTH, n) for n in PACKED_TOKENS if n <= top) + ((FULL_CHUNKS, top, FULL_CHUNKS * top),)


def chunk_shape(lengths: Sequence[int], limit: int) -> tuple[int, int, int] | None:
    """The shape prompt chunks of these lengths (each <= limit) go in together: the fewest tokens; None when no
    compiled shape holds them. Several chunks pack as short ones (at most limit tokens together) or as FULL_CHUNKS
    long ones (each over half the largest length, so none pads more than it would alone)."""
    top = chunk_sizes(limit)[-1]

    def holds(p: int, t: int, n: int) -> bool:
        if p < len(lengths) or t < max(lengths) or n < sum(lengths):
            return False
        if len(lengths) == 1:
            return True
        return min(lengths) > top // 2 if (p, t) == (FULL_CHUNKS, top) else sum(lengths) <= limit

    return min([s for s in chunk_shapes(limit) if holds(*s)], key=lambda shape: shape[2], default=None)


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Prompt tokens for row `row` at positions start.. (the row must hold pages for them)."""

    row: int
    tokens: Sequence[int]
    start: int


class Engine:
    """A loaded Kimi K2 model: config, parameters, tokenizer, and the jitted entry points (k2jax.llm.Model adds
    generate).

    Programs run on the mesh the parameters are placed on (set around each call: the model's shard_maps
    read it), with the cache split by the same rules.
    """

    def __init__(self, cfg: K2Config, graphdef: nnx.GraphDef, state: nnx.State, tokenizer: Any = None,
                 dtype: Any = jnp.float32, page_size: int | None = None):
        self.config, self.graphdef, self.state = cfg, graphdef, state
        self._leaves, treedef = jax.tree.flatten(state)
        self._program = Program(graphdef, treedef, cfg, dtype)
        self.page_size = page_size or default_page_size(jax.default_backend())
        self.tokenizer, self.dtype = tokenizer, dtype
        self._compiled: set[tuple] = set()
        self._compile_s = 0.0
        self.mesh = mesh_of(state)
        enable_compilation_cache()

    def on_mesh(self) -> contextlib.AbstractContextManager:
        """Context in which jitted entry points trace and run on this model's mesh."""
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def logits(self, token_ids: Any) -> np.ndarray:
        """int [B, T] -> float32 logits [B, T, vocab] of a full causal prefill."""
        tokens = np.asarray(token_ids)
        if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"token_ids must be an integer array [batch, time], got {tokens.dtype} {tokens.shape}")
        self._check_ids(tokens.reshape(-1).tolist(), tokens.shape[1])
        with self.on_mesh():
            return np.asarray(_logits(self.graphdef, self.state, jnp.asarray(tokens, jnp.int32), self.config,
                                      self.dtype))

    def paged(self, n_rows: int, tokens_per_row: int, num_pages: int | None = None
              ) -> tuple[PageAllocator, dict[str, jax.Array]]:
        """An empty page pool on the model's mesh for n_rows sequences of up to tokens_per_row tokens, and its
        allocator; num_pages defaults to every row at its maximum."""
        layout = make_layout(self.mesh, n_rows, tokens_per_row, self.page_size, num_pages)
        return PageAllocator(layout, tokens_per_row), init_pool(self.config, layout, self.dtype, self.mesh)

    def cache_view(self, pages: PageAllocator, pool: dict[str, jax.Array], rows: Sequence[int],
                   kv_len: Sequence[int], width: int | None = None) -> PagedCache:
        """The cache a step over `rows` reads: their page tables cut to `width` columns (default: the position
        bucket covering kv_len). Host arrays go over as plain transfers, which compile nothing."""
        width = width or table_width(pages.layout, pages.table.shape[1], int(max(kv_len)))
        return PagedCache(pool, jax.device_put(np.ascontiguousarray(pages.table[np.asarray(rows), :width])),
                          jax.device_put(np.asarray(kv_len, np.int32)), pages.layout)

    def run(self, pages: PageAllocator, pool: dict[str, jax.Array], rows: Sequence[int], tokens: Sequence[int],
            positions: Sequence[int], params: Sequence[SamplingParams], n_steps: int, masks: StepMasks | None = None,
            chunks: Sequence[Chunk] = (), chunk_limit: int | None = None, max_steps: int | None = None,
            shape: tuple[int, int, int, int, int] | None = None
            ) -> tuple[dict[str, jax.Array], np.ndarray, Logprobs]:
        """One engine step: `chunks` (prompt tokens of distinct rows) are written, and in the same pass row rows[i]
        feeds tokens[i] at positions[i] and samples n_steps tokens (with chunks: one) under masks row i (packed
        allowed tokens, maybe drafting), each row's pages covering what it writes. Returns the pool, [len(rows), n]
        tokens and their Logprobs.

        Decode rows pad to a row bucket (only running rows are in the step; all the layout's rows in their own order
        when the bucket is all of them, so the pages' row split holds), the chunks to a chunk_shape(chunk_limit),
        the step count to max_steps (default max(n_steps, DECODE_STEPS)); shape (rows, chunks, chunk length, chunk
        tokens, table width) forces the buckets (to compile ahead: warmup).
        """
        layout, columns = pages.layout, pages.table.shape[1]
        n_rows, n_real = layout.n_rows, len(rows)
        max_steps = 1 if chunks else max_steps or max(n_steps, DECODE_STEPS)
        if not 0 < n_steps <= max_steps:
            raise ValueError(f"a step samples 1 to {max_steps} tokens per row (1 with a prefill chunk), not {n_steps}")
        P, T, N = (0, 0, 0)
        if chunks:
            limit = chunk_limit or PREFILL_CHUNK
            P, T, N = chunk_shape([len(c.tokens) for c in chunks], limit) or (0, 0, 0)
            if not P:
                raise ValueError(f"no compiled step holds prompt chunks of {[len(c.tokens) for c in chunks]} tokens "
                                 f"(one of at most {limit}, up to {PACKED_CHUNKS} of at most {PACKED_LENGTH} and "
                                 f"{min(limit, PACKED_TOKENS[-1])} together, or {FULL_CHUNKS} of over half of "
                                 f"{chunk_sizes(limit)[-1]})")
        D, P, T, N, width = shape or (row_bucket(max(n_real, 1), n_rows, bool(chunks)), P, T, N, 0)
        need = max([int(p) + n_steps for p in positions] + [c.start + T for c in chunks] + [1])
        width = width or table_width(layout, columns, need)
        idx = np.asarray(rows, np.int64) if D == n_rows else np.arange(n_real)
        pad_row = rows[0] if rows else chunks[0].row if chunks else 0
        decode = decode_rows(pages.table, idx, rows, tokens, positions, params, masks, D, width, pad_row,
                             mask_words(self.config.vocab_size), max_steps)
        prefill = prefill_chunks(pages.table, chunks, P, T, N, width) if P else None
        host_N, host_layout = pack_host((decode, prefill, np.int32(n_steps)))
        toks, logps, pool = self._call(packed_step, self._program, self._leaves, pool, host_N, host_layout, layout,
                                       max_steps)
        return pool, host_value(toks)[idx, :n_steps], Logprobs(*(host_value(x)[idx, :n_steps] for x in logps))

    def lower(self, pool: dict[str, jax.Array], rows: DecodeRows, chunk: PrefillChunk | None, n_steps: int,
              layout: PoolLayout, max_steps: int) -> jax.stages.Lowered:
        """The step program run() calls for these host inputs (decode_rows, prefill_chunks), lowered on the model's
        mesh: to read what the compiler makes of it."""
        host_N, host_layout = pack_host((rows, chunk, np.int32(n_steps)))
        with self.on_mesh():
            return packed_step.lower(self._program, self._leaves, pool, host_N, host_layout, layout, max_steps)

    def _call(self, fn: Callable, *args: Any) -> Any:
        """Call a jitted entry point; the first call of each shape is timed (blocking) as compile time."""
        key = (fn, *(getattr(x, "shape", x) for x in jax.tree.leaves(args[2:])))
        if key in self._compiled:
            with self.on_mesh():
                return fn(*args)
        start = time.perf_counter()
        with self.on_mesh():
            out = jax.block_until_ready(fn(*args))
        self._compile_s += time.perf_counter() - start
        self._compiled.add(key)
        return out

    def _stop_ids(self) -> frozenset[int]:
        """Token ids that end a sequence: the tokenizer's (<|im_end|>, [EOS]) or the config's EOS."""
        if self.tokenizer is not None:
            return frozenset(self.tokenizer.stop_ids)
        return frozenset({self.config.eos_token_id})

    def _encode(self, prompt: str | Sequence[int]) -> list[int]:
        """Token ids of one prompt; text needs the tokenizer."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompts as lists of token ids")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("empty prompt: give at least one token")
        return ids

    def _check_ids(self, ids: list[int], total_len: int) -> None:
        """Token ids must index the vocabulary and the whole sequence must fit the context."""
        cfg = self.config
        if total_len > cfg.max_position_embeddings:
            raise ValueError(f"prompt plus max_new_tokens is {total_len} tokens, over the model's context of "
                             f"{cfg.max_position_embeddings} (max_position_embeddings)")
        bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {cfg.vocab_size})")
