"""Page selection for Quest sparse decode: per (sequence, KV head) row, the per-q-head bounds become
page scores (a log-softmax over the row's pages at the attention scale, max over the GQA group;
forced sink and recent pages +inf, padding -inf), and the best `budget` pages are kept by an exact
top-k (a radix search on the float bits; ties to the lower index), compacted in ascending page
order with their physical ids: kernels/reference.py's select_pages, batched.

combine_heads (scores) and select_pages (selection) are the two steps; combine_select does both in
one program per row (one launch per stage of sparse.py's sparse_decode): with the whole row's
per-head bounds in registers, or for wider rows streamed in chunks through a scores row. A
row is either a sequence's own pages or a shortlist (`listed`: the logical page of each entry, with
per-head physical ids). Everything is static-shaped and sync-free (CUDA-graph safe).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton.top_k import keep_top_k, sort_width


@triton.jit
def _force_pages(score, logical, n_pages, budget_pages, sink_pages, recent_pages):
    """Sink and recent pages, and every page of a sequence within the budget, at +inf."""
    forced = (logical < sink_pages) | (logical >= n_pages - recent_pages) | (n_pages <= budget_pages)
    return tl.where(forced, float("inf"), score)


@triton.jit
def row_budget(Budgets, kvh, budget, HEADS: tl.constexpr):
    """A row's budget: its KV head's own (Budgets[kvh], HEADS > 0: a budget per KV head) or the layer's."""
    if HEADS > 0:
        return tl.load(Budgets + kvh)
    return budget


@triton.jit
def group_scores(Bounds, b, kvh, logical, valid, n_pages, s_bb, s_bh, scale, budget_pages, sink_pages,
                  recent_pages, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr,
                  FORCE: tl.constexpr, width=None):
    """Scores of one (sequence, KV head) row of entries: log-softmax of each q head's bounds over the
    valid entries (at the attention scale), max over the group; forced pages +inf, invalid -inf.
    width (the row's allocated entries): the bounds load within it, not within the valid entries,
    so it need not wait for the sequence's length (those past it are read and ignored)."""
    offs_g = tl.arange(0, BLOCK_G)
    offs_p = tl.arange(0, BLOCK_P)
    mask_g = offs_g < GROUP
    m2 = mask_g[:, None] & valid[None, :]
    if width is None:
        readable = m2
    else:
        readable = mask_g[:, None] & (offs_p < width)[None, :]
    bound = tl.load(Bounds + b * s_bb + (kvh * GROUP + offs_g[:, None]) * s_bh + offs_p[None, :], mask=readable,
                    other=0.0)
    logits = tl.where(m2, bound * scale, float("-inf"))
    top = tl.where(mask_g, tl.max(logits, 1), 0.0)          # every sequence has a page: finite
    lse = top + tl.log(tl.sum(tl.exp(logits - top[:, None]), 1))
    score = tl.max(tl.where(m2, logits - lse[:, None], float("-inf")), 0)
    if FORCE:
        score = _force_pages(score, logical, n_pages, budget_pages, sink_pages, recent_pages)
    return tl.where(valid, score, float("-inf"))


@triton.jit
def _chunk_entries(Listed, b, kvh, s_lb, s_lh, offs, n_pages, width, LISTED: tl.constexpr):
    """(logical page, valid) of the entries offs of a row of width entries: entry i is page i of the
    sequence, or with LISTED the logical page Listed[b, kvh, i] of a shortlist (-1 for padding)."""
    if LISTED:
        logical = tl.load(Listed + b * s_lb + kvh * s_lh + offs, mask=offs < width, other=-1)
        valid = (logical >= 0) & (logical < n_pages)
    else:
        logical = offs
        valid = offs < n_pages
    return logical, valid


@triton.jit
def _row_entries(Listed, b, kvh, s_lb, s_lh, n_pages, max_pages, BLOCK_P: tl.constexpr, LISTED: tl.constexpr):
    """(logical page, valid) of each entry of a whole row (_chunk_entries of its BLOCK_P entries)."""
    return _chunk_entries(Listed, b, kvh, s_lb, s_lh, tl.arange(0, BLOCK_P), n_pages, max_pages, LISTED)


