import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.engine.page_pool import PagePool


def test_fresh_pool_hands_out_ids_in_order():
    pool = PagePool(4)
    assert (pool.num_pages, pool.num_free, pool.num_allocated) == (4, 4, 0)
    assert pool.allocate(3) == [0, 1, 2]
    assert (pool.num_free, pool.num_allocated) == (1, 3)


def test_allocate_is_all_or_nothing():
    pool = PagePool(4)
    pool.allocate(3)
    assert pool.allocate(2) is None
    assert pool.num_free == 1  # the failed call took nothing
    assert pool.allocate(1) == [3]
    assert pool.allocate(1) is None
    assert pool.allocate(0) == []


def test_free_returns_pages_for_reuse():
    pool = PagePool(3)
    pages = pool.allocate(3)
    pool.free(pages[:2])
    assert (pool.num_free, pool.num_allocated) == (2, 1)
    assert sorted(pool.allocate(2)) == sorted(pages[:2])
    assert pool.is_allocated(pages[2])


def test_double_free_asserts():
    pool = PagePool(2)
    pages = pool.allocate(1)
    pool.free(pages)
    with pytest.raises(AssertionError):
        pool.free(pages)


def test_free_of_never_allocated_page_asserts():
    pool = PagePool(2)
    with pytest.raises(AssertionError):
        pool.free([1])
    with pytest.raises(AssertionError):
        pool.free([7])


def test_empty_pool():
    pool = PagePool(0)
    assert pool.allocate(1) is None
    assert pool.allocate(0) == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 5)), max_size=60))
def test_random_allocate_free_keeps_exact_accounting(ops):
    pool = PagePool(10)
    held: list[int] = []
    for is_alloc, n in ops:
        if is_alloc:
            pages = pool.allocate(n)
            if n > 10 - len(held):
                assert pages is None
            else:
                assert pages is not None and len(pages) == n
                assert not set(pages) & set(held)
                held += pages
        else:
            pool.free(held[:n])
            held = held[n:]
        assert pool.num_allocated == len(held)
        assert pool.num_free + pool.num_allocated == pool.num_pages
        assert all(0 <= p < 10 and pool.is_allocated(p) for p in held)
    pool.free(held)
    assert pool.num_free == 10
