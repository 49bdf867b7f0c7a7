"""Plain PyTorch attention over paged KV: the slow, obviously-right version every fast kernel must match.

Layout (per layer): k_cache, v_cache: [num_pages, page_size, kv_heads, head_dim]; a sequence is a
page table (list of page ids); its token at position p lives in page page_table[p // page_size],
slot p % page_size.

Key summaries (Quest): kmin, kmax: [num_pages, blocks, kv_heads, head_dim]. Each page is cut into
`blocks` blocks of summary_tokens = page_size // blocks slots; block j covers slots
[j * summary_tokens, (j + 1) * summary_tokens). Its summary is the element-wise min/max of the keys
in its written slots; a block with no written slot holds 0 (never an earlier owner's keys), and no
score ever reads it. Viewed as [num_pages * blocks, kv_heads, head_dim], these are exactly the
one-per-page summaries of the same cache seen as pages of summary_tokens tokens.
All arithmetic here is float32.

Page summaries (the coarse level): pmin, pmax: [num_pages, kv_heads, head_dim], the element-wise
min/max of the keys in the page's written slots (0 for a page with none).

Sparse decode scores pages with quest_page_scores: each page's Quest bound per q head is the best
bound of its written blocks; each head's bounds are normalised over the pages, then the max over
the GQA group is taken. Selection stays per page. Coarse to fine (shortlist_tokens > 0, and the
sequence has more pages than the shortlist: shortlist_pages says how many): the page summaries
score every page first (one bound per page, 1/blocks of the block summaries' bytes) and keep that
many pages per KV head (sink and recent pages always in them); only the shortlist is scored by its
block summaries, each head normalised over the shortlist, and the budget is chosen from it.
Token counts round to pages: budget_pages = budget_tokens // page_size (the budget includes the
sink and recent pages), sink_pages = ceil(sink_tokens / page_size), recent_pages =
ceil(recent_tokens / page_size) counted back from the last (possibly partial) page.
"""
from __future__ import annotations

import math

import torch


def token_slots(page_table: torch.Tensor, start: int, end: int, page_size: int) -> torch.Tensor:
    """Flat slot indices (page * page_size + offset) of positions [start, end) of one sequence."""
    positions = torch.arange(start, end, device=page_table.device)
    return page_table[positions // page_size].long() * page_size + positions % page_size


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor, start: int,
             k: torch.Tensor, v: torch.Tensor) -> None:
    """Write new keys/values k, v: [n, kv_heads, head_dim] at positions [start, start + n)."""
    num_pages, page_size, kv_heads, head_dim = k_cache.shape
    slots = token_slots(page_table, start, start + k.shape[0], page_size)
    k_cache.view(-1, kv_heads, head_dim)[slots] = k.to(k_cache.dtype)
    v_cache.view(-1, kv_heads, head_dim)[slots] = v.to(v_cache.dtype)