@triton.jit
def _combine_heads(Bounds, SeqLens, Scores, Listed, s_bb, s_bh, s_sb, s_sh, s_lb, s_lh, max_pages, scale,
                   budget_pages, sink_pages, recent_pages,
                   GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr,
                   PAGE_SIZE: tl.constexpr, FORCE: tl.constexpr, LISTED: tl.constexpr):
    """One program per (sequence, KV head): group_scores of its row, stored."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    offs_p = tl.arange(0, BLOCK_P)
    n_pages = tl.cdiv(tl.load(SeqLens + b), PAGE_SIZE)
    logical, valid = _row_entries(Listed, b, kvh, s_lb, s_lh, n_pages, max_pages, BLOCK_P, LISTED)
    score = group_scores(Bounds, b, kvh, logical, valid, n_pages, s_bb, s_bh, scale, budget_pages, sink_pages,
                          recent_pages, GROUP, BLOCK_G, BLOCK_P, FORCE)
    tl.store(Scores + b * s_sb + kvh * s_sh + offs_p, score, mask=offs_p < max_pages)


def combine_heads(bounds: torch.Tensor, seq_lens: torch.Tensor, page_size: int, kv_heads: int,
                  force: tuple[int, int, int] | None, scale: float, listed: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """Per-q-head bounds [batch, q_heads, P] -> scores [batch, kv_heads, P] (see _combine_heads);
    listed [batch, kv_heads, P] int32: the logical page of each entry (a shortlist, -1 padding)."""
    batch, q_heads, max_pages = bounds.shape
    group = q_heads // kv_heads
    scores = torch.empty(batch, kv_heads, max_pages, device=bounds.device, dtype=torch.float32)
    budget, sink, recent = force if force is not None else (0, 0, 0)
    block_all = max(16, triton.next_power_of_2(max_pages))
    lst = listed if listed is not None else scores
    _combine_heads[(batch, kv_heads)](
        bounds, seq_lens, scores, lst, bounds.stride(0), bounds.stride(1), scores.stride(0), scores.stride(1),
        lst.stride(0), lst.stride(1), max_pages, scale, budget, sink, recent, GROUP=group,
        BLOCK_G=triton.next_power_of_2(group), BLOCK_P=block_all, PAGE_SIZE=page_size,
        FORCE=force is not None, LISTED=listed is not None, num_warps=4 if block_all * group <= 4096 else 8)
    return scores


@triton.jit
def row_group_pages(PT, b, kvh, s_pb, s_ph, width, BLOCK_P: tl.constexpr, EXPAND: tl.constexpr):
    """The pages of each of a row's group entries [BLOCK_P, EXPAND] (a sequence's own table, or its
    KV head's compact one where s_ph is not 0; entry i = pages i * EXPAND ...), loaded before the
    row's length is known (one dependent memory trip fewer than loading the kept ones after the top
    k); entries past the sequence are never stored."""
    offs = tl.arange(0, BLOCK_P)
    return tl.load(PT + b.to(tl.int64) * s_pb + kvh * s_ph + offs[:, None] * EXPAND + tl.arange(0, EXPAND)[None, :],
                   mask=(offs < width)[:, None], other=0)


@triton.jit
def store_selection(take, logical, b, kvh, seq_len, n_pages, k, PT, Logical, Physical, VLens,
                     s_pb, s_ph, s_lb, s_lh, s_yb, s_yh, budget_pages, k_sel,
                     BLOCK_P: tl.constexpr, PAGE_SIZE: tl.constexpr, EXPAND: tl.constexpr = 1, groups=None,
                     HEAD_VLENS: tl.constexpr = 0):
    """The kept entries, compacted in row order (ascending pages), as logical and physical pages;
    padding past k; the virtual length of a sequence that keeps budget_pages of its pages.
    EXPAND > 1: an entry is a run of EXPAND pages (a group; PAGE_SIZE is the group's tokens), and
    Physical gets the physical ids of all of its pages, EXPAND per entry: `groups` [BLOCK_P,
    EXPAND], entry i's pages from the sequence's page table (row_group_pages, loaded at the program's
    start), so the attention reads them as a list of pages. HEAD_VLENS > 0 (the KV heads, with a
    budget each): VLens [batch, HEAD_VLENS], each row's own virtual length."""
    offs = tl.arange(0, BLOCK_P)
    pos = tl.cumsum(take.to(tl.int32), 0) - 1
    tl.store(Logical + b * s_lb + kvh * s_lh + pos, logical, mask=take)
    pad = (offs >= k) & (offs < k_sel)
    tl.store(Logical + b * s_lb + kvh * s_lh + offs, -1, mask=pad)
    if EXPAND == 1:
        page = tl.load(PT + b.to(tl.int64) * s_pb + kvh * s_ph + offs, mask=take, other=0)
        tl.store(Physical + b * s_yb + kvh * s_yh + pos, page, mask=take)
        tl.store(Physical + b * s_yb + kvh * s_yh + offs, 0, mask=pad)
    else:
        offs_r = tl.arange(0, EXPAND)
        row = Physical + b * s_yb + kvh * s_yh
        tl.store(row + pos[:, None] * EXPAND + offs_r[None, :], groups, mask=take[:, None])
        tl.store(row + offs[:, None] * EXPAND + offs_r[None, :], 0, mask=pad[:, None])
    vlen = seq_len - tl.maximum(n_pages - budget_pages, 0) * PAGE_SIZE
    if HEAD_VLENS > 0:
        tl.store(VLens + b * HEAD_VLENS + kvh, vlen)
    elif kvh == 0:
        tl.store(VLens + b, vlen)


@triton.jit
def _select_pages(Scores, PT, SeqLens, Logical, Physical, VLens, Listed, s_sb, s_sh, s_pb, s_ph, s_lb, s_lh,
                  s_yb, s_yh, s_ib, s_ih, max_pages, budget_pages, k_sel,
                  BLOCK_P: tl.constexpr, PAGE_SIZE: tl.constexpr, EARLY_EXIT: tl.constexpr,
                  LISTED: tl.constexpr):
    """One program per (sequence, KV head): the best budget_pages entries of its score row
    (keep_top_k), stored by store_selection. LISTED: the row is a shortlist, entry i being
    logical page Listed[b, kvh, i] (ascending) with its physical id at PT[b, kvh, i]; else entry i
    is page i of the sequence's table."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    offs = tl.arange(0, BLOCK_P)
    score = tl.load(Scores + b * s_sb + kvh * s_sh + offs, mask=offs < max_pages, other=float("-inf"))
    seq_len = tl.load(SeqLens + b)
    n_pages = tl.cdiv(seq_len, PAGE_SIZE)
    k = tl.minimum(n_pages, budget_pages)
    take = keep_top_k(score, k, EARLY_EXIT)
    if LISTED:
        logical = tl.load(Listed + b * s_ib + kvh * s_ih + offs, mask=take, other=0)
    else:
        logical = offs
    store_selection(take, logical, b, kvh, seq_len, n_pages, k, PT, Logical, Physical, VLens,
                     s_pb, s_ph, s_lb, s_lh, s_yb, s_yh, budget_pages, k_sel, BLOCK_P, PAGE_SIZE)


@triton.jit
def _combine_select(Bounds, PT, SeqLens, Logical, Physical, VLens, Listed, Budgets, s_bb, s_bh, s_pb, s_ph, s_lb,
                    s_lh, s_yb, s_yh, s_ib, s_ih, max_pages, scale, force_budget, sink_pages, recent_pages,
                    budget_pages, k_sel, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr,
                    PAGE_SIZE: tl.constexpr, EARLY_EXIT: tl.constexpr, LISTED: tl.constexpr,
                    EXPAND: tl.constexpr, SORT: tl.constexpr, HEADS: tl.constexpr):
    """_combine_heads and _select_pages in one program per (sequence, KV head): the scores never
    leave registers (two launches and a scores round trip fewer per sparse layer). HEADS > 0: a
    budget per KV head (Budgets [HEADS], both the forced rule's and the kept count)."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    force_budget = row_budget(Budgets, kvh, force_budget, HEADS)
    budget_pages = row_budget(Budgets, kvh, budget_pages, HEADS)
    groups = None
    if EXPAND > 1:
        groups = row_group_pages(PT, b, kvh, s_pb, s_ph, max_pages, BLOCK_P, EXPAND)
    seq_len = tl.load(SeqLens + b)
    n_pages = tl.cdiv(seq_len, PAGE_SIZE)
    logical, valid = _row_entries(Listed, b, kvh, s_ib, s_ih, n_pages, max_pages, BLOCK_P, LISTED)
    score = group_scores(Bounds, b, kvh, logical, valid, n_pages, s_bb, s_bh, scale, force_budget, sink_pages,
                          recent_pages, GROUP, BLOCK_G, BLOCK_P, True, max_pages)
    k = tl.minimum(n_pages, budget_pages)
    take = keep_top_k(score, k, EARLY_EXIT, SORT)
    store_selection(take, logical, b, kvh, seq_len, n_pages, k, PT, Logical, Physical, VLens,
                     s_pb, s_ph, s_lb, s_lh, s_yb, s_yh, budget_pages, k_sel, BLOCK_P, PAGE_SIZE, EXPAND, groups,
                     HEADS)


@triton.jit
def _combine_select_streamed(Bounds, PT, SeqLens, Logical, Physical, VLens, Listed, Budgets, Scores, s_bb, s_bh,
                             s_pb, s_ph, s_lb, s_lh, s_yb, s_yh, s_ib, s_ih, s_sb, s_sh, max_pages, scale,
                             force_budget, sink_pages, recent_pages, budget_pages, k_sel, GROUP: tl.constexpr,
                             BLOCK_G: tl.constexpr, CHUNK: tl.constexpr, BLOCK_P: tl.constexpr,
                             PAGE_SIZE: tl.constexpr, LISTED: tl.constexpr, EXPAND: tl.constexpr,
                             HEADS: tl.constexpr):
    """_combine_select for wide rows: the group's bounds [GROUP, BLOCK_P] would not fit one program's
    registers, so one program per (sequence, KV head) streams them in chunks of CHUNK entries.
    Pass 1: each q head's log-sum-exp over the row (online max and sum). Pass 2: the scores, as
    group_scores gives them, into a row of Scores. Then the whole row of scores (one value per
    entry) is loaded at once for the top k and compacted (keep_top_k, store_selection). A row of
    a sequence's own pages stops at its last page: the entries past it are -inf, never kept.
    HEADS: as _combine_select's."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    force_budget = row_budget(Budgets, kvh, force_budget, HEADS)
    budget_pages = row_budget(Budgets, kvh, budget_pages, HEADS)
    groups = None
    if EXPAND > 1:
        groups = row_group_pages(PT, b, kvh, s_pb, s_ph, max_pages, BLOCK_P, EXPAND)
    seq_len = tl.load(SeqLens + b)
    n_pages = tl.cdiv(seq_len, PAGE_SIZE)
    end = max_pages if LISTED else tl.minimum(n_pages, max_pages)
    offs_c = tl.arange(0, CHUNK)
    mask_g = tl.arange(0, BLOCK_G) < GROUP
    heads = Bounds + b * s_bb + (kvh * GROUP + tl.arange(0, BLOCK_G)[:, None]) * s_bh
    top = tl.full([BLOCK_G], -3.0e38, tl.float32)       # finite: exp(top - new_top) stays a number
    total = tl.zeros([BLOCK_G], tl.float32)
    for c0 in range(0, end, CHUNK):
        _, valid = _chunk_entries(Listed, b, kvh, s_ib, s_ih, c0 + offs_c, n_pages, max_pages, LISTED)
        m2 = mask_g[:, None] & valid[None, :]
        logits = tl.where(m2, tl.load(heads + c0 + offs_c[None, :], mask=m2, other=0.0) * scale, float("-inf"))
        new_top = tl.maximum(top, tl.max(logits, 1))
        total = total * tl.exp(top - new_top) + tl.sum(tl.exp(logits - new_top[:, None]), 1)
        top = new_top
    lse = top + tl.log(total)
    row = Scores + b * s_sb + kvh * s_sh
    for c0 in range(0, end, CHUNK):
        logical, valid = _chunk_entries(Listed, b, kvh, s_ib, s_ih, c0 + offs_c, n_pages, max_pages, LISTED)
        m2 = mask_g[:, None] & valid[None, :]
        logits = tl.load(heads + c0 + offs_c[None, :], mask=m2, other=0.0) * scale
        score = tl.max(tl.where(m2, logits - lse[:, None], float("-inf")), 0)
        score = tl.where(valid, _force_pages(score, logical, n_pages, force_budget, sink_pages, recent_pages),
                         float("-inf"))
        tl.store(row + c0 + offs_c, score, mask=c0 + offs_c < end)
    tl.debug_barrier()      # the row is read back below in another thread layout than it was written
    offs = tl.arange(0, BLOCK_P)
    k = tl.minimum(n_pages, budget_pages)
    take = keep_top_k(tl.load(row + offs, mask=offs < end, other=float("-inf")), k, True)
    logical, _ = _chunk_entries(Listed, b, kvh, s_ib, s_ih, offs, n_pages, max_pages, LISTED)
    store_selection(take, logical, b, kvh, seq_len, n_pages, k, PT, Logical, Physical, VLens,
                     s_pb, s_ph, s_lb, s_lh, s_yb, s_yh, budget_pages, k_sel, BLOCK_P, PAGE_SIZE, EXPAND, groups,
                     HEADS)


def select_pages(scores: torch.Tensor, page_tables: torch.Tensor, seq_lens: torch.Tensor,
                 page_size: int, budget_pages: int, early_exit: bool = True,
                 listed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stage B. Forced scores [batch, kv_heads, max_pages] -> (logical pages int32 [batch, kv_heads, k]
    ascending, their physical ids int32, virtual seq_lens int32 [batch]), k = min(budget, max_pages).
    Entries past a sequence's min(n_pages, budget_pages) are padding (-1 / 0), never read.
    listed (a shortlist's logical pages [batch, kv_heads, max_pages], ascending): entry i of a row
    is that logical page, and page_tables [batch, kv_heads, max_pages] holds its physical id."""
    batch, kv_heads, max_pages = scores.shape
    assert scores.stride(2) == 1
    out, tables, block_p, k_sel = selection_outputs(batch, kv_heads, max_pages, budget_pages, page_tables, listed)
    _select_pages[(batch, kv_heads)](
        scores, page_tables, seq_lens, *out, scores.stride(0), scores.stride(1), *tables,
        max_pages, budget_pages, k_sel, BLOCK_P=block_p, PAGE_SIZE=page_size, EARLY_EXIT=early_exit,
        LISTED=listed is not None, num_warps=4 if block_p <= 2048 else 8)
    return out[:3]


def selection_outputs(batch: int, kv_heads: int, max_pages: int, budget_pages: int, page_tables: torch.Tensor,
                       listed: torch.Tensor | None, expand: int = 1, head_vlens: bool = False
                       ) -> tuple[tuple, tuple, int, int]:
    """What both selection launchers pass: the outputs (logical, physical, vlens, and the listed
    map or a stand-in), the table/output strides after the row strides, BLOCK_P and k_sel.
    head_vlens: a virtual length per (sequence, KV head) [batch, kv_heads] (a budget per KV head),
    else per sequence [batch]."""
    assert page_tables.stride(-1) == 1
    per_head = page_tables.dim() == 3
    # per-head tables: a Quest shortlist (listed: each entry's logical page) or, for groups, each KV
    # head's compact table of its shortlisted runs (entry i its i-th group)
    assert per_head == (listed is not None) or expand > 1, "a shortlist comes with its per-head physical pages"
    assert expand & (expand - 1) == 0, "a group's pages are loaded as one power-of-two run"
    assert expand == 1 or (listed is None and page_tables.shape[-1] >= expand * max_pages), \
        "groups expand through page tables wide enough for every group"
    k_sel = min(budget_pages, max_pages)
    logical = torch.empty(batch, kv_heads, k_sel, device=page_tables.device, dtype=torch.int32)
    physical = torch.empty(batch, kv_heads, k_sel * expand, device=page_tables.device, dtype=torch.int32)
    vlens = torch.empty((batch, kv_heads) if head_vlens else (batch,), device=page_tables.device, dtype=torch.int32)
    lst = listed if listed is not None else logical
    strides = (page_tables.stride(0), page_tables.stride(1) if per_head else 0, logical.stride(0),
               logical.stride(1), physical.stride(0), physical.stride(1), lst.stride(0), lst.stride(1))
    return (logical, physical, vlens, lst), strides, max(16, triton.next_power_of_2(max_pages)), k_sel


# Rows up to this many entries keep the group's bounds in registers (_combine_select); wider rows are
# streamed (_combine_select_streamed), CHUNK entries at a time, 8 warps. H200, Llama-3-8B shapes,
# bench/sparse_stages.py: the coarse stage's rows of 2048 pages at b16 x 32k 16.2 us streamed vs 19.0
# in registers; of 8192 pages at b1 x 128k 40.2 us vs 86 for combine_heads + select_pages (the
# earlier path above 4096); the fine stage's 512-entry rows 7.1 us in registers vs 8.5 streamed.
FUSED_MAX_PAGES = 1024
STREAM_CHUNK = 2048


def combine_select(bounds: torch.Tensor, page_tables: torch.Tensor, seq_lens: torch.Tensor, page_size: int,
                   kv_heads: int, force: tuple[int, int, int], scale: float, budget_pages: int,
                   listed: torch.Tensor | None = None, early_exit: bool = True, streamed: bool | None = None,
                   chunk: int | None = None, num_warps: int | None = None, expand: int = 1,
                   sort: str | None = None, head_budgets: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """select_pages(combine_heads(bounds, ...), ...) in one launch, the scores never written out for
    rows of at most FUSED_MAX_PAGES entries (early_exit: select_pages's); wider rows (or any, with
    streamed=True) by _combine_select_streamed in chunks of `chunk` entries (default STREAM_CHUNK).
    force: the forced-page rule's (budget, sink, recent) pages; budget_pages: how many to keep.
    expand > 1: each entry is a group of `expand` consecutive pages of page_tables (page_size is
    the group's tokens); the physical output lists every page of the kept groups [batch,
    kv_heads, k * expand] (kernels/triton/centroids.py, the centroid selector's launcher).
    head_budgets: int32 [kv_heads], each KV head's budget in entries (for the forced rule and the
    count kept; budget_pages and force[0] are then the largest, which sizes the outputs), and the
    virtual lengths come per (sequence, KV head) [batch, kv_heads]."""
    batch, q_heads, max_pages = bounds.shape
    assert bounds.stride(2) == 1
    group = q_heads // kv_heads
    heads = 0 if head_budgets is None else kv_heads
    assert head_budgets is None or (head_budgets.shape == (kv_heads,) and head_budgets.dtype == torch.int32)
    out, tables, block_p, k_sel = selection_outputs(batch, kv_heads, max_pages, budget_pages, page_tables, listed,
                                                     expand, head_vlens=heads > 0)
    budgets = head_budgets if head_budgets is not None else out[2]        # (a stand-in, never read)
    if max_pages > FUSED_MAX_PAGES if streamed is None else streamed:
        scores = torch.empty(batch, kv_heads, max_pages, device=bounds.device, dtype=torch.float32)
        _combine_select_streamed[(batch, kv_heads)](
            bounds, page_tables, seq_lens, *out, budgets, scores, bounds.stride(0), bounds.stride(1), *tables,
            scores.stride(0), scores.stride(1), max_pages, scale, *force, budget_pages, k_sel, GROUP=group,
            BLOCK_G=triton.next_power_of_2(group), CHUNK=min(chunk or STREAM_CHUNK, block_p), BLOCK_P=block_p,
            PAGE_SIZE=page_size, LISTED=listed is not None, EXPAND=expand, HEADS=heads, num_warps=num_warps or 8)
        return out[:3]
    _combine_select[(batch, kv_heads)](
        bounds, page_tables, seq_lens, *out, budgets, bounds.stride(0), bounds.stride(1), *tables, max_pages, scale,
        *force, budget_pages, k_sel, GROUP=group, BLOCK_G=triton.next_power_of_2(group), BLOCK_P=block_p,
        PAGE_SIZE=page_size, EARLY_EXIT=early_exit, LISTED=listed is not None, EXPAND=expand,
        SORT=sort_width(sort, budget_pages, block_p), HEADS=heads,
        num_warps=num_warps or (4 if block_p * group <= 4096 else 8))
    return out[:3]
