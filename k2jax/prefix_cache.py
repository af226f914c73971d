"""The prefix cache: a radix tree of page-aligned token blocks over the page pool, shared across rows and requests.

Node = one full page: the N tokens it holds (its key under its parent) and its page id. The path from a root to
a node spells the tokens of positions [0, (depth + 1) * N), so a row whose tokens start with that path may map the
path's pages into its table instead of computing them (no recompute, no copy). The tree pins every page it
lists; a page no row holds is reclaimable, and the allocator's reclaim hook evicts least recently used leaves.

A row holding a node also holds all its ancestors (rows hold pages from position 0; insertion stops where another
row cached the same tokens in other pages), so an unheld node's whole subtree is unheld: every reclaimable page
can be evicted leaves first. There is one root per row shard (a row's pages live on its shard's devices).
Everything is a deterministic function of the calls made (the LRU clock counts calls), so every process of a
multi-host server that replays the same calls holds the same tree.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Sequence

from k2jax.cache import PageAllocator


@dataclasses.dataclass(eq=False)
class Node:
    """One cached page: its tokens, page id, parent, children by their tokens, and when it was last used."""

    block: tuple[int, ...]
    page: int
    parent: Node | None
    children: dict[tuple[int, ...], Node] = dataclasses.field(default_factory=dict)
    used: int = 0


class PrefixCache:
    """Radix tree of full pages over `pages`; installs itself as the allocator's reclaim hook."""

    def __init__(self, pages: PageAllocator):
        self.pages = pages
        self.roots = [Node((), -1, None) for _ in range(pages.layout.row_shards)]
        self.by_page: dict[int, Node] = {}
        self.clock = 0
        self.evicted = 0
        pages.reclaim = self.evict

    @property
    def page_size(self) -> int:
        return self.pages.layout.page_size

    def match(self, row: int, tokens: Sequence[int]) -> list[Node]:
        """The cached nodes spelling the longest page-aligned prefix of `tokens`, root side first (changes nothing)."""
        node, path, N = self.roots[self.pages.layout.row_shard(row)], [], self.page_size
        for m in range(len(tokens) // N):
            node = node.children.get(tuple(tokens[m * N:(m + 1) * N]))
            if node is None:
                break
            path.append(node)
        return path

    def path(self, page: int) -> list[Node]:
        """The nodes from the root down to the node of `page`."""
        node, path = self.by_page[page], []
        while node.parent is not None:
            path.append(node)
            node = node.parent
        return path[::-1]

    def touch(self, nodes: Sequence[Node]) -> None:
        """Mark nodes as used now (they are evicted last)."""
        self.clock += 1
        for node in nodes:
            node.used = self.clock

    def insert(self, row: int, tokens: Sequence[int], first: int = 0) -> None:
        """Cache row `row`'s full pages from page `first` on, its positions holding `tokens`; pages before `first`
        must be cached already (else nothing is added)."""
        N, table = self.page_size, self.pages.table[row]
        node = self.roots[self.pages.layout.row_shard(row)] if first == 0 else self.by_page.get(int(table[first - 1]))
        if node is None:
            return
        self.clock += 1
        for m in range(first, min(len(tokens) // N, int(self.pages.held[row]))):
            block, page = tuple(tokens[m * N:(m + 1) * N]), int(table[m])
            child = node.children.get(block)
            if child is None:
                if page in self.by_page:  # the row's page is cached under other tokens: its table is not this path
                    return
                child = node.children[block] = Node(block, page, node)
                self.by_page[page] = child
                self.pages.pin(page)
            elif child.page != page:  # another row cached these tokens in other pages first
                return
            child.used = self.clock
            node = child

    def evict(self, short: dict[int, int]) -> None:
        """Free least recently used leaves that no row holds until each group of `short` has its pages (or none
        is left)."""
        short = {g: n for g, n in short.items() if n > 0}
        heap = [(n.used, n.page) for n in self.by_page.values() if not n.children and self._unheld(n)]
        heapq.heapify(heap)
        while short and heap:
            node = self.by_page.pop(heapq.heappop(heap)[1])
            parent = node.parent
            del parent.children[node.block]
            self.pages.unpin(node.page)
            self.evicted += 1
            group = node.page // self.pages.layout.pages_per_group
            if group in short:
                short[group] -= 1
                if not short[group]:
                    del short[group]
            if parent.parent is not None and not parent.children and self._unheld(parent):
                heapq.heappush(heap, (parent.used, parent.page))

    def clear(self) -> None:
        """Drop every cached page that no row holds."""
        self.evict({g: self.pages.layout.num_pages for g in range(self.pages.layout.groups)})

    def _unheld(self, node: Node) -> bool:
        """Whether only the tree holds the node's page."""
        return self.pages.refs[node.page] == self.pages.pinned[node.page]
