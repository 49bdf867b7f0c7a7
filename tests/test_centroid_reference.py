"""kernels/reference.py's centroid group selector: k-means summaries of complete 64-token groups
(centroid_group_summaries, kmeans_keys) and the group scores read from them (centroid_group_logits).
The Triton scorer is checked against these in tests/test_centroid_kernel.py."""
import math

import torch

from kernels import centroid_reference as cref


def test_an_outlying_key_gets_a_centroid_of_its_own():
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=gen) * 4
    keys = centres[torch.arange(64) % 3] + 0.1 * torch.randn(64, 16, generator=gen)
    needle = torch.full((16,), 25.0)
    keys[37] = needle
    cents, counts, spread = cref.kmeans_keys(keys, torch.ones(64, dtype=torch.bool), clusters=4)
    alone = [c for c in range(4) if torch.equal(cents[c], needle)]
    assert len(alone) == 1, "the needle must be a centroid of its own"
    assert counts[alone[0]] == 1 and spread[alone[0]] == 0
    assert counts.sum() == 64


def test_one_centroid_per_key_gives_the_true_log_mass():
    """With as many centroids as keys every key is its own centroid (count 1, spread 0), so the
    estimate is the exact log-sum-exp of the group's attention logits."""
    page_size, group_pages, kv_heads, group, d = 4, 2, 2, 3, 8
    span = page_size * group_pages
    gen = torch.Generator().manual_seed(1)
    k_cache = torch.randn(12, page_size, kv_heads, d, generator=gen, dtype=torch.float64)
    table = torch.randperm(12, generator=gen)[:10]
    seq_len = 4 * span + 3
    cents = torch.full((12, kv_heads, span, d), float("nan"), dtype=torch.float64)
    stats = torch.full((12, kv_heads, span, 2), float("nan"), dtype=torch.float64)
    cref.centroid_group_summaries(k_cache, cents, stats, table, seq_len, page_size, group_pages)
    q = torch.randn(kv_heads * group, d, generator=gen, dtype=torch.float64)
    scale = 0.7
    got = cref.centroid_group_logits(q, cents, stats, table, seq_len, page_size, group_pages, scale)
    keys = k_cache[table.long()].reshape(-1, kv_heads, d)[:seq_len]                 # [T, kvh, d]
    logits = torch.einsum("hgd,thd->hgt", q.view(kv_heads, group, d), keys) * scale
    for n in range(4):
        want = logits[..., n * span:(n + 1) * span].logsumexp(-1) / scale
        torch.testing.assert_close(got[..., n].double(), want, rtol=1e-5, atol=1e-5)
    assert bool((got[..., 4] == float("-inf")).all()), "the incomplete last group scores -inf"


def test_summaries_sit_at_complete_groups_last_pages_only():
    page_size, group_pages, kv_heads, clusters, d = 4, 4, 2, 3, 8
    span = page_size * group_pages
    gen = torch.Generator().manual_seed(2)
    k_cache = torch.randn(20, page_size, kv_heads, d, generator=gen)
    table = torch.randperm(20, generator=gen)[:11]
    seq_len = 2 * span + 5                                     # groups 0, 1 complete; group 2 not
    cents = torch.full((20, kv_heads, clusters, d), float("nan"))
    stats = torch.full((20, kv_heads, clusters, 2), float("nan"))
    cref.centroid_group_summaries(k_cache, cents, stats, table, seq_len, page_size, group_pages)
    written = {int(table[3]), int(table[7])}
    for page in range(20):
        assert bool(torch.isfinite(cents[page]).all()) == (page in written)
    # counts add up to the group's keys, per KV head
    for page in written:
        torch.testing.assert_close(stats[page, :, :, 0].exp().sum(-1), torch.full((kv_heads,), float(span)))
    assert math.isfinite(float(stats[int(table[3])].sum()))
