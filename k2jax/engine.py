"""The user-facing model: bucketed, chunked prefill and a multi-step jitted decode loop over a donated page pool.

Prefill runs prompts in chunks of at most PREFILL_CHUNK tokens, padded to power-of-two buckets, so a long
prompt never compiles a new program; decode runs DECODE_STEPS sampled steps per host round trip. Page tables
are cut to a power-of-two bucket of positions that covers the longest row (at most MAX_TABLE_WIDTHS widths), so
short contexts stay cheap.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from k2jax.cache import PageAllocator, PagedCache, PoolLayout, apply_copies, default_page_size, init_pool, make_layout
from k2jax.config import K2Config
from k2jax.model import forward
from k2jax.sampling import Logprobs, SamplingParams, sample, stack_params
from k2jax.tokenizer import TextStream
from sharding.mesh import mesh_of

PREFILL_CHUNK = 512
DECODE_STEPS = 8
MAX_TABLE_WIDTHS = 6


def enable_compilation_cache() -> None:
    """Persist compiled programs across runs (K2JAX_COMPILATION_CACHE='' turns it off)."""
    path = os.environ.get("K2JAX_COMPILATION_CACHE", str(Path.home() / ".cache" / "k2jax" / "xla"))
    if path and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def bucket(n: int, minimum: int = 16) -> int:
    """The smallest power of two >= n (and >= minimum): the shapes programs are compiled for."""
    return max(minimum, 1 << max(n - 1, 0).bit_length())


@functools.lru_cache(maxsize=64)
def table_widths(layout: PoolLayout, columns: int) -> tuple[int, ...]:
    """The page-table widths steps read: one per power-of-two bucket of positions, only the MAX_TABLE_WIDTHS widest
    (attention kernels stop at each row's length, so a wider table costs accelerators next to nothing)."""
    widths, n = {min(columns, layout.pages_for(bucket(1)))}, bucket(1)
    while max(widths) < columns:
        n *= 2
        widths.add(min(columns, layout.pages_for(n)))
    return tuple(sorted(widths))[-MAX_TABLE_WIDTHS:]


def table_width(layout: PoolLayout, columns: int, tokens: int) -> int:
    """The page-table width a step over rows of up to `tokens` positions reads: the narrowest that covers them."""
    need = min(columns, layout.pages_for(bucket(tokens)))
    return next(w for w in table_widths(layout, columns) if w >= need)


@dataclasses.dataclass
class GenerateOutput:
    """Generated ids and texts per sequence (prompt excluded, stop token excluded), and run statistics."""

    ids: list[list[int]]
    texts: list[str] | None
    stats: dict[str, float]
    finish_reasons: list[str]
    logprobs: list[list[float]] | None = None


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "dtype"))
def _logits(graphdef: nnx.GraphDef, state: nnx.State, tokens_BT: jax.Array, cfg: K2Config, dtype: Any) -> jax.Array:
    """Full causal prefill without a cache: float32 logits [B, T, V]."""
    pos_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
    return forward(nnx.merge(graphdef, state), tokens_BT, pos_BT, None, cfg, dtype)[0]


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "dtype"), donate_argnames=("cache",))
def step(graphdef: nnx.GraphDef, state: nnx.State, tokens_BT: jax.Array, pos_BT: jax.Array, cache: PagedCache,
         cfg: K2Config, dtype: Any) -> tuple[jax.Array, PagedCache]:
    """Run T new tokens per row at positions pos_BT through the model, writing their latents into the pages."""
    return forward(nnx.merge(graphdef, state), tokens_BT, pos_BT, cache, cfg, dtype)


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "dtype", "n_steps"), donate_argnames=("cache",))
def decode(graphdef: nnx.GraphDef, state: nnx.State, tok_B: jax.Array, pos_B: jax.Array, live_B: jax.Array,
           cache: PagedCache, sampling: dict[str, jax.Array], cfg: K2Config, dtype: Any,
           n_steps: int, mask_BW: jax.Array | None = None) -> tuple[jax.Array, Logprobs, PagedCache]:
    """n_steps sampled decode steps on device: tokens [B, n], their Logprobs ([B, n] and [B, n, TOP_LOGPROBS]),
    the updated cache.

    Rows that are not live write nothing (their kv_len is 0) and their tokens are junk. mask_BW (packed allowed
    tokens, see k2jax.sampling) holds for every one of the n steps.
    """
    model = nnx.merge(graphdef, state)

    def body(carry, _):
        tok_B, pos_B, cache = carry
        cache = dataclasses.replace(cache, kv_len_B=jnp.where(live_B, pos_B + 1, 0))
        logits_B1V, cache = forward(model, tok_B[:, None], pos_B[:, None], cache, cfg, dtype)
        nxt_B, logp_B = sample(logits_B1V[:, 0], sampling, pos_B + 1, mask_BW)
        return (nxt_B, pos_B + 1, cache), (nxt_B, logp_B)

    (_, _, cache), (toks_NB, logp_NB) = jax.lax.scan(body, (tok_B, pos_B, cache), None, length=n_steps)
    return toks_NB.T, Logprobs(*(jnp.swapaxes(x, 0, 1) for x in logp_NB)), cache


