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
from typing import NamedTuple

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


def kmeans_keys(x: torch.Tensor, written: torch.Tensor, clusters: int, steps: int = 8):
    """Batched k-means of keys x [..., n, d] over its written points [..., n] -> centroids [..., C, d],
    counts [..., C], spread [..., C] (mean squared distance to the centroid per channel). The start
    is farthest-point: the key farthest from the mean, then each time the key farthest from those
    chosen, so a key unlike the rest (a needle) gets a centroid of its own; then `steps` Lloyd
    steps. A cluster left empty keeps its centroid with count 0."""
    w = written.float()
    mean = (x * w.unsqueeze(-1)).sum(-2) / w.sum(-1, keepdim=True).clamp(min=1)
    far = ((x - mean.unsqueeze(-2)) ** 2).sum(-1).masked_fill(~written, -1.0)
    chosen = [far.argmax(-1)]
    dist = None
    for _ in range(clusters - 1):
        last = x.gather(-2, chosen[-1][..., None, None].expand(*x.shape[:-2], 1, x.shape[-1]))
        d_new = ((x - last) ** 2).sum(-1)
        dist = d_new if dist is None else torch.minimum(dist, d_new)
        chosen.append(dist.masked_fill(~written, -1.0).argmax(-1))
    index = torch.stack(chosen, -1)                                               # [..., C]
    centroids = x.gather(-2, index.unsqueeze(-1).expand(*index.shape, x.shape[-1]))
    for _ in range(steps):
        d2 = torch.cdist(x, centroids) ** 2                                       # [..., n, C]
        onehot = torch.nn.functional.one_hot(d2.argmin(-1), clusters).float() * w.unsqueeze(-1)
        counts = onehot.sum(-2)                                                   # [..., C]
        sums = onehot.transpose(-1, -2) @ x
        centroids = torch.where(counts.unsqueeze(-1) > 0, sums / counts.clamp(min=1).unsqueeze(-1), centroids)
    d2 = torch.cdist(x, centroids) ** 2
    onehot = torch.nn.functional.one_hot(d2.argmin(-1), clusters).float() * w.unsqueeze(-1)
    counts = onehot.sum(-2)
    spread = (onehot * d2).sum(-2) / counts.clamp(min=1) / x.shape[-1]
    return centroids, counts, spread


def centroid_group_summaries(k_cache: torch.Tensor, cents: torch.Tensor, stats: torch.Tensor,
                              page_table: torch.Tensor, seq_len: int, page_size: int, group_pages: int,
                              steps: int = 8) -> None:
    """Write the centroid summaries (centroid_group_logits's layout) of every complete group of a
    sequence of seq_len tokens: k-means of each group's keys per KV head (kmeans_keys), the
    centroids cast to cents' dtype at the group's last page, stats = (log count, spread)."""
    span = page_size * group_pages
    full = seq_len // span
    if not full:
        return
    kv_heads, clusters, head_dim = cents.shape[1:]
    pages = page_table[:full * group_pages].long()
    keys = k_cache[pages].float().view(full, span, kv_heads, head_dim).transpose(1, 2)   # [G, kvh, span, d]
    written = torch.ones(keys.shape[:3], dtype=torch.bool, device=keys.device)
    centroids, counts, spread = kmeans_keys(keys, written, clusters, steps)
    last = pages[group_pages - 1::group_pages]
    cents[last] = centroids.to(cents.dtype)
    stats[last] = torch.stack((counts.log(), spread), dim=-1).to(stats.dtype)


