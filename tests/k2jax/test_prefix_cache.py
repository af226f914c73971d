"""The prefix cache on the page allocator, simulated on the host: every cached page holds the tokens its tree path
spells, no shared page is ever written, shortfall() predicts reserve(), eviction is LRU and leaves first."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from k2jax.cache import PageAllocator, PoolFull, PoolLayout
from k2jax.prefix_cache import PrefixCache

N = 2  # tokens per page


class Sim:
    """Rows of token sequences over a pool with a prefix cache; `content` plays the device pages."""

    def __init__(self, n_rows: int = 4, pages_per_group: int = 8, row_shards: int = 1, seq_shards: int = 1,
                 max_tokens: int = 16):
        layout = PoolLayout(N, pages_per_group, n_rows, row_shards=row_shards, seq_shards=seq_shards)
        self.pages = PageAllocator(layout, max_tokens)
        self.tree = PrefixCache(self.pages)
        self.rows: list[list[int]] = [[] for _ in range(n_rows)]
        self.content: dict[int, list[int | None]] = {}

    def attach(self, row: int, prompt: list[int]) -> int:
        nodes = self.tree.match(row, prompt[:-1])
        self.pages.share(row, [n.page for n in nodes])
        self.tree.touch(nodes)
        self.rows[row] = [t for n in nodes for t in n.block]
        return len(self.rows[row])

    def write(self, row: int, tokens: list[int], start: int) -> None:
        for src, dst in self.pages.truncate(row, start):
            self.content[dst] = list(self.content[src])
        self.rows[row] = self.rows[row][:start]
        self.pages.reserve(row, start + len(tokens))
        for i, token in enumerate(tokens, start):
            page = int(self.pages.table[row, i // N])
            assert self.pages.refs[page] == 1, "a page held by another row or the cache is written"
            self.content.setdefault(page, [None] * N)[i % N] = token
        self.rows[row] += tokens
        self.tree.insert(row, self.rows[row], start // N)

    def release(self, row: int) -> None:
        self.tree.insert(row, self.rows[row])
        self.pages.release(row)
        self.rows[row] = []

    def check(self) -> None:
        self.pages.check()
        for page, node in self.tree.by_page.items():
            assert self.content[page] == list(node.block)
            assert self.pages.pinned[page] == 1
            assert node.parent.children[node.block] is node
        assert set(np.flatnonzero(self.pages.pinned)) == set(self.tree.by_page)
        for row, tokens in enumerate(self.rows):
            for i, token in enumerate(tokens):
                assert self.content[int(self.pages.table[row, i // N])][i % N] == token


def test_a_second_row_maps_the_cached_prefix_and_writes_only_its_own_pages():
    sim = Sim()
    sim.write(0, [5, 6, 7, 8, 9], 0)  # pages [5 6] [7 8] [9 .]: the first two are cached at once
    assert len(sim.tree.by_page) == 2
    assert sim.attach(1, [5, 6, 7, 8, 1, 2]) == 4
    assert list(sim.pages.pages(1)) == list(sim.pages.pages(0)[:2])
    sim.write(1, [1, 2], 4)
    assert sim.attach(2, [5, 6, 7, 8]) == 2  # never the last token: its logits are needed
    sim.check()
    for row in range(3):
        sim.release(row)
    sim.check()
    assert sim.pages.free_pages + int(sim.pages.reclaimable.sum()) == sim.pages.layout.num_pages
    sim.tree.clear()
    assert sim.pages.free_pages == sim.pages.layout.num_pages and not sim.pages.refs.any()


def test_eviction_takes_least_recently_used_leaves_that_no_row_holds():
    sim = Sim(n_rows=2, pages_per_group=6, max_tokens=12)
    for row, tokens in enumerate(([1, 1, 2, 2], [3, 3, 4, 4])):
        sim.write(row, tokens, 0)
    sim.release(0)
    sim.release(1)
    sim.attach(0, [1, 1, 2, 2, 9])  # [1 1] [2 2] used last; row 0 holds both
    sim.release(0)
    sim.write(1, [7] * 8, 0)  # 4 pages, 2 free: the two of [3 3 4 4] go, leaf first
    assert sim.tree.match(0, [3, 3, 4, 4]) == [] and len(sim.tree.match(0, [1, 1, 2, 2])) == 2
    sim.check()
    held = sim.attach(0, [1, 1, 2, 2, 9])
    assert held == 4 and sim.pages.shortfall({1: 12}) == 2  # row 0 holds its pages: they cannot be evicted
    with pytest.raises(PoolFull):
        sim.write(1, [7] * 12, 0)
    sim.check()


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["attach", "write", "release"]), st.integers(0, 3), st.integers(0, 14),
                          st.lists(st.integers(0, 1), min_size=1, max_size=9)), max_size=40),
       st.sampled_from([(1, 1), (2, 2), (1, 2)]))
def test_random_operations_keep_cache_and_pool_consistent(ops, shards):
    sim = Sim(n_rows=4, pages_per_group=6, row_shards=shards[0], seq_shards=shards[1], max_tokens=16)
    for op, row, start, tokens in ops:
        if op == "attach" and not sim.pages.held[row]:
            sim.attach(row, tokens)
        elif op == "write":
            start = min(start, len(sim.rows[row]), 16 - len(tokens))
            appending = start == len(sim.rows[row])
            short = sim.pages.shortfall({row: start + len(tokens)})
            try:
                sim.write(row, tokens, start)
                wrote = True
            except PoolFull:
                wrote = False
            if appending:  # nothing is truncated first: shortfall() is exact
                assert wrote == (short == 0)
        elif op == "release":
            sim.release(row)
        sim.check()
    for row in range(4):
        sim.release(row)
    sim.check()
    sim.tree.clear()
    assert sim.pages.free_pages == sim.pages.layout.num_pages and not sim.pages.refs.any() and not sim.tree.by_page
