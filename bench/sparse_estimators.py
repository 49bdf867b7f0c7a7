"""Page selectors that estimate attention mass instead of bounding it: a low-rank estimate of every
key's logit, and a few k-means centroids per group of pages. What each would select, computed from
the keys at every step (not a cache format yet).

    python bench/sparse_estimators.py --ranks 4 8 16 [sparse_quality.py args] --sweep rule=lowrank8 rule=kmeans4x4 ...

Why: bench/sparse_quality.py's `oracle` rules show that pages chosen by their true attention mass
meet every quality target, while the engine's min/max bounds need 4-token blocks (half the key
bytes) to come close. Attention logits q.k are close to low rank in practice (Loki, SparQ), so each
key is kept as r numbers k' = B k and each q head as q' = A q, with q'.k' ~ q.k.

A and B per layer and KV head are the best rank-r approximation of the bilinear form q.k under the
recorded statistics: with Mq = E[q q^T] (the group's q heads pooled, uncentred) and Ck the key
covariance (centred: q.mean(k) is the same for every key of one query, so it cannot change a
ranking or a softmax), the error E[(q.k - q'.k')^2] is ||Mq^1/2 (I - A^T B) Ck^1/2||^2, minimised by
the SVD of Mq^1/2 Ck^1/2 (Eckart-Young). B is scaled so that every k' channel has unit variance on
the calibration keys, so that 8-bit storage (float8 e4m3) uses its range.

Calibration: text past the quality bench's first 28k tokens (the bench never reads it): one prefill,
then `--calib-steps` teacher-forced decode steps whose queries are recorded (the engine's selection
runs meanwhile), and the keys of the whole context from the cache.

Rules added to sparse_quality.py (r among --ranks):
  lowrankR        every token's estimated logit, each page's log-sum-exp (its estimated mass),
                  log-softmax over the row's pages per q head, max over the GQA group: one stage.
  lowrankR-fp8    the same with k' rounded to float8 e4m3 (what an 8-bit store would select).
  lowrankR-sT     coarse to fine: the estimate shortlists T tokens' pages, the engine's 4-token
                  block bounds choose the budget among them (sa._select_from_shortlist).

The k-means rules (no calibration): each run of N pages (N x 16 keys) per KV head is summarised by
C centroids and their counts (k-means: farthest-point start, so an outlying key such as a needle
becomes a centroid of its own, then Lloyd steps). A group's mass is estimated as the log-sum-exp
over its centroids of scale * q.c + log n (+ scale^2 |q|^2 s^2 / 2 with "v": each cluster's
spread s^2, its mean squared distance per channel, as one more number). Log-softmax over the
row's groups per q head, max over the GQA group; every page scores its group's. Stored in 8 bits,
C centroids per N pages are C / (64 N) of the K/V bytes (C=4, N=4: 1/64).
  kmeansCxN[v|vg|vc][-fp8][-tail][-fp|-l16]  C centroids per N pages (e.g. kmeans4x4, kmeans8x4v); -fp8:
                  the centroids rounded to float8 e4m3 (what an 8-bit store would select); -tail:
                  the last group (the decode token's) forced instead of clustered (the engine's rule);
                  -fp: farthest-point centroids, no Lloyd steps; -l16: 16 Lloyd steps, not 8.
  kmeansCx4v-fp8-tail-qw[s|m]  the engine's rule (C 8 or 16) with the k-means distance weighing
                  each channel by the queries' energy in it (query_energy): qw the step's own
                  query (an upper bound), qws every query seen so far, qwm the layer's weights.
  kmeans8x4v-fp8-tail-h  the engine's rule, each group scored no lower than the score its exact
                  mass had among the groups attended at the row's previous step (what the
                  attention could hand the next step's selection: attention's own history).
  kmeans8x4v-fp8-tail-cCxN-sT  coarse to fine: C centroids per N pages score runs of N pages the
                  same way, the best T tokens' worth of runs shortlist the groups, and the rule
                  kmeans8x4v-fp8-tail chooses among them (kmeans_selector's `coarse`). Read at T a
                  few times the budget, C x (context / N) coarse centroids plus 8 per shortlisted
                  group replace 8 per group: fewer scoring bytes at long contexts.

Centroid decodes (run with --selector centroids; they replace the torch backend's sparse decode):
  shared-budget[-capX]  the engine's centroid scores, the budget shared by a layer's KV heads: the
                  row's best kv_heads x budget groups over every head at once, each head at most
                  X budgets (cap1: every head exactly its own, the engine's choice; no cap: any).
  group-sum, shared-budget-sum  the GQA group's log shares combined by their sum (log-sum-exp)
                  instead of their max, each head its own budget or the budget shared.
"""
from __future__ import annotations

