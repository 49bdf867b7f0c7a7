"""The model's collectives: what the one model definition calls at the split points of tensor
parallelism, chosen once at start-up.

`SingleRank` (one device: the embedding lookup, the layer ops' add_rms_norm, nothing to gather),
`TorchCollectives` (torch.distributed over the model's process group, NCCL on CUDA and gloo on CPU:
the reference) and, on CUDA, backends/cuda/peer_all_reduce.py's one-shot kernels for small tensors.
Every all_reduce works in place and returns its argument (a fresh activation of the forward).

A split point is add_rms_norm(x, partial, weight): the ranks' row-parallel projections (o, down)
leave float32 partial sums (backends/cuda/linear.py, use_float32_output), which are added in
float32 and rounded once to the activation dtype, as one GPU rounds its whole projection, before
the residual add and the next RMSNorm. Rounding each partial and then their sum (three roundings
for one) made TP=2 drift from TP=1 through the layers of a random Llama-3-8B (docs/cuda.md).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

# torch 2.13 renamed all_gather_into_tensor (and warns on the old name); the device has 2.11
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class SingleRank:
    """The whole model on one device."""

    world = 1

    def __init__(self, ops):
        self.add_rms_norm = ops.add_rms_norm      # x += delta; rms_norm(x): the layer op itself

    def embed(self, token_ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.embedding(token_ids, weight)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def gather_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def share_from_first(self, values: torch.Tensor) -> None:
        pass


class TorchCollectives:
    """Collectives of one rank over `group`: its vocabulary rows are [vocab_start, vocab_start +
    vocab_shard) of vocab_size (the last shard padded with zero rows); ops: the layer ops."""

    def __init__(self, group, world: int, vocab_start: int, vocab_shard: int, vocab_size: int, ops):
        self.group, self.world, self.ops = group, world, ops
        self.vocab_start, self.vocab_shard, self.vocab_size = vocab_start, vocab_shard, vocab_size

    def embed(self, token_ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Vocabulary-parallel lookup: each rank fills the rows of its ids, zeros elsewhere, summed."""
        local = token_ids - self.vocab_start
        inside = (local >= 0) & (local < self.vocab_shard)
        rows = F.embedding(torch.where(inside, local, 0), weight)
        rows *= inside.unsqueeze(1).to(rows.dtype)
        return self.all_reduce(rows)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, group=self.group)
        return x

    def add_rms_norm(self, x: torch.Tensor, partial: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x += round(sum over ranks of partial) in place, then the layer ops' RMSNorm of x. The sum
        is float32 (a partial in another dtype, from a kernel that rounds, is widened first); NCCL
        and gloo leave the same sum on every rank (their last phase copies each reduced chunk to
        all), so the replicated residual stays identical across ranks."""
        summed = self.all_reduce(partial.float())
        return self.ops.add_rms_norm(x, summed.to(x.dtype), weight)

    def gather_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """[rows, vocab_shard] per rank -> [rows, vocab_size] on every rank."""
        rows = logits.shape[0]
        gathered = logits.new_empty(self.world * rows, self.vocab_shard)
        _all_gather(gathered, logits.contiguous(), group=self.group)
        whole = gathered.view(self.world, rows, self.vocab_shard).transpose(0, 1)
        return whole.reshape(rows, self.world * self.vocab_shard)[:, :self.vocab_size].contiguous()

    def share_from_first(self, values: torch.Tensor) -> None:
        """Every rank's `values` := rank 0's, in place (the drawn token ids, after rank 0 samples)."""
        dist.broadcast(values, src=0, group=self.group)
