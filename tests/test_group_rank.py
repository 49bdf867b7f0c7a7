"""Rank selection of groups (kernels/triton/group_rank.py) against the radix search
(selection.combine_select) it stands in for, on CPU under the Triton interpreter: the same kept
groups per row and KV head, each kept group's pages at its slot, the recent groups last, the same
virtual lengths and padding. Rows of several lengths (within the budget, ending inside a group, on
a group boundary), exact ties (duplicated groups: the lower index wins in both), several programs
per row and one."""
import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")

pytestmark = pytest.mark.usefixtures("triton_interpreter")


@pytest.mark.parametrize("block_i, block_j", [(None, None), (16, 16), (64, 32)])
@pytest.mark.parametrize("force", [(6, 1, 1), (8, 2, 2)])
def test_rank_select_keeps_what_the_radix_search_keeps(block_i, block_j, force):
    from kernels.triton.group_rank import rank_select
    from kernels.triton.selection import combine_select
    group_pages, page_size, kv_heads, group = 4, 8, 2, 3
    span = group_pages * page_size
    lens = torch.tensor([40 * span, 17 * span + 3, 5 * span, 1, 33 * span - 1], dtype=torch.int32)
    batch, groups = len(lens), 44
    gen = torch.Generator().manual_seed(sum(force))
    table = torch.randperm(batch * groups * group_pages + 7, generator=gen)[:batch * groups * group_pages]
    table = table.view(batch, groups * group_pages).int().contiguous()
    logits = torch.randn(batch, kv_heads * group, groups, generator=gen) * 3
    logits[:, :, 9] = logits[:, :, 4]                         # exact ties: group 4 must win over 9
    logits[:, :, 20] = logits[:, :, 21]
    for b, n in enumerate(lens.tolist()):                     # what the scorer writes past the scored
        logits[b, :, (n - 1) // span] = float("-inf")
    scale = 0.7
    budget = force[0]
    want_logical, want_physical, want_vlens = combine_select(logits, table, lens, span, kv_heads, force, scale,
                                                             budget, expand=group_pages)
    logical, physical, vlens = rank_select(logits, table, lens, span, kv_heads, force, scale, group_pages,
                                           block_i=block_i, block_j=block_j)
    assert torch.equal(vlens, want_vlens)
    assert logical.shape == want_logical.shape and physical.shape == want_physical.shape
    for b, n in enumerate(lens.tolist()):
        n_groups = -(-n // span)
        k = min(n_groups, budget)
        for h in range(kv_heads):
            got = logical[b, h, :k]
            assert torch.equal(got.sort().values, want_logical[b, h, :k]), (b, h)
            recent = force[2] if n_groups > budget else k
            assert torch.equal(got[k - recent:], torch.arange(n_groups - recent, n_groups, dtype=torch.int32))
            pages = (got.long()[:, None] * group_pages + torch.arange(group_pages)).flatten()
            assert torch.equal(physical[b, h, :k * group_pages], table[b, pages])
            assert bool((logical[b, h, k:] == -1).all()) and bool((physical[b, h, k * group_pages:] == 0).all())
        if n_groups > budget:                                 # best first among the candidates
            kept = logical[b, 0, :k - force[2]]
            assert 4 not in kept.tolist() or 9 not in kept.tolist() or kept.tolist().index(4) < kept.tolist().index(9)
