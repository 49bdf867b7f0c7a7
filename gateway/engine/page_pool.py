"""A free list of KV page ids with exact accounting.

Pages are plain ints 0..num_pages-1; whoever holds an id owns the KV slots behind it.
The pool only counts: it never touches the KV memory itself.
"""

from __future__ import annotations


class PagePool:
    """Hands out page ids all-or-nothing and refuses to free a page twice."""

    def __init__(self, num_pages: int):
        assert num_pages >= 0, num_pages
        self._num_pages = num_pages
        # Popped from the end, so fresh pools hand out 0, 1, 2, ... (readable in tests and logs).
        self._free: list[int] = list(range(num_pages - 1, -1, -1))
        self._allocated: set[int] = set()

    @property
    def num_pages(self) -> int:
        return self._num_pages

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_allocated(self) -> int:
        return len(self._allocated)

    def is_allocated(self, page: int) -> bool:
        return page in self._allocated

    def allocate(self, n: int) -> list[int] | None:
        """n page ids, or None (and nothing taken) when fewer than n are free."""
        assert n >= 0, n
        if n > len(self._free):
            return None
        pages = [self._free.pop() for _ in range(n)]
        self._allocated.update(pages)
        self._check()
        return pages

    def free(self, pages: list[int]) -> None:
        """Give pages back; each must be allocated right now (a double free is a caller bug)."""
        for page in pages:
            assert page in self._allocated, f"page {page} freed but not allocated"
            self._allocated.remove(page)
            self._free.append(page)
        self._check()

    def _check(self) -> None:
        assert len(self._free) + len(self._allocated) == self._num_pages, (
            len(self._free), len(self._allocated), self._num_pages)

    def __repr__(self) -> str:
        return f"PagePool(num_pages={self._num_pages}, free={self.num_free})"