import argparse
import itertools
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from backends.base import ForwardBatch, RunnerSettings, SequenceChunk, SparseSettings  # noqa: E402
from backends.cuda.attention import centroids as ce  # noqa: E402
from backends.cuda.attention import sparse as sa  # noqa: E402
from backends.cuda.attention.sparse_rows import counted_all_dense, merge_dense_rows  # noqa: E402
from backends.cuda.runner import TorchRunner  # noqa: E402
from backends.source import resolve_source  # noqa: E402
from bench import sparse_quality as sq  # noqa: E402
from kernels import centroid_reference as cref  # noqa: E402


def inverse_sqrt_and_sqrt(m: torch.Tensor, eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """m^-1/2 and m^1/2 of a symmetric PSD matrix, eigenvalues floored at eps * mean eigenvalue."""
    values, vectors = torch.linalg.eigh(m.double())
    values = values.clamp(min=eps * float(values.mean()))
    return (vectors * values.rsqrt()) @ vectors.T, (vectors * values.sqrt()) @ vectors.T


def bilinear_factors(mq: torch.Tensor, ck: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A [r, d] for queries and B [r, d] for keys with (A q).(B k) the best rank-r q.k under Mq, Ck;
    B's rows give unit variance under Ck."""
    mq_inv, mq_half = inverse_sqrt_and_sqrt(mq)
    ck_inv, ck_half = inverse_sqrt_and_sqrt(ck)
    u, s, vh = torch.linalg.svd(mq_half @ ck_half)
    a = u[:, :rank].T @ mq_inv * s[:rank].view(-1, 1)          # S_r U_r^T Mq^-1/2
    b = vh[:rank] @ ck_inv                                     # V_r^T Ck^-1/2: unit variance under Ck
    return a.float(), b.float()


class QueryMoments:
    """A page selector recording E[q q^T] per layer and KV head (the group's heads pooled), and
    choosing with the engine's rule meanwhile."""

    def __init__(self, cache_layers):
        self.cache_layers = cache_layers
        self.sums: dict[int, torch.Tensor] = {}
        self.counts: dict[int, int] = {}

    def __call__(self, q, kmin_layer, kmax_layer, pmin_layer, pmax_layer, plan, scale, fused):
        layer = self.cache_layers.index(kmin_layer)
        kv_heads, head_dim = kmin_layer.shape[-2:]
        qg = q.double().view(q.shape[0], kv_heads, -1, head_dim).transpose(0, 1).reshape(kv_heads, -1, head_dim)
        self.sums[layer] = self.sums.get(layer, 0) + qg.transpose(1, 2) @ qg
        self.counts[layer] = self.counts.get(layer, 0) + qg.shape[1]
        return sa.choose_pages(q, kmin_layer, kmax_layer, pmin_layer, pmax_layer, plan, scale, fused)


def calibrate(args, ranks: list[int]) -> dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """rank -> layer -> (A [kvh, r, d], B [kvh, r, d])."""
    source = resolve_source(args.model)
    tok = sq.Tokenizer(args.tokenizer_json, source)
    ids = tok.encode(sq.english_text())[args.skip_tokens:]
    context = args.calib_context
    assert len(ids) >= context, f"only {len(ids)} tokens past the bench's texts"
    text = ids[:context]
    budget = min(1024, (context - args.calib_steps) // 32 * 16)         # every recorded step runs sparse
    sparse = SparseSettings(True, budget, args.dense_layers, 16, 64, 4, 8192)
    runner = TorchRunner(RunnerSettings(source.kind, source.path, "lowrank", dtype="float32", device=args.device,
                                        page_size=16, num_pages=(context + 64) // 16 + 16,
                                        context_length=args.context_length, threads=args.threads,
                                        sparse=sparse, attention="torch"))
    if args.rope != "none":
        sq.stretch_positions(runner, args.rope)
    pages = sq.Pages(16)
    table = pages.take(context)
    start = context - args.calib_steps
    t0 = time.perf_counter()
    sq.prefill(runner, [(text[:start], table)], 1024)
    runner.sparse = runner.attention.sparse = sparse
    recorder = QueryMoments(sq.CacheLayers(runner))
    runner.attention.page_selector = recorder
    for pos in range(start, context):
        chunk = SequenceChunk([text[pos]], pos, table, seq_slot=0, table_epoch=next(sq.EPOCHS), sample=sq.GREEDY)
        runner.forward(ForwardBatch([chunk], return_logits=True))
    factors: dict[int, dict] = {r: {} for r in ranks}
    slots = torch.tensor(table, device=runner.cache.k.device)
    for layer, total in sorted(recorder.sums.items()):
        keys = runner.cache.k[layer].index_select(0, slots).double()            # [pages, page, kvh, d]
        keys = keys.flatten(0, 1)[:context].transpose(0, 1)                     # [kvh, T, d]
        centred = keys - keys.mean(dim=1, keepdim=True)
        ck = centred.transpose(1, 2) @ centred / keys.shape[1]
        mq = total / recorder.counts[layer]
        for r in ranks:
            a, b = zip(*(bilinear_factors(mq[h], ck[h], r) for h in range(keys.shape[0])), strict=True)
            factors[r][layer] = (torch.stack(a), torch.stack(b))
    sq.say(f"lowrank calibration: {context} tokens, {args.calib_steps} decode steps, {len(recorder.sums)} "
           f"layers, ranks {ranks} ({time.perf_counter() - t0:.0f} s)")
    del runner
    return factors


def fp8_round(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float8_e4m3fn).float()


def lowrank_page_scores(q, k_layer, plan, scale, a, b, fp8: bool) -> torch.Tensor:
    """Per row and KV head: each page's estimated log-mass, log-softmax over the row's pages per q
    head, max over the GQA group -> [B, kvh, P]."""
    keys, written = sq.grouped_keys(k_layer, plan, 1)                           # [B, P, page, kvh, d]
    batch, width, page_size, kv_heads, head_dim = keys.shape
    a, b = a.to(keys.device), b.to(keys.device)
    kp = torch.einsum("bpthd,hrd->bhptr", keys, b)                              # [B, kvh, P, page, r]
    if fp8:
        kp = fp8_round(kp)
    qp = torch.einsum("bhgd,hrd->bhgr", q.float().view(batch, kv_heads, -1, head_dim), a)
    logits = torch.einsum("bhgr,bhptr->bhgpt", qp, kp) * scale
    logits = logits.masked_fill(~written.view(batch, 1, 1, width, page_size), float("-inf"))
    mass = logits.logsumexp(dim=-1)                                             # [B, kvh, g, P]
    return (mass - mass.logsumexp(dim=-1, keepdim=True)).amax(dim=2)


def lowrank_selector(factors, fp8: bool, shortlist_tokens: int, cache_layers):
    def select(q, kmin_layer, kmax_layer, pmin_layer, pmax_layer, plan, scale, fused):
        a, b = factors[cache_layers.index(kmin_layer)]
        scores = lowrank_page_scores(q, cache_layers(kmin_layer), plan, scale, a, b, fp8)
        if not shortlist_tokens:
            return sa.select_pages(scores, plan.bias, plan.budget_pages)
        page_size = plan.slot.shape[0]
        width = plan.sparse_pages.shape[1]
        keep = min(width, max(shortlist_tokens // page_size, plan.budget_pages))
        shortlist = sa.select_pages(scores, plan.bias, keep)
        return sa._select_from_shortlist(q, kmin_layer, kmax_layer, shortlist, plan, scale)

    return select


def channel_variance(x: torch.Tensor, w: torch.Tensor, centroids: torch.Tensor, counts: torch.Tensor,
                     per_centroid: bool) -> torch.Tensor:
    """Per-channel variance of the written keys x [..., n, d] (w [..., n]) about their nearest
    centroid: per centroid [..., C, d], or pooled over the group's clusters [..., 1, d]."""
    assign = torch.nn.functional.one_hot((torch.cdist(x, centroids) ** 2).argmin(-1), centroids.shape[-2]).float()
    assign = assign * w.float().unsqueeze(-1)                                       # [..., n, C]
    resid = (x.unsqueeze(-2) - centroids.unsqueeze(-3)) ** 2                         # [..., n, C, d]
    total = (assign.unsqueeze(-1) * resid).sum(-3)                                   # [..., C, d]
    if per_centroid:
        return total / counts.clamp(min=1).unsqueeze(-1)
    return total.sum(-2, keepdim=True) / counts.sum(-1, keepdim=True).clamp(min=1).unsqueeze(-1)


# coarse (C', N', T) -> [pages the fine rule alone keeps that the coarse-to-fine rule also keeps, all of them]
SHORTLIST_RECALL: dict[tuple[int, int, int], list[int]] = {}


def weighted_kmeans(x: torch.Tensor, written: torch.Tensor, clusters: int, steps: int, weight: torch.Tensor):
    """cref.kmeans_keys under the distance sum_c weight_c (x_c - y_c)^2 (weight broadcast against
    x[..., 0, :]): k-means of x scaled by sqrt(weight), centroids scaled back (a cluster's mean
    commutes with the scaling), spread measured unweighted about them as kmeans_keys measures it."""
    root = weight.clamp(min=1e-6).sqrt().unsqueeze(-2)
    scaled, counts, _ = cref.kmeans_keys(x * root, written, clusters, steps)
    centroids = scaled / root
    onehot = torch.nn.functional.one_hot((torch.cdist(x * root, scaled) ** 2).argmin(-1), clusters).float()
    onehot = onehot * written.float().unsqueeze(-1)
    d2 = ((x.unsqueeze(-2) - centroids.unsqueeze(-3)) ** 2).sum(-1)             # [..., n, C]
    spread = (onehot * d2).sum(-2) / counts.clamp(min=1) / x.shape[-1]
    return centroids, counts, spread


def pair_mean(energy: torch.Tensor) -> torch.Tensor:
    """Average each channel's energy with its rotary partner (channel i with i + d/2, the
    rotate_half convention), so that weighted distances do not change when rope turns a pair."""
    first, second = energy.chunk(2, dim=-1)
    half = (first + second) / 2
    return torch.cat((half, half), dim=-1)


def unit_mean(energy: torch.Tensor) -> torch.Tensor:
    return energy / energy.mean(-1, keepdim=True).clamp(min=1e-12)


# layer -> [kv_heads, d] sums of q_c^2 over every query the rule has seen, and their count
SEEN_ENERGY: dict[int, list] = {}


def query_energy(how: str, q: torch.Tensor, kv_heads: int, layer: int, model) -> torch.Tensor:
    """Channel weights [B or 1, kvh, d] (mean 1) for the k-means distance: "step" the GQA group's
    mean q_c^2 at this step (an upper bound: a summary is written before its queries); "seen" the
    mean over every query of this layer so far, this step's included (what a calibration pass
    would learn); "model" from the weights alone, E[q_c^2] for a unit-variance normalised input:
    sum_j (W_q[c, j] g_j)^2 with g the layer's input-norm gain."""
    batch, head_dim = q.shape[0], q.shape[-1]
    if how == "step":
        return unit_mean(q.float().view(batch, kv_heads, -1, head_dim).pow(2).mean(2))
    if how == "seen":
        energy = q.float().view(batch, kv_heads, -1, head_dim).pow(2).sum((0, 2))
        entry = SEEN_ENERGY.setdefault(layer, [torch.zeros_like(energy), 0])
        entry[0] += energy
        entry[1] += batch
        return unit_mean(pair_mean(entry[0] / entry[1])).unsqueeze(0)
    layer_mod = model.layers[layer]
    w = layer_mod.self_attn.q_proj.weight.float() * layer_mod.input_layernorm.weight.float()
    energy = w.pow(2).sum(-1).view(kv_heads, -1, head_dim).mean(1).to(q.device)
    return unit_mean(pair_mean(energy)).unsqueeze(0)


def kmeans_group_mass(keys: torch.Tensor, written: torch.Tensor, q: torch.Tensor, scale: float, clusters: int,
                      steps: int, with_spread: bool, fp8: bool, tail_forced: bool, channels: str = "",
                      energy: torch.Tensor | None = None) -> tuple:
    """Each group's estimated log-mass per q head from C k-means centroids of its keys (keys [B, G,
    span, kvh, d] as sq.grouped_keys gives them) -> (mass [B, kvh, g, G], the tail group's mask
    [B, 1, 1, G] or None): the group holding the row's last token is -inf when tail_forced.
    energy [B or 1, kvh, d]: the k-means distance weighs each channel by it (query_energy)."""
    batch, groups, span, kv_heads, head_dim = keys.shape
    x = keys.permute(0, 1, 3, 2, 4)                                             # [B, G, kvh, span, d]
    w = written.view(batch, groups, 1, span).expand(batch, groups, kv_heads, span)
    if energy is not None:
        centroids, counts, spread = weighted_kmeans(x, w, clusters, steps, energy.unsqueeze(1))
    else:
        centroids, counts, spread = cref.kmeans_keys(x, w, clusters, steps)      # [B, G, kvh, C, (d)]
    if fp8:
        centroids = fp8_round(centroids)
    qg = q.float().view(batch, kv_heads, -1, head_dim) * scale                  # [B, kvh, g, d]
    logits = torch.einsum("bhgd,bnhcd->bhgnc", qg, centroids)
    if with_spread and channels:
        var = channel_variance(x, w, centroids, counts, channels == "centroid")  # [B, G, kvh, C|1, d]
        if channels == "group":
            shape = var / var.mean(-1, keepdim=True).clamp(min=1e-12)
            var = spread.unsqueeze(-1) * shape                                   # [B, G, kvh, C, d]
        if fp8:
            var = fp8_round(var)
        logits = logits + 0.5 * torch.einsum("bhgd,bnhcd->bhgnc", qg * qg, var)
    elif with_spread:
        logits = logits + 0.5 * (qg * qg).sum(-1)[..., None, None] * spread.permute(0, 2, 1, 3).unsqueeze(2)
    logits = logits + counts.permute(0, 2, 1, 3).unsqueeze(2).log()             # log 0 = -inf
    mass = logits.logsumexp(dim=-1)                                             # [B, kvh, g, G]
    partial = None
    if tail_forced:
        # the group holding the row's last token (the decode's own) has no summary yet: the
        # engine writes a group's after the step that completes it
        last = (written.view(batch, -1).sum(-1) - 1) // span                    # [B]
        partial = (torch.arange(groups, device=last.device) == last[:, None]).view(batch, 1, 1, groups)
        mass = mass.masked_fill(partial, float("-inf"))
    return mass, partial


def group_scores(mass: torch.Tensor, partial: torch.Tensor | None) -> torch.Tensor:
    """Log-softmax of each q head's group masses over the row, max over the GQA group; the tail
    group (partial) forced -> [B, kvh, G]."""
    scores = (mass - mass.logsumexp(dim=-1, keepdim=True)).amax(dim=2)
    return scores if partial is None else scores.masked_fill(partial.squeeze(1), float("inf"))


# layer -> (each row's length at the last step [B], each group's score from its exact attention
# mass at that step [B, kvh, G], -inf where the group was not attended)
HISTORY: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def attended_scores(keys: torch.Tensor, written: torch.Tensor, q: torch.Tensor, scale: float,
                    chosen_groups: torch.Tensor) -> torch.Tensor:
    """What the attention over the chosen groups knows once it has run: each chosen group's exact
    log-mass per q head, as a log-softmax over the chosen groups, max over the GQA group; -inf for
    the groups not chosen -> [B, kvh, G]. chosen_groups: bool [B, kvh, G]."""
    batch, groups, span, kv_heads, head_dim = keys.shape
    qg = q.float().view(batch, kv_heads, -1, head_dim) * scale
    logits = torch.einsum("bhgd,bnshd->bhgns", qg, keys)
    logits = logits.masked_fill(~written.view(batch, 1, 1, groups, span), float("-inf"))
    mass = logits.logsumexp(-1).masked_fill(~chosen_groups.unsqueeze(2), float("-inf"))   # [B, kvh, g, G]
    return (mass - mass.logsumexp(-1, keepdim=True)).amax(2)


def with_history(scores: torch.Tensor, layer: int, lengths: torch.Tensor) -> torch.Tensor:
    """The estimate, or the group's exact score at the row's previous step where that is higher
    (a row whose length is not one more than at the last call starts without history)."""
    if layer not in HISTORY:
        return scores
    last_lengths, last = HISTORY[layer]
    if last_lengths.shape != lengths.shape:
        return scores
    carried = torch.full_like(scores, float("-inf"))
    width = min(last.shape[-1], scores.shape[-1])
    carried[..., :width] = last[..., :width]
    carried = carried.masked_fill((lengths != last_lengths + 1).view(-1, 1, 1), float("-inf"))
    return torch.maximum(scores, carried)


def kmeans_selector(clusters: int, group_pages: int, with_spread: bool, fp8: bool, cache_layers, steps: int = 8,
                    tail_forced: bool = False, channels: str = "", coarse: tuple[int, int, int] | None = None,
                    query_weighting: str = "", history: bool = False):
    """tail_forced: as the engine keeps it, a group has centroids from the step after the one that
    completes it; the group holding the row's last token is left out of each head's softmax and
    always attended. channels (with the
    spread term): "group" scales each centroid's spread by its group's per-channel shape (one more
    d-vector per group: the pooled residual variance per channel, normalised to mean 1), so the
    term is scale^2 s_c^2 sum_d q_d^2 shape_d / 2 instead of scale^2 s_c^2 |q|^2 / 2; "centroid"
    uses each centroid's own per-channel variance (a second d-vector per centroid: twice the
    bytes, the reference for what anisotropy can give). coarse (C', N', T): coarse to fine: C'
    centroids per N' pages (N' a multiple of group_pages, same spread and rounding) score the row's
    runs of N' pages the same way; the best T tokens' worth of those runs (any run holding a forced
    page first) shortlist the groups, and the fine centroids choose the budget among the shortlisted
    groups only (their log-softmax is over the shortlist: a kernel would score nothing else)."""
    def select(q, kmin_layer, kmax_layer, pmin_layer, pmax_layer, plan, scale, fused):
        k_layer = cache_layers(kmin_layer)
        keys, written = sq.grouped_keys(k_layer, plan, group_pages)             # [B, G, span, kvh, d]
        energy = None
        if query_weighting:
            energy = query_energy(query_weighting, q, keys.shape[3], cache_layers.index(kmin_layer),
                                  cache_layers.model)
        mass, partial = kmeans_group_mass(keys, written, q, scale, clusters, steps, with_spread, fp8, tail_forced,
                                          channels, energy)
        width = plan.sparse_pages.shape[1]

        def choose(scores: torch.Tensor) -> torch.Tensor:
            """Group scores [B, kvh, G] -> the pages kept, every page scoring its group's."""
            return sa.select_pages(scores.repeat_interleave(group_pages, dim=-1)[..., :width], plan.bias,
                                   plan.budget_pages)

        def pick(group_mass: torch.Tensor) -> torch.Tensor:
            return choose(group_scores(group_mass, partial))

        if history:
            assert coarse is None, "the history prior is measured on the one-stage rule only"
            layer, lengths = cache_layers.index(kmin_layer), plan.sparse_lengths.clone()
            scores = with_history(group_scores(mass, partial), layer, lengths)
            chosen = choose(scores)
            chosen_groups = torch.zeros(*scores.shape, dtype=torch.bool, device=scores.device)
            chosen_groups.scatter_(-1, chosen // group_pages, True)
            HISTORY[layer] = lengths, attended_scores(keys, written, q, scale, chosen_groups)
            return chosen
        if coarse is None:
            return pick(mass)
        c_clusters, c_pages, tokens = coarse
        assert c_pages % group_pages == 0
        c_keys, c_written = sq.grouped_keys(k_layer, plan, c_pages)
        c_mass, c_partial = kmeans_group_mass(c_keys, c_written, q, scale, c_clusters, steps, with_spread, fp8,
                                              tail_forced)
        c_scores = group_scores(c_mass, c_partial)                              # [B, kvh, G']
        units = c_scores.shape[-1]
        bias = torch.nn.functional.pad(plan.bias, (0, units * c_pages - width), value=float("-inf"))
        bias = bias.view(*bias.shape[:2], units, c_pages).amax(-1)              # forced if any page is
        page_size = plan.slot.shape[0]
        keep = min(units, max(tokens // (page_size * c_pages), -(-plan.budget_pages // c_pages)))
        listed = torch.zeros_like(c_scores, dtype=torch.bool).scatter_(
            -1, (c_scores + bias).topk(keep, dim=-1, sorted=False).indices, True)
        listed = listed.repeat_interleave(c_pages // group_pages, dim=-1)[..., :mass.shape[-1]]
        chosen = pick(mass.masked_fill(~listed.unsqueeze(2), float("-inf")))
        # recall: how many of the pages the fine rule alone keeps the shortlist lets it keep
        alone = pick(mass)
        kept = torch.zeros(*chosen.shape[:2], width, dtype=torch.bool, device=chosen.device).scatter_(-1, chosen, True)
        counts = SHORTLIST_RECALL.setdefault(coarse, [0, 0])
        counts[0] += int(kept.gather(-1, alone).sum())
        counts[1] += alone.numel()
        return chosen

    return select


def row_group_scores(q: torch.Tensor, cache, layer: int, plan, scale: float, combine: str) -> torch.Tensor:
    """The engine's fine-stage scores of every group of the rows -> [Bs, kvh, G]: the GQA group's
    log shares (max, or with combine "sum" their log-sum-exp) plus the forcing bias. With a
    shortlist (coarse to fine), the groups of each head's shortlisted runs hold the fine stage's
    scores over the shortlist, as centroids.choose_pages computes them, and every other group -inf."""
    def combined(shares):
        return shares.amax(2) if combine == "max" else shares.logsumexp(2)
    short = plan.shortlist
    if short is None:
        return combined(ce.head_shares(q, cache.cents[layer], cache.cstats[layer], plan.last_pages, plan.scored,
                                       scale)) + plan.bias
    runs = ce.group_scores(q, cache.run_cents[layer], cache.run_cstats[layer], short.run_last, short.run_scored,
                           scale)
    logical = ce.best_units(runs + short.run_bias, short.keep, short.run_pages)   # [Bs, kvh, keep * run_pages]
    physical = plan.sparse_pages.gather(1, logical.flatten(1)).view_as(logical)
    fine = combined(ce.head_shares(q, cache.cents[layer], cache.cstats[layer],
                                   physical[..., plan.group_pages - 1::plan.group_pages], short.scored,
                                   scale)) + short.bias                            # [Bs, kvh, shortlisted]
    groups = plan.last_pages.shape[1]
    scores = fine.new_full((*fine.shape[:2], groups), float("-inf"))
    return scores.scatter_(2, logical[..., ::plan.group_pages] // plan.group_pages, fine)


def shared_budget_decode(cap: float, combine: str = "max", keep_of=None, observe=None):
    """The engine's centroid decode (the torch backend's, centroids.centroid_decode_attention) with
    the budget shared by a layer's KV heads: the same group scores (each q head's log-softmax over
    the row's groups, max over the GQA group: a log share of a head's estimated mass, so comparable
    across heads) keep kv_heads * budget_groups groups of the row over every head at once, forced
    groups first and each head at most cap * budget_groups (0: no cap; 1: each head its own
    budget, the engine's choice). A head whose attention is peaked gives groups to one whose
    attention is spread. combine "sum": the GQA group's shares summed (their log-sum-exp) instead
    of their max. The attention is a masked dense one over the row (the same result as reading the
    chosen groups' pages); with a shortlist, among its groups (row_group_scores). keep_of(budget_groups, layer): the
    groups a head keeps in that layer, one number or one per KV head (default: the budget);
    observe(layer, q, k, v, scores, plan, scale): called with the row's keys and values [Bs, kvh,
    T, d] and the scores before the choice (a recorder)."""
    def decode(q, cache, layer, meta, scale, dense_decode, fused):
        plan = ce.get_plan(cache, meta)
        if counted_all_dense(plan, meta):
            return dense_decode(q, cache, layer, meta, scale)
        q_sparse = q[plan.sparse_rows]
        scores = row_group_scores(q_sparse, cache, layer, plan, scale, combine)  # [Bs, kvh, G]
        batch, kv_heads, groups = scores.shape
        keep = torch.as_tensor(keep_of(plan.budget_groups, layer) if keep_of else plan.budget_groups,
                               device=q.device).expand(kv_heads).clamp(max=groups)   # [kvh] groups a head
        order = scores.flatten(1).argsort(dim=-1, descending=True)               # [Bs, kvh * G]
        onehot = torch.nn.functional.one_hot(order // groups, kv_heads)          # [Bs, kvh * G, kvh]
        rank = (onehot.cumsum(1) * onehot).sum(-1)                               # 1-based, within its head
        limit = (cap * keep).floor().long() if cap else torch.full_like(keep, groups)
        taken = rank <= limit[order // groups]
        taken &= taken.cumsum(1) <= int(keep.sum())
        picked = torch.zeros(batch, kv_heads * groups, dtype=torch.bool, device=q.device)
        picked = picked.scatter_(1, order, taken).view(batch, kv_heads, groups) & (plan.bias > float("-inf"))
        heads, head_dim = q.shape[1:]
        page_size = cache.page_size
        k = cache.k[layer][plan.sparse_pages].flatten(1, 2).transpose(1, 2)     # [Bs, kvh, T, d]
        v = cache.v[layer][plan.sparse_pages].flatten(1, 2).transpose(1, 2)
        tokens = k.shape[2]
        if observe:
            observe(layer, q_sparse, k, v, scores, plan, scale)
        mask = picked.repeat_interleave(plan.group_pages * page_size, dim=-1)[..., :tokens] & (
            torch.arange(tokens, device=q.device) < plan.sparse_lengths.view(-1, 1, 1))
        out = torch.nn.functional.scaled_dot_product_attention(
            q_sparse.view(batch, kv_heads, heads // kv_heads, head_dim), k.to(q.dtype), v.to(q.dtype),
            attn_mask=mask.unsqueeze(2), scale=scale).reshape(batch, heads, head_dim)
        return merge_dense_rows(q, out, cache, layer, meta, plan.rows, scale, fused)

    return decode


def register_kmeans() -> None:
    """kmeansCxN[v|vg|vc][-fp8][-tail][-fp|-l16]: -tail as the kernel design (the last, incomplete
    group forced); -fp: farthest-point centroids without Lloyd steps; -l16: 16 Lloyd steps (default
    8); vg / vc: the spread term per channel (kmeans_selector's channels "group" / "centroid")."""
    spreads = {"": (False, ""), "v": (True, ""), "vg": (True, "group"), "vc": (True, "centroid")}
    for clusters, group, v, q, tail, (lloyd, steps) in itertools.product(
            (1, 2, 4, 6, 8, 16), (1, 2, 4, 8), spreads, ("", "-fp8"), ("", "-tail"),
            (("", 8), ("-fp", 0), ("-l16", 16))):
        sq.EXTRA_RULES[f"kmeans{clusters}x{group}{v}{q}{tail}{lloyd}"] = (
            lambda cl, c=clusters, n=group, s=spreads[v], f=bool(q), t=bool(tail), k=steps:
            kmeans_selector(c, n, s[0], f, cl, k, t, s[1]))
    # the engine's rule with the k-means distance weighted per channel by the queries' energy
    # (query_energy: the step's own, every query seen, or the layer's weights')
    for clusters, (suffix, how) in itertools.product((8, 16), (("qw", "step"), ("qws", "seen"), ("qwm", "model"))):
        sq.EXTRA_RULES[f"kmeans{clusters}x4v-fp8-tail-{suffix}"] = (
            lambda cl, c=clusters, h=how: kmeans_selector(c, 4, True, True, cl, 8, True, query_weighting=h))
    # the engine's rule, each group scored no lower than its exact mass at the row's previous step
    sq.EXTRA_RULES["kmeans8x4v-fp8-tail-h"] = (
        lambda cl: kmeans_selector(8, 4, True, True, cl, 8, True, history=True))
    # coarse to fine over the engine's centroid rule (8 per 64 tokens, spread, 8 bits, tail forced):
    # kmeans8x4v-fp8-tail-cC'xN'-sT, C' centroids per N' pages shortlisting T tokens
    for coarse_clusters, coarse_pages, tokens in itertools.product((1, 2, 4, 8, 16, 32), (4, 8, 16, 32, 64),
                                                                    (512, 1024, 3072, 4096, 6144, 8192, 16384)):
        sq.EXTRA_RULES[f"kmeans8x4v-fp8-tail-c{coarse_clusters}x{coarse_pages}-s{tokens}"] = (
            lambda cl, c=coarse_clusters, n=coarse_pages, t=tokens:
            kmeans_selector(8, 4, True, True, cl, 8, True, "", (c, n, t)))


def register_decodes() -> None:
    """shared-budget[-capX]: the engine's centroid selector, its budget shared by a layer's KV
    heads (shared_budget_decode; X: each head's most, in budgets, e.g. cap1.5)."""
    sq.EXTRA_DECODES["shared-budget"] = lambda: shared_budget_decode(0.0)
    for cap in ("1", "1.25", "1.5", "2"):      # cap1: every head its own budget, the engine's choice
        sq.EXTRA_DECODES[f"shared-budget-cap{cap}"] = lambda c=float(cap): shared_budget_decode(c)
    # the GQA group's shares summed, not their max: each head its own budget, or shared
    sq.EXTRA_DECODES["group-sum"] = lambda: shared_budget_decode(1.0, "sum")
    sq.EXTRA_DECODES["shared-budget-sum"] = lambda: shared_budget_decode(0.0, "sum")


def register(factors) -> None:
    for r, layers in factors.items():
        sq.EXTRA_RULES[f"lowrank{r}"] = lambda cl, f=layers: lowrank_selector(f, False, 0, cl)
        sq.EXTRA_RULES[f"lowrank{r}-fp8"] = lambda cl, f=layers: lowrank_selector(f, True, 0, cl)
        for tokens in (2048, 4096, 8192):
            sq.EXTRA_RULES[f"lowrank{r}-s{tokens}"] = lambda cl, f=layers, t=tokens: lowrank_selector(f, False, t, cl)
            sq.EXTRA_RULES[f"lowrank{r}-fp8-s{tokens}"] = (
                lambda cl, f=layers, t=tokens: lowrank_selector(f, True, t, cl))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False, allow_abbrev=False)
    parser.add_argument("--ranks", type=int, nargs="+", default=[8])
    parser.add_argument("--calib-context", type=int, default=7000)
    parser.add_argument("--calib-steps", type=int, default=256)
    parser.add_argument("--skip-tokens", type=int, default=28000, help="text the quality bench uses, skipped")
    # shared with sparse_quality.py (read here, passed on as well)
    parser.add_argument("--model", default="packaged:smollm2-135m-instruct")
    parser.add_argument("--tokenizer-json", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rope", default="none")
    parser.add_argument("--context-length", type=int, default=8192)
    parser.add_argument("--dense-layers", type=int, default=2)
    parser.add_argument("--text-file", default=None)
    args, rest = parser.parse_known_args()
    sq.TEXT_FILE = args.text_file           # the calibration reads the bench's text too
    register_kmeans()
    register_decodes()
    if any("lowrank" in item for item in rest):
        register(calibrate(args, args.ranks))
    passed = ["--model", args.model, "--device", args.device, "--rope", args.rope,
              "--context-length", str(args.context_length), "--dense-layers", str(args.dense_layers)]
    if args.tokenizer_json:
        passed += ["--tokenizer-json", args.tokenizer_json]
    if args.text_file:
        passed += ["--text-file", args.text_file]
    if args.threads:
        passed += ["--threads", str(args.threads)]
    sys.argv = ["bench/sparse_quality.py"] + passed + rest
    # a run cut short (a time limit's SIGTERM) still reports the recall counted so far
    signal.signal(signal.SIGTERM, lambda *_: (report_recall(), sys.exit(143)))
    sq.main()
    report_recall()


def report_recall() -> None:
    for (clusters, pages, tokens), (kept, total) in SHORTLIST_RECALL.items():
        print(f"shortlist recall, {clusters} centroids per {pages} pages shortlisting {tokens} tokens: {kept} of "
              f"{total} pages the fine rule alone keeps ({kept / total:.2%}; every budget and sparse layer pooled)",
              flush=True)


if __name__ == "__main__":
    main()
