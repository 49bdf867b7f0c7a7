"""The one-launch selection and attention for few rows (kernels/triton/select_attend.py) against
the three-launch path it replaces (combine_select, then split_k_decode over its pages with splits
over the table's capacity) and against the reference selector and attention, on CPU under the
Triton interpreter (the triton_interpreter fixture, tests/conftest.py)."""
import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")

from kernels import centroid_reference as cref  # noqa: E402
from kernels import reference as ref  # noqa: E402
from kernels.triton.centroid_scores import centroid_group_logits  # noqa: E402
from kernels.triton.decode import split_k_decode  # noqa: E402
from kernels.triton.select_attend import select_attend  # noqa: E402
from kernels.triton.selection import combine_select  # noqa: E402

pytestmark = pytest.mark.usefixtures("triton_interpreter")


@pytest.mark.parametrize("split_groups,sort", [(1, None), (2, None), (2, "sort"), (2, "topk")])
def test_select_attend_matches_the_three_launches_and_the_reference(split_groups, sort):
    """Rows longer than the budget (one ending inside a group, one on a group boundary) and one
    within it (every group kept, the splits past its end empty)."""
    page_size, group_pages, kv_heads, group, head_dim, clusters = 8, 2, 2, 2, 64, 4
    span = page_size * group_pages
    budget_tokens, sink_tokens, recent_tokens = 6 * span, span, span
    lens = [20 * span + 5, 3 * span - 2, 13 * span]
    gen = torch.Generator().manual_seed(7)
    used = [-(-n // page_size) for n in lens]
    num_pages = sum(used) + 1
    k = torch.randn(num_pages, page_size, kv_heads, head_dim, generator=gen)
    v = torch.randn(num_pages, page_size, kv_heads, head_dim, generator=gen)
    width = -(-max(used) // group_pages) * group_pages
    table = torch.full((len(lens), width), num_pages - 1, dtype=torch.int32)
    perm, at = torch.randperm(num_pages - 1, generator=gen), 0
    cents = torch.zeros(num_pages, kv_heads, clusters, head_dim)
    stats = torch.zeros(num_pages, kv_heads, clusters, 2)
    for i, n in enumerate(lens):
        table[i, :used[i]] = perm[at:at + used[i]].int()
        at += used[i]
        cref.centroid_group_summaries(k, cents, stats, table[i], n, page_size, group_pages)
    q = torch.randn(len(lens), kv_heads * group, head_dim, generator=gen)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    scale = head_dim ** -0.5
    force = ref.sparse_page_counts(span, budget_tokens, sink_tokens, recent_tokens)
    logits = centroid_group_logits(q, cents, stats, table, seq_lens, page_size, group_pages, scale, interpreted=True)
    got = select_attend(q, k, v, logits, table, seq_lens, span, force, scale, split_groups=split_groups,
                        sort=sort)
    _, physical, vlens = combine_select(logits, table, seq_lens, span, kv_heads, force, scale, force[0],
                                        expand=group_pages)
    three = split_k_decode(q, k, v, physical, vlens, scale, num_splits=force[0] // split_groups,
                           block_n=span * split_groups, fixed_splits=True)
    assert torch.equal(got, three)
    for i, n in enumerate(lens):
        want = cref.centroid_select_pages(q[i], cents, stats, table[i], n, page_size, group_pages, scale,
                                          budget_tokens, sink_tokens, recent_tokens)
        torch.testing.assert_close(got[i], ref.attend_pages(q[i], k, v, table[i], n, want, scale),
                                   rtol=1e-4, atol=1e-4)
