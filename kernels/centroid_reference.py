"""Plain PyTorch reference of the centroid selector (sparse_attention.selector: centroids): the
slow, obviously-right statement that the engine's torch path (backends/cuda/attention/centroids.py)
and the Triton kernels (kernels/triton/centroid_scores.py, shortlist_scores.py, centroids.py) must
match. Paged layout, page tables and the rounding of the budget, sink and recent tokens are
kernels/reference.py's; a group is a run of group_pages pages, and its summary (C k-means
centroids of its keys per KV head, with their log counts and spreads) sits at the physical id of
its last page. Coarse to fine adds runs of run_pages pages with summaries of their own
(CentroidShortlist). All arithmetic is float64 or float32.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from kernels.reference import select_pages, sparse_page_counts


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
                          shortlist: CentroidShortlist | None = None,
                          head_budgets: Sequence[int] | None = None) -> torch.Tensor | list[torch.Tensor]:
    """The centroid selector's logical pages per KV head: groups of page_size * group_pages tokens
    counted as sparse_page_counts counts pages (budget, sink, recent in groups), chosen by
    select_pages from centroid_group_scores, each kept group's pages in order (the last group's
    only up to the sequence's last page) -> [kv_heads, k] ascending (every head keeps the last
    group, so every row has the same length).

    With a shortlist (coarse to fine): each KV head's shortlisted runs (centroid_shortlist), in
    order, are a sequence of their own (the shortlist's length, its own page table), and the rule
    above chooses among its groups alone: each head's softmax over the shortlist, the sink and
    recent groups counted in it (they are its first and last groups). A sequence of at most the
    shortlist's runs is its own shortlist, so it selects exactly as without one.

    head_budgets (tokens per KV head, each at most budget_tokens, which is then the layer's
    largest): each KV head keeps its own budget's groups by the same scores and rule, the
    shortlist sized by budget_tokens for every head -> a list of each head's pages."""
    kv_heads = cents.shape[1]
    budgets = [budget_tokens] * kv_heads if head_budgets is None else list(head_budgets)
    assert len(budgets) == kv_heads and max(budgets) <= budget_tokens
    chosen = []
    if shortlist is not None:
        runs, short_len = centroid_shortlist(q, shortlist, page_table, seq_len, page_size, group_pages, scale,
                                             budget_tokens, sink_tokens, recent_tokens)
        run_pages = shortlist.run_pages
        group = q.shape[0] // kv_heads
        padded = torch.cat([page_table, page_table[-1:].expand(run_pages)])       # the last run, whole
        for h, head_budget in enumerate(budgets):
            logical = (runs[h].unsqueeze(1) * run_pages + torch.arange(run_pages)).flatten()
            pages = centroid_select_pages(q[h * group:(h + 1) * group], cents[:, h:h + 1], stats[:, h:h + 1],
                                          padded[logical.clamp(max=len(page_table))], short_len, page_size,
                                          group_pages, scale, head_budget, sink_tokens, recent_tokens)
            chosen.append(logical[pages[0]])
    else:
        span = page_size * group_pages
        scores = centroid_group_scores(q, cents, stats, page_table, seq_len, page_size, group_pages, scale)
        n_pages = -(-seq_len // page_size)
        for h, head_budget in enumerate(budgets):
            groups = select_pages(scores[h:h + 1], *sparse_page_counts(span, head_budget, sink_tokens,
                                                                       recent_tokens))[0]
            pages = (groups.unsqueeze(-1) * group_pages + torch.arange(group_pages)).flatten()
            chosen.append(pages[:int((pages < n_pages).sum())])
    return chosen if head_budgets is not None else torch.stack(chosen)
