"""The centroid selector in MLX ops (sparse_attention.selector: centroids): the rule of
kernels/centroid_reference.py (centroid_select_pages, coarse to fine with a CentroidShortlist) as
backends/cuda/attention/centroids.py batches it for torch, op for op. The settings' rounding, the
row counts and the unit layout are that module's own (group_counts, shortlist_counts,
count_group_pages, unit_layout, completed_groups).

Summaries. Each complete group of group_pages pages per KV head keeps C k-means centroids (e4m3
bytes: mx.to_fp8 rounds as torch's float8_e4m3fn does) with a log count and a spread each, at the
physical id of the group's last page (backends/mlx/kv_cache.py); runs of run_pages pages keep their
own the same way. The runner writes the groups (runs) a step completes after the step's forward,
every layer at once (write_group_summaries), as lazy MLX ops evaluated with the step: no wait for
the step, as the torch path queues its k-means behind the step without waiting. A decode therefore
scores only the groups complete before its own token; the group holding that token is recent.

Per decode row past the budget and per KV head (a plan built on the host once per step, shared by
every sparse layer): each q head's estimated log-mass of every summarised group, a log-softmax over
them, the max over the GQA group; the sink, recent and best groups fill the budget (equal scores go
to the lower index: the Triton kernels' tie rule); the chosen groups' pages are read. Coarse to fine
when some row has more runs than the shortlist keeps: its runs are scored the same way, each KV
head keeps its best, and the groups are scored and chosen among the shortlisted runs' only.

Budgets per (layer, KV head) (sparse_attention.head_budgets, backends/head_budgets.py): the counts
are fixed at start-up (CentroidBudgets; without a table every sparse layer and KV head keeps the
budget). A row is sparse when its groups exceed the fewest count anywhere; each sparse layer
chooses as many groups per row as its largest head keeps (or as the row has), and each KV head
keeps its own count of them, best first by the same scores and rule
(centroid_reference.centroid_select_pages(head_budgets=...)), its list padded to the layer's width
past its own virtual length, where attention never reads.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import mlx.core as mx
import numpy as np
import torch

from backends.base import AttentionStats, SparseSettings
from backends.cuda.attention.centroids import KMEANS_STEPS, group_counts, shortlist_counts, unit_layout
from backends.mlx.sparse import DecodeRows, decode_rows
from kernels import centroid_reference as cref

if TYPE_CHECKING:
    from backends.head_budgets import HeadGroups
    from backends.mlx.kv_cache import PagedKVCache

# torch.cdist (the reference's distances) switches to |x|^2 - 2 x.c + |c|^2 by one matmul when
# either side has more rows than this (its default compute_mode); below it, it sums the squared
# differences. Following it keeps the k-means's arithmetic the reference's, not just its rule.
CDIST_MATMUL_ROWS = 25


# ---- summaries ---------------------------------------------------------------------------------

def squared_distances(x: mx.array, c: mx.array) -> mx.array:
    """torch.cdist(x, c) ** 2 as the reference computes it: x [..., n, d], c [..., C, d] -> [..., n, C]."""
    if x.shape[-2] > CDIST_MATMUL_ROWS or c.shape[-2] > CDIST_MATMUL_ROWS:
        x_norm, c_norm = (x * x).sum(-1, keepdims=True), (c * c).sum(-1, keepdims=True)
        padded_x = mx.concatenate([x * -2, x_norm, mx.ones_like(x_norm)], axis=-1)
        padded_c = mx.concatenate([c, mx.ones_like(c_norm), c_norm], axis=-1)
        dist2 = padded_x @ padded_c.swapaxes(-1, -2)
    else:
        dist2 = ((x[..., :, None, :] - c[..., None, :, :]) ** 2).sum(-1)
    return mx.sqrt(mx.maximum(dist2, 0)) ** 2


def nearest(x: mx.array, centroids: mx.array) -> tuple[mx.array, mx.array]:
    """(one-hot assignment [..., n, C] float32 of each key to its nearest centroid, the squared
    distances [..., n, C])."""
    dist2 = squared_distances(x, centroids)
    onehot = mx.argmin(dist2, axis=-1)[..., None] == mx.arange(centroids.shape[-2])
    return onehot.astype(mx.float32), dist2


def kmeans_keys(x: mx.array, clusters: int, steps: int = KMEANS_STEPS) -> tuple[mx.array, mx.array, mx.array]:
    """centroid_reference.kmeans_keys over whole groups (every key written: the engine summarises
    complete groups only): x float32 [..., n, d] -> centroids [..., C, d], counts [..., C], spread
    [..., C]. Farthest-point start (the key farthest from the mean, then each time the key farthest
    from those chosen; ties to the first, as torch's argmax), then `steps` Lloyd steps; a cluster
    left empty keeps its centroid with count 0."""
    n, head_dim = x.shape[-2:]
    mean = x.sum(-2, keepdims=True) / n
    chosen = [mx.argmax(((x - mean) ** 2).sum(-1), axis=-1)]
    dist = None
    for _ in range(clusters - 1):
        last = mx.take_along_axis(x, chosen[-1][..., None, None], axis=-2)          # [..., 1, d]
        d_new = ((x - last) ** 2).sum(-1)
        dist = d_new if dist is None else mx.minimum(dist, d_new)
        chosen.append(mx.argmax(dist, axis=-1))
    centroids = mx.take_along_axis(x, mx.stack(chosen, axis=-1)[..., None], axis=-2)   # [..., C, d]
    for _ in range(steps):
        onehot, _ = nearest(x, centroids)
        counts = onehot.sum(-2)
        sums = onehot.swapaxes(-1, -2) @ x
        centroids = mx.where(counts[..., None] > 0, sums / mx.maximum(counts, 1)[..., None], centroids)
    onehot, dist2 = nearest(x, centroids)
    counts = onehot.sum(-2)
    spread = (onehot * dist2).sum(-2) / mx.maximum(counts, 1) / head_dim
    return centroids, counts, spread


def write_group_summaries(cache: PagedKVCache, groups: list[list[int]], runs: bool = False) -> None:
    """k-means of each group's keys per layer and KV head, stored at the group's last page in every
    layer at once (lazily: the step's evaluation computes them). groups: page ids [G][group_pages]
    (centroids.completed_groups); runs: they are the coarse stage's runs [R][run_pages], summarised
    into run_cents and run_cstats."""
    if not groups:
        return
    cents, cstats, pages_each = ((cache.run_cents, cache.run_cstats, cache.run_pages) if runs
                                 else (cache.cents, cache.cstats, cache.group_pages))
    assert cents is not None and all(len(g) == pages_each for g in groups), (pages_each, groups)
    pages = mx.array(np.asarray(groups, dtype=np.int32))                                 # [G, gp]
    kv_heads, head_dim, span = cache.kv_heads, cache.head_dim, cache.page_size * pages_each
    keys = mx.stack([layer.reshape(-1, cache.page_size, kv_heads, head_dim)[pages.reshape(-1)]
                     for layer in cache.k])                                             # [L, G*gp, page, kvh, d]
    keys = keys.astype(mx.float32).reshape(len(cache.k), len(groups), span, kv_heads, head_dim)
    centroids, counts, spread = kmeans_keys(keys.transpose(0, 1, 3, 2, 4), cents[0].shape[2])
    last = pages[:, -1]
    stats = mx.stack([mx.log(counts), spread], axis=-1)                                # [L, G, kvh, C, 2]
    centroid_bytes = mx.to_fp8(centroids)                                             # [L, G, kvh, C, d]
    for layer in range(len(cents)):
        cents[layer][last] = centroid_bytes[layer]
        cstats[layer][last] = stats[layer]


# ---- the counts, fixed at start-up -------------------------------------------------------------

@dataclass(frozen=True)
class CentroidBudgets:
    """The centroid selector's counts for one model (centroid_budgets, once at start-up): groups
    kept per (sparse layer, KV head), the budget everywhere without a per-head table."""

    group_pages: int
    sink: int                                       # forced groups from the start of a row
    recent: int                                     # forced groups back from its last
    per_layer: dict[int, tuple[int, ...]]           # groups each KV head keeps, every sparse layer
    fewest: int                                     # a decode row of more groups is sparse
    shortlist: tuple[int, int, int, int] | None     # (run_pages, runs kept, sink runs, recent runs), or one stage
    head_keep: dict[tuple[int, ...], mx.array]      # each distinct per_layer entry as int32 [1, kv_heads, 1]
    table: np.ndarray                               # per_layer as int64 [sparse layers, kv_heads] (the accounting)


def centroid_budgets(sparse: SparseSettings, page_size: int, layers: int, kv_heads: int,
                     head_table: HeadGroups | None) -> CentroidBudgets:
    """The counts of a model of `layers` layers and `kv_heads` KV heads: head_table is
    head_budgets.head_groups's for it (None: uniform). Raises ValueError naming a setting."""
    group_pages, budget, sink, recent = group_counts(sparse, page_size)
    sparse_layers = range(sparse.dense_layers, layers)
    per_layer = (dict(head_table.per_layer) if head_table is not None
                 else {layer: (budget,) * kv_heads for layer in sparse_layers})
    assert sorted(per_layer) == list(sparse_layers) and all(len(c) == kv_heads for c in per_layer.values())
    # the rule forces sink and recent groups within every head's count (head_groups floors them so)
    assert min(min(c) for c in per_layer.values()) > sink + recent, per_layer
    shortlist = shortlist_counts(sparse, page_size)
    if head_table is not None and shortlist is not None:
        shortlist = (shortlist[0], *layers_shortlist(sparse, page_size, group_pages, shortlist[0], head_table))
    return CentroidBudgets(
        group_pages=group_pages, sink=sink, recent=recent, per_layer=per_layer,
        fewest=min(min(c) for c in per_layer.values()), shortlist=shortlist,
        head_keep={c: mx.array(np.asarray(c, dtype=np.int32).reshape(1, kv_heads, 1)) for c in set(per_layer.values())},
        table=np.asarray([per_layer[layer] for layer in sparse_layers], dtype=np.int64))


def layers_shortlist(sparse: SparseSettings, page_size: int, group_pages: int, run_pages: int,
                     head_table: HeadGroups) -> tuple[int, int, int]:
    """(runs kept, sink runs, recent runs) of the coarse stage with a per-head table: the reference
    sizes a layer's shortlist by its largest head (centroid_reference.centroid_select_pages), and
    head_groups made shortlist_tokens hold twice the largest anywhere, so every layer keeps the
    same runs and one coarse layout serves them all."""
    counts = {cref.shortlist_run_counts(page_size, group_pages, run_pages, sparse.shortlist_tokens,
                                        head_table.largest(layer) * sparse.group_tokens, sparse.sink_tokens,
                                        sparse.recent_tokens) for layer in head_table.per_layer}
    assert len(counts) == 1, f"the layers' shortlists differ: {counts}"
    return counts.pop()


# ---- the per-step plan -------------------------------------------------------------------------

@dataclass
class ShortlistPlan:
    """The coarse stage's layout of the sparse rows (every layer's)."""

    run_pages: int
    keep: int                       # runs kept per row and KV head
    run_last: mx.array              # [Bs, R] physical id of each run's last page
    run_scored: mx.array            # [Bs, 1, 1, R] runs with a summary (complete before the row's token)
    run_bias: mx.array              # [Bs, 1, R] +inf forced (sink, recent runs), -inf past the sequence
    scored: mx.array                # [Bs, 1, 1, keep * groups a run] shortlisted groups with a summary
    bias: mx.array                  # [Bs, 1, keep * groups a run] the fine stage's, over the shortlist


@dataclass
class LayerChoice:
    """What one sparse layer's choice reads of its counts this step (layers of equal counts share one)."""

    width: int                      # groups chosen per row and KV head: its largest head's, at most the units scored
    head_keep: mx.array             # int32 [1, kv_heads, 1] groups each KV head keeps of them (best first)
    virtual_lengths: mx.array       # int32 [Bs, kv_heads] tokens each head reads of its list (its groups, the
                                    # last one's only up to the row's end)


@dataclass
class CentroidPlan(DecodeRows):
    """Per-step layout of the decode rows, shared by every sparse layer (built on the host once)."""

    group_pages: int
    sparse_pages: mx.array          # [Bs, P] page tables, padded with the scratch page to whole groups (runs)
    last_pages: mx.array            # [Bs, G] physical id of each group's last page
    scored: mx.array                # [Bs, 1, 1, G] groups with a summary (complete before the row's token)
    bias: mx.array                  # [Bs, 1, G] +inf forced (sink, recent), -inf past the sequence, else 0
    layers: dict[int, LayerChoice]  # every sparse layer's counts
    stats: AttentionStats           # pages read and skipped over every sparse layer and KV head, all decode rows
    shortlist: ShortlistPlan | None = None      # coarse to fine (some row is longer than the shortlist)


def as_mx(t: torch.Tensor) -> mx.array:
    """A host torch tensor of the plan (centroids.unit_layout's) as an MLX array."""
    return mx.array(t.numpy())


def make_centroid_plan(budgets: CentroidBudgets, tables: np.ndarray, lengths: np.ndarray, page_size: int,
                       scratch_page: int) -> CentroidPlan | None:
    """tables: int32 [B, W] of the decode rows, lengths [B] (tokens including the new one). None when
    no row has more groups than the fewest count (every layer then decodes densely)."""
    group_pages, sink, recent = budgets.group_pages, budgets.sink, budgets.recent
    used = -(-lengths // page_size)
    # a row of at most `fewest` groups keeps every group in every layer and KV head: exactly dense
    is_sparse = used > budgets.fewest * group_pages
    if not is_sparse.any():
        return None
    sparse_rows = np.flatnonzero(is_sparse)
    width = int(used[sparse_rows].max())
    coarse = budgets.shortlist
    if coarse is not None and -(-width // coarse[0]) <= coarse[1]:
        coarse = None           # every row within the shortlist: its own shortlist, the same choice
    whole = coarse[0] if coarse is not None else group_pages
    pages = np.full((len(sparse_rows), -(-width // whole) * whole), scratch_page, dtype=np.int32)
    pages[:, :width] = tables[sparse_rows, :width]
    pages[np.arange(pages.shape[1])[None, :] >= used[sparse_rows, None]] = scratch_page
    span = page_size * group_pages
    sparse_lengths = torch.from_numpy(lengths[sparse_rows].astype(np.int64))
    units = pages.shape[1] // group_pages               # groups the choice is made among
    scored, bias = unit_layout(sparse_lengths, units, span, sink, recent)
    shortlisted, shortlist = sparse_lengths, None
    if coarse is not None:
        run_pages, keep, sink_runs, recent_runs = coarse
        run_span = page_size * run_pages
        run_scored, run_bias = unit_layout(sparse_lengths, pages.shape[1] // run_pages, run_span, sink_runs,
                                           recent_runs)
        # the shortlist's length: its last run is the row's own (partial) last run
        assert pages.shape[1] // run_pages > keep, "the coarse stage runs only when some row has more runs"
        shortlisted = sparse_lengths - (-(-sparse_lengths // run_span) - keep).clamp(min=0) * run_span
        units = keep * run_pages // group_pages
        short_scored, short_bias = unit_layout(shortlisted, units, span, sink, recent)
        shortlist = ShortlistPlan(run_pages=run_pages, keep=keep, run_last=mx.array(pages[:, run_pages - 1::run_pages]),
                                  run_scored=as_mx(run_scored), run_bias=as_mx(run_bias), scored=as_mx(short_scored),
                                  bias=as_mx(short_bias))
    return CentroidPlan(
        group_pages=group_pages, **decode_rows(tables, lengths, used, is_sparse),
        sparse_pages=mx.array(pages), last_pages=mx.array(pages[:, group_pages - 1::group_pages]),
        scored=as_mx(scored), bias=as_mx(bias), layers=layer_choices(budgets, shortlisted.numpy(), span, units),
        stats=count_pages(budgets, lengths, page_size), shortlist=shortlist)


def layer_choices(budgets: CentroidBudgets, shortlisted: np.ndarray, span: int, units: int) -> dict[int, LayerChoice]:
    """Each sparse layer's LayerChoice for sparse rows choosing among `units` groups of their first
    `shortlisted` tokens [Bs] (the row, or its shortlist). A head keeps min(its count, the row's
    groups) groups, the last the row's own (partial) one, so it reads the shortlisted tokens less
    its dropped groups' whole spans. Layers of equal counts (all of them without a table) share
    one, built once a step."""
    groups = -(-shortlisted // span)                                                 # [Bs]
    shared = {}
    for counts in set(budgets.per_layer.values()):
        dropped = np.maximum(groups[:, None] - np.asarray(counts)[None, :], 0) * span   # [Bs, kv_heads]
        shared[counts] = LayerChoice(width=min(max(counts), units), head_keep=budgets.head_keep[counts],
                                     virtual_lengths=mx.array((shortlisted[:, None] - dropped).astype(np.int32)))
    return {layer: shared[counts] for layer, counts in budgets.per_layer.items()}


def count_pages(budgets: CentroidBudgets, lengths: np.ndarray, page_size: int) -> AttentionStats:
    """Pages read and skipped by the decode rows of lengths [B] over every sparse layer and KV head
    (count_group_pages's rule for each one's count): a head whose count a row's groups exceed skips
    its unchosen groups' pages (its chosen last group may be partial); one that covers the row, and
    every head of a dense row, reads them all."""
    pages = -(-lengths.astype(np.int64) // page_size)                              # [B]
    groups = -(-pages // budgets.group_pages)
    dropped = np.maximum(groups[None, None, :] - budgets.table[..., None], 0)       # [layers, kv_heads, B]
    skipped = int(dropped.sum()) * budgets.group_pages
    return AttentionStats(int(pages.sum()) * budgets.table.size - skipped, skipped)


# ---- scores and the choice ---------------------------------------------------------------------

def group_scores(q: mx.array, cents_layer: mx.array, cstats_layer: mx.array, last_pages: mx.array,
                 scored: mx.array, scale: float) -> mx.array:
    """centroid_reference.centroid_group_scores batched: q [Bs, H, d]; one layer's summaries cents
    (e4m3 bytes) [pages, kv_heads, C, d] and cstats [pages, kv_heads, C, 2]; the units' last pages
    [Bs, G] (every KV head's) or [Bs, kv_heads, G] (each head's own, a shortlist); scored [Bs, 1, 1,
    G] -> float32 [Bs, kv_heads, G] (-inf for units without a summary)."""
    batch, heads, head_dim = q.shape
    kv_heads, clusters = cents_layer.shape[1:3]
    if last_pages.ndim == 2:
        last_pages = mx.broadcast_to(last_pages[:, None, :], (batch, kv_heads, last_pages.shape[1]))
    units, group = last_pages.shape[2], heads // kv_heads
    # row page * kv_heads + head of the summaries viewed as [pages * kv_heads, C, ...]: each head's own
    flat = (last_pages * kv_heads + mx.arange(kv_heads).reshape(1, kv_heads, 1)).reshape(-1)
    c = mx.from_fp8(cents_layer.reshape(-1, clusters, head_dim)[flat], dtype=mx.float32)
    c = c.reshape(batch, kv_heads, units * clusters, head_dim)
    st = cstats_layer.reshape(-1, clusters, 2)[flat].reshape(batch, kv_heads, 1, units, clusters, 2)
    qg = (q.astype(mx.float32) * scale).reshape(batch, kv_heads, group, head_dim)
    logits = ((qg @ c.swapaxes(-1, -2)).reshape(batch, kv_heads, group, units, clusters) + st[..., 0]
              + 0.5 * (qg * qg).sum(-1)[..., None, None] * st[..., 1])                # [Bs, kvh, g, G, C]
    mass = mx.where(scored, mx.logsumexp(logits, axis=-1), -mx.inf)                   # [Bs, kvh, g, G]
    return (mass - mx.logsumexp(mass, axis=-1, keepdims=True)).max(axis=2)


def best_units(scores: mx.array, bias: mx.array, keep: int, unit_pages: int, head_keep: mx.array | int) -> mx.array:
    """The `keep` best units per row and KV head, forced ones first, of which each KV head keeps its
    head_keep best (an int: every head alike; int32 [1, kv_heads, 1]: each its own count), as their
    pages ascending [Bs, kv_heads, keep * unit_pages] (indices into whatever the scores were over).
    A head keeping fewer has its list padded with the last unit's pages, which it never reads: its
    virtual length ends within its own units (LayerChoice). Equal scores go to the lower index: each
    unit's key is its score's order as an integer, then its index reversed, so that no two keys are
    equal and neither the choice nor a head's share of it depends on the sort's order."""
    # forced and padding units take the bias itself (adding it would make the unscored recent unit's
    # -inf + inf a NaN); + 0.0 turns a -0.0 into the 0.0 it equals
    ranked = mx.where(bias == 0, scores, bias) + 0.0
    bits = ranked.view(mx.int32)
    order = mx.where(bits < 0, mx.bitwise_xor(bits, 0x7FFFFFFF), bits).astype(mx.int64)   # the floats' order
    units = ranked.shape[-1]
    assert 0 < keep <= units, (keep, units)
    key = order * units + (units - 1 - mx.arange(units))
    best = mx.argsort(-key, axis=-1)[..., :keep].astype(mx.int32)                       # best first
    # a head's units past its own count sort last as `units`, then stand in for the last unit
    kept = mx.where(mx.arange(keep) < head_keep, best, units)
    picked = mx.minimum(mx.sort(kept, axis=-1), units - 1)
    return (picked[..., None] * unit_pages + mx.arange(unit_pages, dtype=mx.int32)).reshape(
        *picked.shape[:2], keep * unit_pages)


def choose_pages(q: mx.array, cache: PagedKVCache, layer: int, plan: CentroidPlan, scale: float) -> mx.array:
    """Logical pages of the chosen groups per sparse row and KV head, ascending, q [Bs, H, d] ->
    int32 [Bs, kv_heads, width * group_pages] with the layer's width (LayerChoice): each head's own
    count of groups first, then padding (the last group's pages past the sequence included):
    attention stops at the head's virtual length before it. With a shortlist, the groups are chosen
    among the best runs' (their pages in order, as one sequence per KV head)."""
    choice = plan.layers[layer]
    cents, cstats, short = cache.cents[layer], cache.cstats[layer], plan.shortlist
    if short is None:
        scores = group_scores(q, cents, cstats, plan.last_pages, plan.scored, scale)
        return best_units(scores, plan.bias, choice.width, plan.group_pages, choice.head_keep)
    runs = group_scores(q, cache.run_cents[layer], cache.run_cstats[layer], short.run_last, short.run_scored, scale)
    # every head keeps the shortlist's runs: it is sized by the layer's largest head (CentroidBudgets)
    logical = best_units(runs, short.run_bias, short.keep, short.run_pages, short.keep)   # [Bs, kvh, keep * run_pages]
    physical = mx.take_along_axis(plan.sparse_pages[:, None, :], logical, axis=-1)
    scores = group_scores(q, cents, cstats, physical[..., plan.group_pages - 1::plan.group_pages], short.scored,
                          scale)
    chosen = best_units(scores, short.bias, choice.width, plan.group_pages, choice.head_keep)
    return mx.take_along_axis(logical, chosen, axis=-1)


def chosen_lists(plan: CentroidPlan, chosen: mx.array, layer: int) -> tuple[mx.array, mx.array]:
    """Each head's chosen physical pages [Bs, kv_heads, k] and how many of their positions to read
    [Bs, kv_heads]: a head's own groups come first, ascending, the last of them the row's own last
    group, so it reads the first virtual_lengths tokens of its list (its layer's, per head)."""
    physical = mx.take_along_axis(plan.sparse_pages[:, None, :], chosen, axis=-1)
    return physical, plan.layers[layer].virtual_lengths
