"""The page allocator: placement by device group, ref-counted sharing, copy-on-write, and its errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from k2jax.cache import PageAllocator, PoolFull, PoolLayout, make_layout


def layout(n_rows: int = 4, page_size: int = 4, pages_per_group: int = 8, row_shards: int = 1,
           seq_shards: int = 1) -> PoolLayout:
    return PoolLayout(page_size, pages_per_group, n_rows, row_shards=row_shards, seq_shards=seq_shards)


def test_pages_are_placed_by_row_shard_and_position_stripe():
    lay = layout(n_rows=4, pages_per_group=6, row_shards=2, seq_shards=2)
    pages = PageAllocator(lay, max_tokens=40)
    for row in range(4):
        pages.reserve(row, 9)  # 3 pages: stripes 0, 1, 0
    for row in range(4):
        groups = [int(p) // lay.pages_per_group for p in pages.pages(row)]
        assert groups == [lay.group(row, m) for m in range(3)] == [2 * (row // 2), 2 * (row // 2) + 1, 2 * (row // 2)]
    assert pages.table.shape[1] % lay.seq_shards == 0
    pages.check()


def test_pool_full_names_the_row_and_changes_nothing():
    pages = PageAllocator(layout(n_rows=2, pages_per_group=3), max_tokens=64)
    pages.reserve(0, 8)
    before = (pages.table.copy(), pages.held.copy(), pages.refs.copy(), pages.free_pages)
    with pytest.raises(PoolFull, match=r"row 1: 12 tokens need 3 more pages of 4, the pool has 1 free"):
        pages.reserve(1, 12)
    assert all(np.array_equal(a, b) for a, b in zip(before[:3], (pages.table, pages.held, pages.refs)))
    assert pages.free_pages == before[3]
    with pytest.raises(PoolFull, match="exceed its page table of 64 tokens"):
        pages.reserve(1, 65)


def test_fork_shares_whole_pages_and_copies_the_partial_one():
    pages = PageAllocator(layout(), max_tokens=32)
    pages.reserve(0, 10)  # pages for [0,4) [4,8) [8,10)
    copies = pages.fork(0, 1, 10)
    assert list(pages.pages(1)[:2]) == list(pages.pages(0)[:2])
    assert copies == [(int(pages.pages(0)[2]), int(pages.pages(1)[2]))]
    assert pages.refs[pages.pages(0)[:2]].tolist() == [2, 2]
    pages.release(0)
    assert pages.refs[pages.pages(1)[:2]].tolist() == [1, 1]
    pages.check()


def test_fork_across_row_shards_copies_everything():
    lay = layout(n_rows=2, row_shards=2)
    pages = PageAllocator(lay, max_tokens=16)
    pages.reserve(0, 8)
    copies = pages.fork(0, 1, 8)
    assert len(copies) == 2 and not set(pages.pages(0)) & set(pages.pages(1))
    assert all(int(p) // lay.pages_per_group == 1 for p in pages.pages(1))


def test_truncate_into_a_shared_page_copies_it_first():
    pages = PageAllocator(layout(), max_tokens=32)
    pages.reserve(0, 8)
    pages.fork(0, 1, 8)  # both pages shared
    shared = int(pages.pages(1)[1])
    copies = pages.truncate(1, 6)  # row 1 will rewrite positions 6.. of its second page
    assert copies == [(shared, int(pages.pages(1)[1]))] and int(pages.pages(1)[1]) != shared
    assert pages.refs[shared] == 1 and list(pages.pages(0))[1] == shared
    assert pages.truncate(0, 8) == []  # whole pages: nothing to copy
    pages.check()


def test_double_free_and_freed_page_reads_are_caught():
    pages = PageAllocator(layout(), max_tokens=16)
    pages.reserve(0, 8)
    page = int(pages.pages(0)[0])
    pages.release(0)
    with pytest.raises(RuntimeError, match=f"page {page} freed twice"):
        pages._unref(page)
    pages.held[0] = 1  # a table that still lists the freed page
    with pytest.raises(RuntimeError, match=f"page {page} is listed by a row's table but was freed"):
        pages.check()


def test_layout_without_a_mesh_is_one_group():
    lay = make_layout(None, n_rows=3, tokens_per_row=100, page_size=32)
    assert (lay.groups, lay.num_pages, lay.pages_for(100)) == (1, 12, 4)
    with pytest.raises(ValueError, match="power of two"):
        make_layout(None, 1, 10, 24)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["reserve", "truncate", "fork", "release"]), st.integers(0, 3),
                          st.integers(0, 3), st.integers(0, 30)), max_size=40))
def test_random_operations_keep_the_allocator_consistent(ops):
    pages = PageAllocator(layout(n_rows=4, pages_per_group=16, row_shards=2, seq_shards=2), max_tokens=30)
    for op, a, b, n in ops:
        try:
            if op == "reserve":
                pages.reserve(a, n)
            elif op == "truncate":
                pages.truncate(a, n)
            elif op == "fork" and a != b and not pages.held[b]:
                pages.fork(a, b, min(n, int(pages.held[a]) * 4))
            elif op == "release":
                pages.release(a)
        except PoolFull:
            pass
        pages.check()
    for row in range(4):
        pages.release(row)
    assert pages.free_pages == 64 and not pages.refs.any()
