"""How one model splits over tensor-parallel ranks (Megatron-style), by Hugging Face weight name.

Column-parallel (rows of the weight split): q_proj, k_proj, v_proj by whole heads, gate_proj and
up_proj by MLP columns, the embedding and the lm head by vocabulary rows. Row-parallel (columns
split): o_proj and down_proj, whose partial outputs the ranks sum (one all-reduce after attention,
one after the MLP). Norms are replicated. A rank's shard has exactly the shapes of the model
described by `local_config`, so the one model definition (backends/cuda/model.py) serves any rank.
The vocabulary is padded up to a multiple of the ranks with zero rows; the padded logits are cut
off after the gather.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:       # the loader imports this module
    from backends.cuda.model_config import ModelConfig

ROW_SPLIT = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")      # output features split
COLUMN_SPLIT = ("o_proj", "down_proj")                                   # input features split
VOCAB_SPLIT = ("embed_tokens.weight", "lm_head.weight")


@dataclass(frozen=True)
class ShardPlan:
    """Rank `rank` of `world`'s share of a model of `config` (the whole model's hyper-parameters)."""

    config: ModelConfig
    rank: int
    world: int

    def __post_init__(self) -> None:
        cfg, n = self.config, self.world
        assert 0 <= self.rank < n
        for what, count in (("attention heads", cfg.num_heads), ("KV heads", cfg.num_kv_heads),
                            ("MLP columns (intermediate_size)", cfg.intermediate_size)):
            if count % n:
                raise ValueError(f"tensor_parallel_size {n} does not divide the model's {count} {what}")

    @property
    def vocab_shard(self) -> int:
        return -(-self.config.vocab_size // self.world)

    @property
    def vocab_start(self) -> int:
        return self.rank * self.vocab_shard

    @property
    def local_config(self) -> ModelConfig:
        """The hyper-parameters of this rank's shard, read as a model of its own."""
        cfg, n = self.config, self.world
        return replace(cfg, num_heads=cfg.num_heads // n, num_kv_heads=cfg.num_kv_heads // n,
                       intermediate_size=cfg.intermediate_size // n, vocab_size=self.vocab_shard)

    def part(self, name: str) -> tuple[int, int, int] | None:
        """(dim, start, stop) of this rank's slice of the whole tensor `name`; None: replicated.
        Vocabulary slices may run past the real rows (pad() fills them)."""
        cfg, local, r = self.config, self.local_config, self.rank
        if name in VOCAB_SPLIT:
            return 0, self.vocab_start, min(self.vocab_start + self.vocab_shard, cfg.vocab_size)
        module = name.rsplit(".", 2)[-2] if name.count(".") >= 2 else ""
        sizes = {"q_proj": local.num_heads * cfg.head_dim, "k_proj": local.num_kv_heads * cfg.head_dim,
                 "v_proj": local.num_kv_heads * cfg.head_dim, "gate_proj": local.intermediate_size,
                 "up_proj": local.intermediate_size, "o_proj": local.num_heads * cfg.head_dim,
                 "down_proj": local.intermediate_size}
        if module in ROW_SPLIT:
            return 0, r * sizes[module], (r + 1) * sizes[module]
        if module in COLUMN_SPLIT and name.endswith(".weight"):
            return 1, r * sizes[module], (r + 1) * sizes[module]
        return None

    def pad(self, name: str, piece: torch.Tensor) -> torch.Tensor:
        """A vocabulary slice padded with zero rows to vocab_shard (the last rank's, when the ranks
        do not divide the vocabulary); anything else as it is."""
        missing = self.vocab_shard - piece.shape[0] if name in VOCAB_SPLIT else 0
        if missing <= 0:
            return piece
        return torch.cat([piece, piece.new_zeros(missing, *piece.shape[1:])])

    def apply(self, name: str, whole: torch.Tensor) -> torch.Tensor:
        """This rank's shard of the whole tensor `name` (a copy: the whole one can be freed)."""
        part = self.part(name)
        if part is None:
            return whole.clone()
        dim, start, stop = part
        return self.pad(name, whole.narrow(dim, start, stop - start).clone())

    def describe(self) -> str:
        cfg, local = self.config, self.local_config
        return (f"rank {self.rank} of {self.world}: {local.num_heads} of {cfg.num_heads} heads, "
                f"{local.num_kv_heads} of {cfg.num_kv_heads} KV heads, {local.intermediate_size} of "
                f"{cfg.intermediate_size} MLP columns, vocabulary rows [{self.vocab_start}, "
                f"{self.vocab_start + self.vocab_shard}) of {cfg.vocab_size}")
