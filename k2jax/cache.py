"""The latent KV cache as a page pool: device pages [L, P, N, C] per layer stack, and the host allocator.

A sequence (a row) owns the pages its page table lists; page m of a row holds positions [m*N, (m+1)*N).
On a mesh the pool's page axis is split over every mesh axis: rows over the 'batch' axes that divide them
(data-parallel attention) and each row's pages over the rest (context parallel), striped so that page m
of row r lives in device group (row shard of r, m mod position shards). The allocator keeps that
placement; the model finds a device's own pages by their ids (see model.paged_attention).
Pages shared by several rows (a common prefix) are ref-counted; a shared page is never written. Pages may also be
pinned by a holder outside the tables (the prefix cache, k2jax.prefix_cache): a pinned page that no row holds is
reclaimable, and the allocator asks its `reclaim` hook to free such pages when a free list runs short.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from k2jax.config import K2Config
from pallas_kernels.ragged_mla import GPU_PAGE_SIZE, TPU_PAGE_SIZE
from sharding.rules import paged_axes

CPU_PAGE_SIZE = 32  # one key block of the native kernel (32 keys, blocks stay within a page); XLA gathers whole pages
Array = jax.Array


def default_page_size(backend: str) -> int:
    """Tokens per page for a backend: what its attention kernel reads best."""
    return {"tpu": TPU_PAGE_SIZE, "gpu": GPU_PAGE_SIZE, "cuda": GPU_PAGE_SIZE}.get(backend, CPU_PAGE_SIZE)


class PoolFull(ValueError):
    """The pool has too few free pages for a sequence: the message names the row, its length and the free pages."""


@dataclasses.dataclass(frozen=True)
class PoolLayout:
    """Where pages live: `pages_per_group` pages on each device group, rows and positions split as named.

    Groups are numbered row shard major (group = row_shard * seq_shards + position shard), the order of
    the pool's page axis split over row_axes + seq_axes.
    """

    page_size: int
    pages_per_group: int
    n_rows: int
    row_axes: tuple[str, ...] = ()
    seq_axes: tuple[str, ...] = ()
    row_shards: int = 1
    seq_shards: int = 1

    @property
    def groups(self) -> int:
        return self.row_shards * self.seq_shards

    @property
    def num_pages(self) -> int:
        return self.groups * self.pages_per_group

    @property
    def pool_axes(self) -> tuple[str, ...]:
        """The mesh axes the page axis is split over, in group order."""
        return self.row_axes + self.seq_axes

    def row_shard(self, row: int) -> int:
        """The shard of the rows that `row` belongs to."""
        return row // (self.n_rows // self.row_shards)

    def group(self, row: int, page: int) -> int:
        """The device group holding page `page` (in sequence order) of row `row`."""
        return self.row_shard(row) * self.seq_shards + page % self.seq_shards

    def pages_for(self, tokens: int) -> int:
        """Pages a row needs for `tokens` positions, rounded up to whole stripes over the position shards."""
        return -(-math.ceil(tokens / self.page_size) // self.seq_shards) * self.seq_shards


def make_layout(mesh: Mesh | None, n_rows: int, tokens_per_row: int, page_size: int,
                num_pages: int | None = None) -> PoolLayout:
    """A layout for n_rows sequences of up to tokens_per_row tokens; num_pages defaults to every row at its maximum."""
    if page_size < 1 or page_size & (page_size - 1):
        raise ValueError(f"page_size must be a power of two, got {page_size}")
    row_axes, seq_axes = paged_axes(mesh, n_rows) if mesh is not None else ((), ())
    row_shards, seq_shards = (math.prod(mesh.shape[a] for a in axes) if mesh is not None else 1
                              for axes in (row_axes, seq_axes))
    layout = PoolLayout(page_size, 1, n_rows, row_axes, seq_axes, row_shards, seq_shards)
    per_row = layout.pages_for(tokens_per_row)
    total = n_rows * per_row if num_pages is None else num_pages
    return dataclasses.replace(layout, pages_per_group=max(1, math.ceil(total / layout.groups)))


def pool_sharding(layout: PoolLayout, mesh: Mesh) -> NamedSharding:
    """Pages split over the layout's axes; layers, in-page positions and lanes whole."""
    axes = layout.pool_axes
    return NamedSharding(mesh, P(None, axes if len(axes) > 1 else (axes[0] if axes else None), None, None))


