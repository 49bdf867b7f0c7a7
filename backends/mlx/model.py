"""A Llama decoder in MLX over a flattened batch of many sequences and a paged KV cache.

embed -> [RMSNorm -> attention (rotary, GQA, paged) -> residual -> RMSNorm -> SwiGLU -> residual]
x layers -> RMSNorm -> lm head (the rows whose next token is sampled only).
The shape of mlx-lm's models/llama.py, with its MLP and rotary modules reused; attention is ours
because mlx-lm's cache is one contiguous buffer per sequence and ours is pages shared through the
radix cache (backends/mlx/attention.py). Quantised linears are nn.QuantizedLinear: MLX's
quantized matmul reads the packed weights, nothing is dequantised in memory. On the CPU the runner
swaps every linear for backends/mlx/cpu_linear.py's float32 ColumnSplitLinear after loading.
"""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.llama import MLP, ModelArgs
from mlx_lm.models.rope_utils import initialize_rope

from backends.cuda.loader import ModelConfig
from backends.mlx.attention import PagedAttention


def mlx_lm_args(config: ModelConfig) -> ModelArgs:
    """Our ModelConfig as mlx-lm's ModelArgs, for the mlx-lm modules we reuse."""
    scaling = dict(config.rope_scaling) or None
    return ModelArgs(
        model_type="llama", hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
        intermediate_size=config.intermediate_size, num_attention_heads=config.num_heads,
        rms_norm_eps=config.rms_norm_eps, vocab_size=config.vocab_size, head_dim=config.head_dim,
        max_position_embeddings=config.context_length, num_key_value_heads=config.num_kv_heads,
        attention_bias=config.attention_bias, rope_theta=config.rope_theta, rope_scaling=scaling,
        tie_word_embeddings=config.tie_word_embeddings)


class FactorRoPE(nn.Module):
    """Rotary with per-frequency divisors baked into a GGUF (rope_freqs.weight, llama3 scaling):
    inv_freq / factor, i.e. wavelengths theta^(2i/d) * factor, as backends/cuda/model.py does."""

    def __init__(self, dims: int, base: float, factors: tuple[float, ...]):
        super().__init__()
        assert len(factors) == dims // 2, f"{len(factors)} rope factors for head_dim {dims}"
        self.dims = dims
        self._freqs = (base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)) * mx.array(factors)

    def __call__(self, x: mx.array, offset: mx.array) -> mx.array:
        return mx.fast.rope(x, self.dims, traditional=False, base=None, scale=1.0, offset=offset,
                            freqs=self._freqs)


class Attention(nn.Module):
    """The projections of one layer; the paged attention itself is shared by all layers."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden, d, bias = config.hidden_size, config.head_dim, config.attention_bias
        self.q_proj = nn.Linear(hidden, config.num_heads * d, bias=bias)
        self.k_proj = nn.Linear(hidden, config.num_kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(hidden, config.num_kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(config.num_heads * d, hidden, bias=False)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(args)
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class LlamaModel(nn.Module):
    """Weights under Hugging Face names (without "model."), so the loader's dict loads as is."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        args = mlx_lm_args(config)
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [Block(config, args) for _ in range(config.num_layers)]
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.rope_freq_factors:
            self.rope = FactorRoPE(config.head_dim, config.rope_theta, config.rope_freq_factors)
        else:
            self.rope = initialize_rope(config.head_dim, config.rope_theta, False, args.rope_scaling,
                                        config.context_length)

    def rotate(self, x: mx.array, positions: mx.array) -> mx.array:
        """x: [T, heads, d] rotated at positions [T] (each token its own batch row for mx.fast.rope)."""
        return self.rope(x[:, :, None, :], offset=positions)[:, :, 0, :]

    def __call__(self, token_ids: mx.array, attention: PagedAttention, logits_rows: mx.array | None
                 ) -> mx.array:
        """token_ids: [T] of the step attention.plan() was given; logits_rows: [N] rows whose
        next-token logits to return (None: every row) -> float32 [N, vocab]."""
        cfg, plan = self.config, attention.step
        tokens = token_ids.shape[0]
        x = self.embed_tokens(token_ids)
        for index, layer in enumerate(self.layers):
            proj = layer.self_attn
            h = layer.input_layernorm(x)
            q = self.rotate(proj.q_proj(h).reshape(tokens, cfg.num_heads, cfg.head_dim), plan.positions)
            k = self.rotate(proj.k_proj(h).reshape(tokens, cfg.num_kv_heads, cfg.head_dim), plan.positions)
            v = proj.v_proj(h).reshape(tokens, cfg.num_kv_heads, cfg.head_dim)
            out = attention(index, q, k, v)                       # writes k, v into the pages first
            x = x + proj.o_proj(out.reshape(tokens, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        if logits_rows is not None and logits_rows.shape[0] != tokens:
            x = x[logits_rows]
        h = self.norm(x)
        # a tied head reads the embedding, unless the CPU linears gave it its own copy (cpu_linear.py)
        head = self.lm_head(h) if "lm_head" in self else self.embed_tokens.as_linear(h)
        return head.astype(mx.float32)