_sample = jax.jit(sample)


@dataclasses.dataclass
class _Row:
    """Host-side state of one sequence: its tokens so far, its text (when there is a tokenizer) and whether, and why,
    it stopped."""

    max_new: int
    stop_ids: frozenset[int]
    text: TextStream | None
    ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    finish: str | None = None

    def add(self, tokens: np.ndarray, logps: np.ndarray) -> str:
        """Append new tokens until a stop id, a stop string or the token limit ends the row; returns the new text
        (a tail that could start a stop string waits until it is decided)."""
        if self.finish is not None:
            return ""
        pieces = []
        for tok, lp in zip(tokens.tolist(), logps.tolist()):
            if tok in self.stop_ids:
                self.finish = "stop"
                break
            self.ids.append(tok)
            self.logprobs.append(lp)
            if self.text is not None:
                pieces.append(self.text.feed([tok]))
                if self.text.stopped:
                    self.finish = "stop"
                    break
            if len(self.ids) >= self.max_new:
                self.finish = "length"
                break
        if self.finish is not None and self.text is not None:
            pieces.append(self.text.feed([], final=True))
        return "".join(pieces)


class Model:
    """A loaded Kimi K2 model: config, parameters, tokenizer, and the jitted entry points.

    Programs run on the mesh the parameters are placed on (set around each call: the model's shard_maps
    read it), with the cache split by the same rules.
    """

    def __init__(self, cfg: K2Config, graphdef: nnx.GraphDef, state: nnx.State, tokenizer: Any = None,
                 dtype: Any = jnp.float32, page_size: int | None = None):
        self.config, self.graphdef, self.state = cfg, graphdef, state
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

    def generate(self, prompts: Sequence[str] | Sequence[Sequence[int]], max_new_tokens: int = 64,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0, min_p: float = 0.0,
                 n: int = 1, stop: Sequence[str] = (), logprobs: bool = False,
                 on_text: Callable[[int, str], None] | None = None) -> GenerateOutput:
        """Continue each prompt (text, or token ids); `n` samples per prompt share one prefill.

        Sequences end at <|im_end|> / EOS, a stop string, or max_new_tokens. Sample j of a prompt uses seed + j.
        `on_text(row, delta)` streams each row's new text as the decode loop produces it.
        """
        if isinstance(prompts, str):
            raise ValueError("prompts must be a list of strings or of token-id lists, not a single string")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if (stop or on_text) and self.tokenizer is None:
            raise ValueError("stop strings and streamed text need a tokenizer")
        ids = [self._encode(p) for p in prompts]
        params = [SamplingParams(temperature, top_k, top_p, min_p, seed + j) for _ in ids for j in range(n)]
        rows = [_Row(max_new_tokens, self._stop_ids(), TextStream(self.tokenizer, stop) if self.tokenizer else None)
                for _ in params]
        stats: dict[str, float] = {"prompt_tokens": sum(len(p) for p in ids)}
        self._compile_s = 0.0
        start = time.perf_counter()
        for i, (toks, logps) in enumerate(self._decode_loop(ids, params, n, max_new_tokens)):
            if i == 0:
                stats["time_to_first_token_s"] = time.perf_counter() - start
                stats["compile_before_first_token_s"] = self._compile_s
            for r, (row, t, lp) in enumerate(zip(rows, toks, logps)):
                text = row.add(t, lp)
                if on_text and text:
                    on_text(r, text)
            if all(r.finish for r in rows):
                break
        for r, row in enumerate(rows):
            rest = row.text.feed([], final=True) if row.text is not None else ""
            if on_text and rest:
                on_text(r, rest)
        elapsed = time.perf_counter() - start
        stats["generated_tokens"] = sum(len(r.ids) for r in rows)
        stats["compile_s"] = self._compile_s
        decode_compile_s = self._compile_s - stats["compile_before_first_token_s"]
        decode_s = elapsed - stats["time_to_first_token_s"] - decode_compile_s
        stats["decode_tokens_per_s"] = (stats["generated_tokens"] - len(rows)) / max(decode_s, 1e-9)
        stats["total_s"] = elapsed
        texts = [r.text.text for r in rows] if self.tokenizer is not None else None
        return GenerateOutput(ids=[r.ids for r in rows], texts=texts, stats=stats,
                              finish_reasons=[r.finish or "length" for r in rows],
                              logprobs=[r.logprobs for r in rows] if logprobs else None)

    def _decode_loop(self, ids: list[list[int]], params: list[SamplingParams], n: int,
                     max_new_tokens: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Prefill the prompts once, fork each into n rows, then yield ([rows, k] tokens, log-probs) per round."""
        lengths = np.array([len(p) for p in ids], np.int32)
        self._check_ids([t for p in ids for t in p], int(lengths.max()) + max_new_tokens)
        firsts = list(range(0, len(ids) * n, n))
        pages, pool = self.paged(len(ids) * n, int(lengths.max()) + max_new_tokens + DECODE_STEPS)
        for row, length in zip(firsts, lengths):
            pages.reserve(row, int(length))
        pool, last_BV = self._prefill(ids, lengths, pages, pool, firsts)
        pool = apply_copies(pool, [c for row, length in zip(firsts, lengths) for j in range(1, n)
                                   for c in pages.fork(row, row + j, int(length))])
        lengths, last_BV = np.repeat(lengths, n), jnp.repeat(last_BV, n, axis=0)
        for row, length in enumerate(lengths):
            pages.reserve(row, int(length) + max_new_tokens + DECODE_STEPS)
        sampling = stack_params(params)
        tok_B, logp_B = _sample(last_BV, sampling, jnp.asarray(lengths))
        yield np.asarray(tok_B)[:, None], np.asarray(logp_B.chosen)[:, None]
        pos_B, live_B = jnp.asarray(lengths), jnp.ones(len(lengths), bool)
        rows = range(len(lengths))
        for done in range(1, max_new_tokens, DECODE_STEPS):
            cache = self.cache_view(pages, pool, rows, lengths + done + DECODE_STEPS)
            toks, logps, cache = self._call(decode, self.graphdef, self.state, tok_B, pos_B, live_B, cache, sampling,
                                            self.config, self.dtype, DECODE_STEPS)
            pool, tok_B, pos_B = cache.pool, toks[:, -1], pos_B + DECODE_STEPS
            yield np.asarray(toks), np.asarray(logps.chosen)

    def _prefill(self, ids: list[list[int]], lengths: np.ndarray, pages: PageAllocator, pool: dict[str, jax.Array],
                 rows: Sequence[int]) -> tuple[dict[str, jax.Array], jax.Array]:
        """Chunked prefill of right-padded prompts into `rows`; returns the pool and each row's last-position logits."""
        B, T = len(ids), int(lengths.max())
        chunk = min(bucket(T), PREFILL_CHUNK)
        tokens = np.zeros((B, -(-T // chunk) * chunk), np.int32)
        for b, p in enumerate(ids):
            tokens[b, : len(p)] = p
        last_BV = jnp.zeros((B, self.config.vocab_size), jnp.float32)
        for start in range(0, T, chunk):
            pos = np.broadcast_to(np.arange(start, start + chunk, dtype=np.int32), (B, chunk))
            cache = self.cache_view(pages, pool, rows, np.minimum(lengths, start + chunk))
            logits_BTV, cache = self._call(step, self.graphdef, self.state, jnp.asarray(tokens[:, start:start + chunk]),
                                           jnp.asarray(pos), cache, self.config, self.dtype)
            pool = cache.pool
            idx = lengths - 1 - start
            here = jnp.asarray((idx >= 0) & (idx < chunk))
            last_BV = jnp.where(here[:, None], logits_BTV[jnp.arange(B), jnp.asarray(np.clip(idx, 0, chunk - 1))],
                                last_BV)
        return pool, last_BV

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