def centroid_group_logits(q: torch.Tensor, cents: torch.Tensor, stats: torch.Tensor, page_table: torch.Tensor,
                          seq_len: int, page_size: int, group_pages: int, scale: float) -> torch.Tensor:
    """A group selector that estimates instead of bounding (kernels/triton/centroids.py; quality in
    bench/sparse_estimators.py): each complete run of group_pages pages per KV head keeps C k-means
    centroids cents [num_pages, kv_heads, C, d] and stats [num_pages, kv_heads, C, 2] (log count,
    spread s^2 per channel) at the physical id of the group's last page. Per q head h and group n:
    logsumexp over c of (scale q_h.c + log count_c + scale^2 |q_h|^2 s_c^2 / 2), the group's
    log-mass if its keys sat on their centroids with Gaussian spread; returned divided by scale
    (the unit of Quest bounds). Scored are the groups complete before the sequence's last token
    (the decode's own): an engine writes a group's summary after the step that completes it. The
    group holding that token has no summary: -inf, so that it takes no share of any head's
    softmax (centroid_group_scores); the recent rule always keeps it.

    q: [q_heads, d] -> [kv_heads, group, ceil(seq_len / (page_size * group_pages))]."""
    q_heads, head_dim = q.shape
    kv_heads = cents.shape[1]
    span = page_size * group_pages
    n_groups, full = -(-seq_len // span), (seq_len - 1) // span
    last = page_table[group_pages - 1:full * group_pages:group_pages].long()
    c, st = cents[last].double(), stats[last].double()                        # [G, kvh, C, (d|2)]
    qg = q.double().view(kv_heads, q_heads // kv_heads, head_dim) * scale
    logits = (torch.einsum("hgd,nhcd->hgnc", qg, c) + st[..., 0].permute(1, 0, 2).unsqueeze(1)
              + 0.5 * (qg * qg).sum(-1)[..., None, None] * st[..., 1].permute(1, 0, 2).unsqueeze(1))
    out = torch.full((kv_heads, q_heads // kv_heads, n_groups), float("-inf"), dtype=torch.float64, device=q.device)
    out[..., :full] = logits.logsumexp(-1) / scale
    return out.float()


def centroid_group_scores(q: torch.Tensor, cents: torch.Tensor, stats: torch.Tensor, page_table: torch.Tensor,
                          seq_len: int, page_size: int, group_pages: int, scale: float) -> torch.Tensor:
    """Group scores per KV head, combined as quest_page_scores combines page bounds: each q head's
    estimated log-masses (centroid_group_logits, at the attention scale) as a log-softmax over the
    sequence's scored groups, then the max over the GQA group. The last group scores -inf (the
    recent rule keeps it). q: [q_heads, d] -> [kv_heads, ceil(seq_len / span)]."""
    logits = centroid_group_logits(q, cents, stats, page_table, seq_len, page_size, group_pages, scale).double()
    logits = logits * scale
    return (logits - logits.logsumexp(dim=-1, keepdim=True)).amax(dim=1).float()


class CentroidShortlist(NamedTuple):
    """The coarse stage of the centroid selector: C centroids per run of run_pages pages and KV
    head (cents [num_pages, kv_heads, C, d], stats [num_pages, kv_heads, C, 2], kept like the
    groups' at the physical id of each complete run's last page), scoring runs as
    centroid_group_logits scores groups; the best shortlist_tokens worth of runs per KV head are
    the only groups the fine stage scores and chooses from."""
    cents: torch.Tensor
    stats: torch.Tensor
    run_pages: int
    shortlist_tokens: int


def shortlist_run_counts(page_size: int, group_pages: int, run_pages: int, shortlist_tokens: int,
                         budget_tokens: int, sink_tokens: int, recent_tokens: int) -> tuple[int, int, int]:
    """(runs kept, sink runs, recent runs) of the coarse stage: shortlist_tokens // run tokens runs
    per KV head, and at least twice the budget's groups' worth (as shortlist_pages for Quest) and
    one more than it forces; among them the runs that hold the fine stage's forced groups (the sink
    groups from the start, the recent groups back from the last, possibly partial, group: one run
    more than they fill when they start inside one), so that those groups keep their places in the
    shortlist."""
    assert run_pages % group_pages == 0, "a run is whole groups"
    span, run_span = page_size * group_pages, page_size * run_pages
    budget, sink, recent = sparse_page_counts(span, budget_tokens, sink_tokens, recent_tokens)
    per_run = run_pages // group_pages
    sink_runs, recent_runs = -(-sink // per_run), 1 + -(-(recent - 1) // per_run)
    keep = max(shortlist_tokens // run_span, -(-2 * budget // per_run), sink_runs + recent_runs + 1)
    return keep, sink_runs, recent_runs


def centroid_shortlist(q: torch.Tensor, shortlist: CentroidShortlist, page_table: torch.Tensor, seq_len: int,
                       page_size: int, group_pages: int, scale: float, budget_tokens: int, sink_tokens: int,
                       recent_tokens: int) -> tuple[torch.Tensor, int]:
    """The coarse stage: each KV head's shortlisted runs [kv_heads, R] ascending (select_pages of
    centroid_group_scores over runs, counts from shortlist_run_counts; every run when the sequence
    has at most R) and the shortlist's length in tokens (its last run, the sequence's, partial)."""
    keep, sink, recent = shortlist_run_counts(page_size, group_pages, shortlist.run_pages, shortlist.shortlist_tokens,
                                              budget_tokens, sink_tokens, recent_tokens)
    run_span = page_size * shortlist.run_pages
    scores = centroid_group_scores(q, shortlist.cents, shortlist.stats, page_table, seq_len, page_size,
                                   shortlist.run_pages, scale)
    runs = select_pages(scores, keep, sink, recent)
    return runs, seq_len - max(-(-seq_len // run_span) - keep, 0) * run_span


def centroid_select_pages(q: torch.Tensor, cents: torch.Tensor, stats: torch.Tensor, page_table: torch.Tensor,
                          seq_len: int, page_size: int, group_pages: int, scale: float, budget_tokens: int,
                          sink_tokens: int, recent_tokens: int,
                          shortlist: CentroidShortlist | None = None) -> torch.Tensor:
    """The centroid selector's logical pages per KV head: groups of page_size * group_pages tokens
    counted as sparse_page_counts counts pages (budget, sink, recent in groups), chosen by
    select_pages from centroid_group_scores, each kept group's pages in order (the last group's
    only up to the sequence's last page) -> [kv_heads, k] ascending (every head keeps the last
    group, so every row has the same length).

    With a shortlist (coarse to fine): each KV head's shortlisted runs (centroid_shortlist), in
    order, are a sequence of their own (the shortlist's length, its own page table), and the rule
    above chooses among its groups alone: each head's softmax over the shortlist, the sink and
    recent groups counted in it (they are its first and last groups). A sequence of at most the
    shortlist's runs is its own shortlist, so it selects exactly as without one."""
    if shortlist is not None:
        runs, short_len = centroid_shortlist(q, shortlist, page_table, seq_len, page_size, group_pages, scale,
                                             budget_tokens, sink_tokens, recent_tokens)
        kv_heads, run_pages = cents.shape[1], shortlist.run_pages
        group = q.shape[0] // kv_heads
        padded = torch.cat([page_table, page_table[-1:].expand(run_pages)])       # the last run, whole
        chosen = []
        for h in range(kv_heads):
            logical = (runs[h].unsqueeze(1) * run_pages + torch.arange(run_pages)).flatten()
            pages = centroid_select_pages(q[h * group:(h + 1) * group], cents[:, h:h + 1], stats[:, h:h + 1],
                                          padded[logical.clamp(max=len(page_table))], short_len, page_size,
                                          group_pages, scale, budget_tokens, sink_tokens, recent_tokens)
            chosen.append(logical[pages[0]])
        return torch.stack(chosen)
    span = page_size * group_pages
    budget, sink, recent = sparse_page_counts(span, budget_tokens, sink_tokens, recent_tokens)
    scores = centroid_group_scores(q, cents, stats, page_table, seq_len, page_size, group_pages, scale)
    groups = select_pages(scores, budget, sink, recent)                         # [kvh, k]
    pages = (groups.unsqueeze(-1) * group_pages + torch.arange(group_pages)).flatten(1)
    n_pages = -(-seq_len // page_size)
    return pages[:, :int((pages[0] < n_pages).sum())]


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