def pool_shapes(cfg: K2Config, layout: PoolLayout) -> dict[str, tuple[int, ...]]:
    """[L, P, N, C] per layer stack (dense, moe)."""
    return {name: (n, layout.num_pages, layout.page_size, cfg.cache_lanes)
            for name, n in (("dense", cfg.first_k_dense_replace), ("moe", cfg.num_moe_layers)) if n}


def init_pool(cfg: K2Config, layout: PoolLayout, dtype: Any = jnp.bfloat16, mesh: Mesh | None = None
              ) -> dict[str, Array]:
    """A zeroed page pool, created in place on the mesh (each device allocates only its own pages)."""
    shapes = tuple(pool_shapes(cfg, layout).items())
    if mesh is None:
        return {name: jnp.zeros(shape, dtype) for name, shape in shapes}
    return zeros_program(shapes, dtype, pool_sharding(layout, mesh))()


@functools.lru_cache(maxsize=16)
def zeros_program(shapes: tuple[tuple[str, tuple[int, ...]], ...], dtype: Any, sharding: NamedSharding
                  ) -> Callable[[], dict[str, Array]]:
    """The jitted zeroed pool of these shapes on `sharding`, kept per pool shape: a new pool of a known shape (each
    Model.generate call makes one) is neither traced nor compiled again."""
    return jax.jit(lambda: {name: jnp.zeros(shape, dtype) for name, shape in shapes},
                   out_shardings={name: sharding for name, _ in shapes})


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Packing:
    """Where the tokens of a packed segment (prompt chunks of several rows one after another, [1, N], so the dense
    layers see no padding between them) sit in the attention kernels' [B, T] layout of its rows: place_N (b * T + t;
    B * T for the padding after the last chunk), token_BT (the token at each place; any past a row's chunk) and the
    places' positions pos_BT."""

    place_N: Array
    token_BT: Array
    pos_BT: Array

    def real_N(self) -> Array:
        """Which of the segment's tokens are a chunk's (the rest pads the segment to its bucket)."""
        return self.place_N < self.token_BT.size

    def to_places(self, x_1N: Array) -> Array:
        """Per-token values [1, N, ...] at the layout's places [B, T, ...]."""
        return x_1N[0][self.token_BT]

    def to_tokens(self, x_BT: Array) -> Array:
        """Per-place values [B, T, ...] at the segment's tokens [1, N, ...] (padding tokens: the last place's)."""
        places = self.token_BT.size
        return x_BT.reshape(places, *x_BT.shape[2:])[jnp.minimum(self.place_N, places - 1)][None]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PagedCache:
    """What a step reads and writes: the pool, each row's page table [B, M] (M a multiple of seq_shards), and
    the tokens each row holds once the step's new tokens are written (kv_len 0: the row takes no part).
    all_rows: its B rows are the layout's rows in order when B is their count (then split as their pages are);
    False for rows of any slots (prefill chunks), which every device attends over the pages it holds.
    packing: for a packed segment (its tokens [1, N] of these B rows), where they sit in the rows' [B, T] layout."""

    pool: dict[str, Array]
    table_BM: Array
    kv_len_B: Array
    layout: PoolLayout = dataclasses.field(metadata={"static": True})
    all_rows: bool = dataclasses.field(default=True, metadata={"static": True})
    packing: Packing | None = None


def abstract_cache(cfg: K2Config, layout: PoolLayout, rows: int, width: int, dtype: Any = jnp.bfloat16,
                   mesh: Mesh | None = None) -> PagedCache:
    """ShapeDtypeStructs of a PagedCache over `rows` rows with `width`-page tables (to compile; nothing allocated)."""
    def sds(shape: tuple[int, ...], dt: Any, sharding: NamedSharding | None = None) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dt, sharding=sharding)

    pool_sh = None if mesh is None else pool_sharding(layout, mesh)
    replicated = None if mesh is None else NamedSharding(mesh, P())
    return PagedCache({k: sds(s, dtype, pool_sh) for k, s in pool_shapes(cfg, layout).items()},
                      sds((rows, width), jnp.int32, replicated), sds((rows,), jnp.int32, replicated), layout)


@functools.partial(jax.jit, donate_argnames=("pool",))
def copy_pages(pool: dict[str, Array], src: Array, dst: Array) -> dict[str, Array]:
    """Pages dst[i] := pages src[i] in every layer (copy-on-write of a shared page, forks across devices)."""
    return {name: p.at[:, dst].set(p[:, src]) for name, p in pool.items()}


