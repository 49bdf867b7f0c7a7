"""The k-means centroid group scores (kernels/triton/centroids.py) vs kernels/reference.py, on CPU
under the Triton interpreter (the triton_interpreter fixture, tests/conftest.py).

Ragged lengths: some end on a group boundary, some inside the last group (whose score must be 0)
and inside its last page. Every page that holds no complete group's summary has NaN centroids and
stats, so a read of the wrong page shows up as NaN; the output is NaN-filled past the rows' groups
only by the launcher's torch.empty, and only the rows' groups are compared."""
import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")

from kernels import reference as ref  # noqa: E402
from kernels.triton.centroids import centroid_group_logits  # noqa: E402

pytestmark = pytest.mark.usefixtures("triton_interpreter")


@pytest.mark.parametrize("clusters, group, group_pages", [(4, 4, 4), (8, 3, 4), (2, 1, 2)])
def test_centroid_group_logits(clusters, group, group_pages):
    page_size, kv_heads, head_dim = 8, 2, 32
    span = page_size * group_pages
    lens = [5 * span, 3 * span + 1, 4 * span - 3, span - 1]
    gen = torch.Generator().manual_seed(clusters * 10 + group)
    used = [-(-n // page_size) for n in lens]
    num_pages = sum(used) + 2
    cents = torch.full((num_pages, kv_heads, clusters, head_dim), float("nan"))
    stats = torch.full((num_pages, kv_heads, clusters, 2), float("nan"))
    perm = torch.randperm(num_pages - 1, generator=gen)
    width = -(-max(used) // group_pages) * group_pages + group_pages
    table = torch.full((len(lens), width), num_pages - 1, dtype=torch.int32)
    at = 0
    for i, n in enumerate(lens):
        table[i, :used[i]] = perm[at:at + used[i]].int()
        at += used[i]
        last = table[i, group_pages - 1:(n // span) * group_pages:group_pages].long()
        cents[last] = torch.randn(len(last), kv_heads, clusters, head_dim, generator=gen)
        stats[last, ..., 0] = torch.rand(len(last), kv_heads, clusters, generator=gen) * 3
        stats[last, ..., 1] = torch.rand(len(last), kv_heads, clusters, generator=gen)
    q = torch.randn(len(lens), kv_heads * group, head_dim, generator=gen)
    scale = head_dim ** -0.5
    out = centroid_group_logits(q, cents, stats, table, torch.tensor(lens, dtype=torch.int32), page_size,
                                group_pages, scale, interpreted=True)
    for i, n in enumerate(lens):
        want = ref.centroid_group_logits(q[i], cents, stats, table[i], n, page_size, group_pages, scale)
        got = out[i, :, :want.shape[-1]].view(want.shape)
        assert torch.isfinite(got).all(), "a wrong page was read or a group left unwritten"
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        if n % span:
            assert bool((got[..., -1] == 0).all()), "the incomplete last group must score 0"
