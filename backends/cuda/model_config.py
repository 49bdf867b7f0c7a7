"""ModelConfig: the hyper-parameters of a Llama-family decoder, as the loaders read them."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a Llama-family decoder."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    context_length: int
    tie_word_embeddings: bool
    attention_bias: bool
    rope_scaling: tuple[tuple[str, float], ...] = ()           # e.g. (("rope_type", "llama3"), ...)
    rope_freq_factors: tuple[float, ...] | None = None           # GGUF rope_freqs: divides inv_freq