def apply_copies(pool: dict[str, Array], copies: list[tuple[int, int]]) -> dict[str, Array]:
    """The pool after the allocator's (src, dst) page copies (fork, copy-on-write); host ids go over as plain
    transfers, which compile nothing."""
    if not copies:
        return pool
    src, dst = np.array(copies, np.int32).T
    return copy_pages(pool, jax.device_put(src), jax.device_put(dst))


class PageAllocator:
    """Host-side page tables, ref-counts and per-group free lists for `layout.n_rows` rows.

    Every row may hold up to `max_tokens` positions. All methods keep the tables, counts and free lists
    consistent or raise before changing anything (but what `reclaim` frees). refs counts a page's table entries
    plus its pins; `reclaim(short)`, when set, frees reclaimable pages for {group: pages short}.
    """

    def __init__(self, layout: PoolLayout, max_tokens: int):
        self.layout, self.max_tokens = layout, max_tokens
        self.table = np.zeros((layout.n_rows, layout.pages_for(max_tokens)), np.int32)
        self.held = np.zeros(layout.n_rows, np.int32)  # pages each row holds (its table's first entries)
        self.refs = np.zeros(layout.num_pages, np.int32)
        self.pinned = np.zeros(layout.num_pages, np.int32)  # references held outside the tables
        self.reclaim: Callable[[dict[int, int]], None] | None = None
        self._free = [collections.deque(range(g * layout.pages_per_group, (g + 1) * layout.pages_per_group))
                      for g in range(layout.groups)]

    @property
    def free_pages(self) -> int:
        return sum(len(f) for f in self._free)

    @property
    def reclaimable(self) -> np.ndarray:
        """Per page: pinned and held by no row (the prefix cache may free it)."""
        return (self.pinned > 0) & (self.refs == self.pinned)

    def spare(self) -> np.ndarray:
        """Pages per group that are free or reclaimable."""
        reclaimable = np.bincount(np.flatnonzero(self.reclaimable) // self.layout.pages_per_group,
                                  minlength=self.layout.groups)
        return reclaimable + np.array([len(f) for f in self._free])

    def shortfall(self, wants: Mapping[int, int]) -> int:
        """Pages missing (free or reclaimable, summed over groups) for each row of `wants` to hold its tokens."""
        need = np.zeros(self.layout.groups, np.int64)
        for row, tokens in wants.items():
            for m in range(int(self.held[row]), math.ceil(tokens / self.layout.page_size)):
                need[self.layout.group(row, m)] += 1
        return int(np.maximum(need - self.spare(), 0).sum())

    def pages(self, row: int) -> np.ndarray:
        """The page ids row `row` holds, in position order."""
        return self.table[row, : self.held[row]]

    def reserve(self, row: int, tokens: int) -> None:
        """Make `row` hold pages for positions [0, tokens); raises PoolFull (changing nothing) if they are not free."""
        if tokens > self.max_tokens:
            raise PoolFull(f"row {row}: {tokens} tokens exceed its page table of {self.max_tokens} tokens")
        need = math.ceil(tokens / self.layout.page_size)
        new = range(int(self.held[row]), need)
        wanted = collections.Counter(self.layout.group(row, m) for m in new)
        short = self._short(wanted)
        if short and self.reclaim is not None:
            self.reclaim(short)
            short = self._short(wanted)
        if short:
            raise PoolFull(f"row {row}: {tokens} tokens need {len(new)} more pages of {self.layout.page_size}, "
                           f"the pool has {self.free_pages} free ({sum(short.values())} short on the devices "
                           f"that hold this row's pages)")
        for m in new:
            page = self._free[self.layout.group(row, m)].popleft()
            self.refs[page] = 1
            self.table[row, m] = page
        self.held[row] = max(int(self.held[row]), need)

    def truncate(self, row: int, tokens: int) -> list[tuple[int, int]]:
        """Keep only the pages of positions [0, tokens) and make the last kept page writable.

        Returns (src, dst) page copies to apply on device: a kept partial page that is shared gets a
        private copy (copy-on-write), so writing the positions from `tokens` on never touches another row.
        """
        keep = math.ceil(tokens / self.layout.page_size)
        for m in range(keep, int(self.held[row])):
            self._unref(int(self.table[row, m]))
        self.held[row] = min(int(self.held[row]), keep)
        last = keep - 1
        if tokens % self.layout.page_size == 0 or last >= self.held[row] or self.refs[self.table[row, last]] == 1:
            return []
        src = int(self.table[row, last])
        group = self.layout.group(row, last)
        free = self._free[group]
        if not free and self.reclaim is not None:
            self.reclaim({group: 1})
        if not free:
            raise PoolFull(f"row {row}: no free page to copy its shared page {src} into (pool: {self.free_pages} free)")
        dst = free.popleft()
        self.refs[dst] = 1
        self._unref(src)
        self.table[row, last] = dst
        return [(src, dst)]

    def release(self, row: int) -> None:
        """Give back every page of `row`."""
        self.truncate(row, 0)

    def fork(self, src: int, dst: int, tokens: int) -> list[tuple[int, int]]:
        """Make empty row `dst` hold `src`'s first `tokens` positions: whole pages are shared when both rows live
        on the same devices, the rest are copies. Returns the (src, dst) page copies to apply on device."""
        if self.held[dst]:
            raise ValueError(f"row {dst} already holds {self.held[dst]} pages; release it before forking into it")
        layout = self.layout
        shared = tokens // layout.page_size if layout.row_shard(src) == layout.row_shard(dst) else 0
        self.table[dst, :shared] = self.table[src, :shared]
        self.refs[self.table[src, :shared]] += 1
        self.held[dst] = shared
        try:
            self.reserve(dst, tokens)
        except PoolFull:
            self.release(dst)
            raise
        return [(int(self.table[src, m]), int(self.table[dst, m])) for m in range(shared, int(self.held[dst]))]

    def share(self, row: int, pages: Sequence[int]) -> None:
        """Make empty row `row` hold `pages` (held pages of its row shard, in position order) as its first pages."""
        if self.held[row]:
            raise ValueError(f"row {row} already holds {self.held[row]} pages; release it before sharing into it")
        if len(pages) * self.layout.page_size > self.max_tokens:
            raise PoolFull(f"row {row}: {len(pages)} shared pages exceed its page table of {self.max_tokens} tokens")
        for m, page in enumerate(pages):
            if self.refs[page] <= 0 or page // self.layout.pages_per_group != self.layout.group(row, m):
                raise ValueError(f"row {row} cannot share page {page} at position {m}: it is free or on other devices")
        self.table[row, : len(pages)] = pages
        self.refs[np.asarray(pages, np.int64)] += 1
        self.held[row] = len(pages)

    def pin(self, page: int) -> None:
        """Add a reference from outside the tables to a held page."""
        if self.refs[page] <= 0:
            raise ValueError(f"page {page} is free; only a held page can be pinned")
        self.refs[page] += 1
        self.pinned[page] += 1

    def unpin(self, page: int) -> None:
        """Drop a reference `pin` added; the page is freed when nothing else holds it."""
        if self.pinned[page] <= 0:
            raise RuntimeError(f"page {page} is not pinned")
        self.pinned[page] -= 1
        self._unref(page)

    def check(self) -> None:
        """Raise if a table lists a freed page, a count disagrees with the tables and pins, or a page is both free
        and held."""
        counts = np.bincount(np.concatenate([self.pages(r) for r in range(self.layout.n_rows)] + [np.zeros(0, int)]),
                             minlength=self.layout.num_pages) + self.pinned
        freed = np.flatnonzero((counts > 0) & (self.refs == 0))
        if freed.size:
            raise RuntimeError(f"page {freed[0]} is listed by a row's table but was freed")
        if not np.array_equal(counts, self.refs):
            bad = np.flatnonzero(counts != self.refs)[0]
            raise RuntimeError(f"page ref-counts disagree with the tables and pins at page {bad}")
        free = [p for f in self._free for p in f]
        if len(set(free)) != len(free) or (self.refs[free] != 0).any():
            raise RuntimeError("a page is on a free list twice, or both free and held")

    def _short(self, wanted: Mapping[int, int]) -> dict[int, int]:
        """{group: pages missing} for `wanted` new pages per group."""
        return {g: n - len(self._free[g]) for g, n in wanted.items() if n > len(self._free[g])}

    def _unref(self, page: int) -> None:
        """Drop one reference; the page returns to its group's free list at zero."""
        if self.refs[page] <= 0:
            raise RuntimeError(f"page {page} freed twice")
        self.refs[page] -= 1
        if self.refs[page] == 0:
            self._free[page // self.layout.pages_per_group].append(page)