def gather_kv(cache: torch.Tensor, page_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` tokens of a sequence as a contiguous [length, kv_heads, head_dim] tensor."""
    page_size = cache.shape[1]
    num_used = -(-length // page_size)
    return cache[page_table[:num_used].long()].flatten(0, 1)[:length]


def summary_tokens(k_cache: torch.Tensor, kmin: torch.Tensor) -> int:
    """Tokens per summary block: page_size // blocks."""
    page_size, blocks = k_cache.shape[1], kmin.shape[1]
    assert page_size % blocks == 0, f"{blocks} summary blocks do not divide a page of {page_size}"
    return page_size // blocks


def update_page_summaries(kmin: torch.Tensor, kmax: torch.Tensor, k_cache: torch.Tensor,
                          page_table: torch.Tensor, start: int, end: int,
                          pmin: torch.Tensor | None = None, pmax: torch.Tensor | None = None) -> None:
    """Recompute every block summary of every page touched by positions [start, end): min/max over
    the block's written slots [0, end) of the page, 0 for a block with none; and the page summaries
    pmin/pmax (min/max over all the page's written slots) when given."""
    page_size = k_cache.shape[1]
    sub = summary_tokens(k_cache, kmin)
    for logical in range(start // page_size, -(-end // page_size)):
        filled = min(page_size, end - logical * page_size)
        page = int(page_table[logical])
        if pmin is not None:
            keys = k_cache[page, :filled].float()
            pmin[page] = keys.amin(dim=0).to(pmin.dtype)
            pmax[page] = keys.amax(dim=0).to(pmax.dtype)
        for block in range(kmin.shape[1]):
            first, last = block * sub, min((block + 1) * sub, filled)
            if first < last:
                keys = k_cache[page, first:last].float()
                kmin[page, block] = keys.amin(dim=0).to(kmin.dtype)
                kmax[page, block] = keys.amax(dim=0).to(kmax.dtype)
            else:
                kmin[page, block] = 0
                kmax[page, block] = 0


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    page_table: torch.Tensor, start: int, scale: float) -> torch.Tensor:
    """Causal attention of n new queries q: [n, q_heads, d] at positions [start, start + n).

    Their K/V must already be written. Covers prefill (start = 0), extend and decode (n = 1).
    """
    n, q_heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    group = q_heads // kv_heads
    assert q_heads == group * kv_heads, "q heads must be a multiple of kv heads"
    total = start + n
    k = gather_kv(k_cache, page_table, total).float().repeat_interleave(group, dim=1)
    v = gather_kv(v_cache, page_table, total).float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    query_pos = torch.arange(start, total).unsqueeze(1)
    key_pos = torch.arange(total).unsqueeze(0)
    scores = scores.masked_fill(key_pos > query_pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), v)


def quest_head_bounds(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor,
                      page_table: torch.Tensor, seq_len: int, page_size: int) -> torch.Tensor:
    """Quest's upper bound of q.k over each page's keys, per q head: the largest, over the page's
    written blocks, of sum over d of max(q_d * kmin_d, q_d * kmax_d).

    A block is written when its first position is below seq_len; the others (in the last page)
    never count, whatever their summary holds.
    q: [q_heads, d] -> bounds: [kv_heads, group, ceil(seq_len / page_size)].
    """
    q_heads, head_dim = q.shape
    blocks, kv_heads = kmin.shape[1:3]
    sub = page_size // blocks
    num_used = -(-seq_len // page_size)
    pages = page_table[:num_used].long()
    qg = q.float().view(kv_heads, q_heads // kv_heads, 1, 1, head_dim)       # [kvh, g, 1, 1, d]
    lo = kmin[pages].float().permute(2, 0, 1, 3).unsqueeze(1)                 # [kvh, 1, P, blocks, d]
    hi = kmax[pages].float().permute(2, 0, 1, 3).unsqueeze(1)
    bounds = torch.maximum(qg * lo, qg * hi).sum(dim=-1)                      # [kvh, g, P, blocks]
    first = torch.arange(num_used).unsqueeze(1) * page_size + torch.arange(blocks) * sub
    bounds = bounds.masked_fill(first >= seq_len, float("-inf"))              # unwritten blocks
    return bounds.amax(dim=-1)                                                # [kvh, g, P]


def quest_page_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor,
                      page_table: torch.Tensor, seq_len: int, page_size: int,
                      scale: float | None = None) -> torch.Tensor:
    """Page scores per KV head: the Quest bound of each q head of the GQA group (quest_head_bounds),
    normalised per head by a log-softmax over the sequence's pages at the attention scale, then the
    max over the group.

    Summing raw bounds over the group lets the heads with the largest bounds choose for all. A log-
    softmax turns each head's bounds into the (bounded) log share of its attention that a page may
    take, and the max keeps a page that any one head needs (a retrieval head's needle page).

    q: [q_heads, d] -> scores: [kv_heads, ceil(seq_len / page_size)].
    """
    scale = default_scale(q.shape[1]) if scale is None else scale
    logits = quest_head_bounds(q, kmin, kmax, page_table, seq_len, page_size) * scale
    return (logits - logits.logsumexp(dim=-1, keepdim=True)).amax(dim=1)


def attend_pages(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
                 seq_len: int, chosen: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of one query q [q_heads, d] over each KV head's chosen logical pages chosen
    [kv_heads, k] of a sequence of seq_len tokens -> [q_heads, d] float32."""
    q_heads, head_dim = q.shape
    page_size, kv_heads = k_cache.shape[1:3]
    group = q_heads // kv_heads
    out = torch.empty(q_heads, head_dim)
    for h in range(kv_heads):
        logical = chosen[h]
        pages = page_table[logical].long()
        k = k_cache[pages, :, h].float().flatten(0, 1)                        # [k*page, d]
        v = v_cache[pages, :, h].float().flatten(0, 1)
        positions = (logical.unsqueeze(1) * page_size + torch.arange(page_size)).flatten()
        valid = positions < seq_len
        qh = q[h * group:(h + 1) * group].float()                            # [g, d]
        s = (qh @ k.T) * scale
        s = s.masked_fill(~valid, float("-inf"))
        out[h * group:(h + 1) * group] = s.softmax(dim=-1) @ v
    return out


def shortlist_pages(page_size: int, budget_pages: int, shortlist_tokens: int) -> int:
    """Pages the coarse stage keeps per KV head (0: one stage): shortlist_tokens worth of pages, and
    at least twice the budget. A fixed floor, not a multiple of the budget: at budget 1024 a
    shortlist of twice the budget (128 pages) lost the passkey where 256 pages keep it (docs/sparse.md)."""
    if shortlist_tokens <= 0:
        return 0
    return max(-(-shortlist_tokens // page_size), 2 * budget_pages)


def shortlist_page_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, pmin: torch.Tensor,
                          pmax: torch.Tensor, page_table: torch.Tensor, seq_len: int, page_size: int,
                          shortlist_pages: int, sink_pages: int, recent_pages: int,
                          scale: float | None = None) -> torch.Tensor:
    """Coarse to fine page scores per KV head (the module says when): quest_page_scores of the page
    summaries picks a shortlist (select_pages: sink + recent + best, shortlist_pages in all); the
    shortlisted pages get quest_page_scores of their block summaries with each head's log-softmax
    taken over the shortlist only; every other page scores -inf. q: [q_heads, d] -> [kv_heads, P].
    """
    scale = default_scale(q.shape[1]) if scale is None else scale
    num_used = -(-seq_len // page_size)
    coarse = quest_page_scores(q, pmin.unsqueeze(1), pmax.unsqueeze(1), page_table, seq_len, page_size, scale)
    kept = select_pages(coarse, shortlist_pages, sink_pages, recent_pages)                  # [kvh, S]
    listed = torch.zeros(coarse.shape, dtype=torch.bool).scatter_(1, kept, True)          # [kvh, P]
    logits = quest_head_bounds(q, kmin, kmax, page_table, seq_len, page_size) * scale       # [kvh, g, P]
    logits = logits.masked_fill(~listed.unsqueeze(1), float("-inf"))
    scores = (logits - logits.logsumexp(dim=-1, keepdim=True)).amax(dim=1)
    assert scores.shape[1] == num_used
    return scores


def sparse_page_counts(page_size: int, budget_tokens: int, sink_tokens: int,
                       recent_tokens: int) -> tuple[int, int, int]:
    """(budget_pages, sink_pages, recent_pages) from token counts, rounded as the module says."""
    budget_pages = budget_tokens // page_size
    sink_pages = -(-sink_tokens // page_size)
    recent_pages = max(1, -(-recent_tokens // page_size))
    assert budget_pages > sink_pages + recent_pages, "budget must leave room for selected pages"
    return budget_pages, sink_pages, recent_pages


def select_pages(scores: torch.Tensor, budget_pages: int, sink_pages: int,
                 recent_pages: int) -> torch.Tensor:
    """Logical page indices to attend, per KV head: sink + recent + best-scoring middle pages.

    scores: [kv_heads, P] -> [kv_heads, min(P, budget_pages)], sorted ascending. When P fits the
    budget every page is kept (sparse decode is then exactly dense).
    """
    kv_heads, num_pages = scores.shape
    if num_pages <= budget_pages:
        return torch.arange(num_pages).expand(kv_heads, num_pages)
    forced = torch.zeros(num_pages, dtype=torch.bool)
    forced[:sink_pages] = True
    forced[num_pages - recent_pages:] = True
    middle = scores.masked_fill(forced, float("-inf"))
    picked = middle.topk(budget_pages - int(forced.sum()), dim=-1).indices
    keep = forced.expand(kv_heads, num_pages).clone()
    keep.scatter_(1, picked, True)
    return keep.nonzero()[:, 1].view(kv_heads, budget_pages)


def sparse_paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        kmin: torch.Tensor, kmax: torch.Tensor, page_table: torch.Tensor,
                        seq_len: int, scale: float, budget_tokens: int, sink_tokens: int,
                        recent_tokens: int, pmin: torch.Tensor | None = None, pmax: torch.Tensor | None = None,
                        shortlist_tokens: int = 0) -> tuple[torch.Tensor, int]:
    """Quest decode of one query q: [q_heads, d] over the first seq_len tokens (its own K/V written).
    Pages are scored by quest_page_scores at the attention's own scale; kmin, kmax: [num_pages,
    blocks, kv_heads, d] as the module says. With shortlist_tokens > 0 (and pmin, pmax) a sequence of
    more than shortlist_pages(...) pages is scored coarse to fine (shortlist_page_scores).

    Returns (out [q_heads, d] float32, pages read summed over KV heads).
    """
    page_size = k_cache.shape[1]
    budget_pages, sink_pages, recent_pages = sparse_page_counts(
        page_size, budget_tokens, sink_tokens, recent_tokens)
    shortlist = shortlist_pages(page_size, budget_pages, shortlist_tokens)
    if shortlist and -(-seq_len // page_size) > shortlist:
        scores = shortlist_page_scores(q, kmin, kmax, pmin, pmax, page_table, seq_len, page_size, shortlist,
                                       sink_pages, recent_pages, scale)
    else:
        scores = quest_page_scores(q, kmin, kmax, page_table, seq_len, page_size, scale)
    chosen = select_pages(scores, budget_pages, sink_pages, recent_pages)     # [kvh, k]
    return attend_pages(q, k_cache, v_cache, page_table, seq_len, chosen, scale), int(chosen.numel())


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
