"""The exact top-k of a selection row (keep_top_k: a radix search on the scores' bits, or a bitonic
network's k-th), and the measured rule for which to use (prefers_top_k, sort_width): shared by
the page selection (selection.py), the fine scorer's run selection (shortlist_scores.py) and the
one-launch selection and attention (select_attend.py)."""
from __future__ import annotations

import triton
import triton.language as tl

# The bitonic top-k (keep_top_k's SORT) against the radix search, H200 (bench/centroid_stages.py,
# bench/sparse_stages.py --tune): k 32 of 1024 entries (centroid groups) 6.1 us against 8.8 at
# b16; k 128 of 512 (Quest's fine stage) 4.6 against 7.1; k 32 of 2048 (centroid groups at 128k,
# inside select_attend) 16.3 against 17.2; k 32 of 4096 24.3 against 21.8; k 512 of 4096 (Quest's
# coarse stage) 35.8 against 16.6 (the network grows with k and the row).
TOPK_MAX_ENTRIES, TOPK_MAX_KEEP = 1024, 128
TOPK_WIDE_ENTRIES, TOPK_WIDE_KEEP = 2048, 32


def prefers_top_k(entries: int, keep: int) -> bool:
    """Whether a row of `entries` keeping `keep` selects faster by the bitonic top-k (as measured)."""
    return ((entries <= TOPK_MAX_ENTRIES and keep <= TOPK_MAX_KEEP)
            or (entries <= TOPK_WIDE_ENTRIES and keep <= TOPK_WIDE_KEEP))


def sort_width(sort: str | None, budget: int, block: int) -> int:
    """keep_top_k's SORT for `sort`: None, the radix search (0); "topk", tl.topk of the budget's
    power of two (the radix search where this Triton has no tl.topk: the whole-row sort is slower
    than either); "sort", the whole row sorted."""
    assert sort in (None, "topk", "sort"), sort
    if sort is None or (sort == "topk" and not hasattr(tl, "topk")):
        return 0
    return min(block, triton.next_power_of_2(budget)) if sort == "topk" else block


@triton.jit
def keep_top_k(score, k, EARLY_EXIT: tl.constexpr, SORT: tl.constexpr = 0):
    """Exact top-k of a row by a 32-step radix search for the k-th largest score -> the kept mask
    (ties go to the lower index). SORT > 0 (a power of two, at least k): the k-th largest read
    from the row's keys sorted by a bitonic network instead (tl.topk of SORT, or tl.sort of the
    whole row when SORT is its length)."""
    bits = tl.where(score == 0.0, 0.0, score).to(tl.int32, bitcast=True)  # -0.0 ties with +0.0
    signed = bits ^ ((bits >> 31) & 0x7FFFFFFF)             # float order as signed int32
    key = signed.to(tl.int64) + 2147483648                  # ... and in [0, 2^32)
    thresh = tl.zeros([], tl.int64)
    if SORT > 0:
        if SORT == signed.shape[0]:
            best = tl.sort(signed, descending=True)
        else:
            best = tl.topk(signed, SORT)
        kth = tl.sum(tl.where(tl.arange(0, SORT) == k - 1, best, 0), 0)
        # k = 0 (a padding row): a threshold above every key keeps nothing
        thresh = tl.where(k > 0, kth.to(tl.int64) + 2147483648, tl.full([], 1 << 32, tl.int64))
    elif EARLY_EXIT:
        # Stop as soon as some candidate has exactly k keys >= it: those are the top k (no ties to
        # split), and the take/tie logic below keeps exactly them. Else the full 32 steps.
        bit = tl.full([], 31, tl.int64)
        while bit >= 0:
            cand = thresh + (tl.full([], 1, tl.int64) << bit)
            c = tl.sum((key >= cand).to(tl.int32), 0)
            thresh = tl.where(c >= k, cand, thresh)
            bit = tl.where(c == k, -1, bit - 1)
    else:
        for bit in tl.static_range(31, -1, -1):
            cand = thresh + (1 << bit)
            thresh = tl.where(tl.sum((key >= cand).to(tl.int32), 0) >= k, cand, thresh)
    above = key > thresh
    tie = key == thresh
    return above | (tie & (tl.cumsum(tie.to(tl.int32), 0) <= k - tl.sum(above.to(tl.int32), 0)))
