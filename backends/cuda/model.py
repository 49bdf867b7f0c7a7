"""A plain PyTorch Llama decoder over a flattened batch of many sequences and a paged KV cache.

embed -> [RMSNorm -> attention (rotary, GQA, paged) -> residual -> RMSNorm -> SwiGLU -> residual]
x layers -> RMSNorm -> lm head (last token of the sequences that want logits only).
Module names follow Hugging Face, so the loader's tensors load with load_state_dict.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from backends.cuda.attention import (
    AttentionMetadata,
    PagedKVCache,
    attend,
    paged_attention,
    update_summaries,
)
from backends.cuda.linear import FastLinear
from backends.cuda.loader import ModelConfig
from kernels.cpu import build as cpu_kernels


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 whatever the weight dtype, as the reference implementation does.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rms_norm_fast(x: torch.Tensor, doubled_weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as one fused LayerNorm over [x, -x]: that vector has mean 0 and variance mean(x^2).

    Same result as RMSNorm (bit-identical on the default model's bf16 rows), but two kernels
    (cat, layer_norm) instead of torch's eight small ops for rms_norm: 2x faster for one row and
    3x for a 512-token prefill chunk on CPU. doubled_weight is cat([w, w]); returns a view.
    """
    hidden = x.shape[-1]
    return F.layer_norm(torch.cat((x, -x), dim=-1), (2 * hidden,), doubled_weight, None, eps)[..., :hidden]


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse rotary frequencies [head_dim / 2], float32, with linear or llama3 scaling."""
    dim = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    if config.rope_freq_factors is not None:          # GGUF bakes llama3 scaling into factors
        return inv_freq / torch.tensor(config.rope_freq_factors, dtype=torch.float32)
    scaling = dict(config.rope_scaling)
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, d]; cos, sin: [T, d]."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.heads, self.kv_heads = layer, config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        self.scale = 1.0 / math.sqrt(config.head_dim)
        q_size, kv_size = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, q_size, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_size, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_size, bias=bias)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: PagedKVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        tokens = x.shape[0]
        q = apply_rotary(self.q_proj(x).view(tokens, self.heads, self.head_dim), cos, sin)
        k = apply_rotary(self.k_proj(x).view(tokens, self.kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(tokens, self.kv_heads, self.head_dim)
        out = paged_attention(self.layer, q, k, v, cache, meta, self.scale)
        return self.o_proj(out.reshape(tokens, self.heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, cache, meta):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.inv_freq = rope_inv_freq(config)      # plain attribute: stays float32 under .to(dtype)
        self.fast: list[FastLayer] | None = None    # set by prepare(): the serving path

    @classmethod
    def from_weights(cls, config: ModelConfig, weights: dict[str, torch.Tensor],
                     device: torch.device | str, dtype: torch.dtype, mode: str | None = None
                     ) -> LlamaModel:
        """Build without allocating random weights, adopt the loaded tensors, prepare the fast path.

        mode: float32 | bfloat16 | int8 | int4 (weight-only, bfloat16 activations); None: from dtype.
        """
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(weights, strict=True, assign=True)
        model.inv_freq = rope_inv_freq(config).to(device)
        mode = mode or str(dtype).removeprefix("torch.")
        model = model.to(device=device).eval()
        if mode not in ("int8", "int4"):    # these quantise from the float32 weights as loaded
            model = model.to(dtype=dtype)
        model.prepare(mode)
        return model

    def rotary(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float().unsqueeze(1) * self.inv_freq.unsqueeze(0)
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    # ---- serving path -------------------------------------------------------------------------

    @torch.no_grad()
    def prepare(self, mode: str) -> None:
        """Fuse Q/K/V and gate/up into one weight each, prepare kernels, cache rotary tables.

        The modules keep their HF names and now hold views into the fused weights (state_dict
        still works and no second copy is kept). int8 replaces the weights by their int8 round trip.
        """
        self.mode = mode
        self.act_dtype = torch.bfloat16 if mode in ("int8", "int4") else self.embed_tokens.weight.dtype
        linears = []
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv_w = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
            qkv_b = None
            if attn.q_proj.bias is not None:
                qkv_b = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
            gate_up_w = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
            entry = FastLayer(
                ln1=None, ln2=None,
                qkv=FastLinear(qkv_w, qkv_b, mode), o=FastLinear(attn.o_proj.weight, None, mode),
                gate_up=FastLinear(gate_up_w, None, mode), down=FastLinear(mlp.down_proj.weight, None, mode))
            del qkv_w, gate_up_w
            q, kv = attn.heads * attn.head_dim, attn.kv_heads * attn.head_dim
            w = entry.qkv.weight
            attn.q_proj.weight = nn.Parameter(w[:q], requires_grad=False)
            attn.k_proj.weight = nn.Parameter(w[q:q + kv], requires_grad=False)
            attn.v_proj.weight = nn.Parameter(w[q + kv:], requires_grad=False)
            attn.o_proj.weight = nn.Parameter(entry.o.weight, requires_grad=False)
            inter = mlp.gate_proj.weight.shape[0]
            mlp.gate_proj.weight = nn.Parameter(entry.gate_up.weight[:inter], requires_grad=False)
            mlp.up_proj.weight = nn.Parameter(entry.gate_up.weight[inter:], requires_grad=False)
            mlp.down_proj.weight = nn.Parameter(entry.down.weight, requires_grad=False)
            linears.append(entry)
        # The head stays int8 under int4: GGUF files keep it (or the tied embedding) at 8 bits or
        # more, and 4 bits there moves the logits of every token.
        head_mode = "int8" if mode == "int4" else mode
        if self.config.tie_word_embeddings:
            # The embedding lookup keeps the unquantised table; only the head GEMV is quantised.
            self.head = FastLinear(self.embed_tokens.weight, None, head_mode)
        else:
            self.head = FastLinear(self.lm_head.weight, None, head_mode)
            self.lm_head.weight = nn.Parameter(self.head.weight, requires_grad=False)
        self.to(dtype=self.act_dtype)       # norms and embedding (the fused weights already are)
        for layer, entry in zip(self.layers, linears, strict=True):
            entry.ln1, entry.ln2 = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
            entry.ln1_pair, entry.ln2_pair = torch.cat([entry.ln1] * 2), torch.cat([entry.ln2] * 2)
        self.final_norm = torch.cat([self.norm.weight] * 2)
        self.fast = linears
        # On CPU the small ops between the matmuls run as fused kernels when they build here
        # (float32 and bfloat16 activations; float16 stays on the torch path).
        self.fused = (self.inv_freq.device.type == "cpu" and self.act_dtype in (torch.float32, torch.bfloat16)
                      and cpu_kernels.load().available)
        self._cos = self._sin = None
        self._grow_rotary(1024)

    def _grow_rotary(self, needed: int) -> None:
        """cos / signed-sin tables [positions, head_dim] in the activation dtype, grown by doubling."""
        size = 1024
        while size < needed:
            size *= 2
        positions = torch.arange(size, device=self.inv_freq.device)
        cos, sin = self.rotary(positions, self.act_dtype)
        half = sin.shape[1] // 2
        # rotate_half(x) * sin == roll(x, half) * [-sin_first_half, sin_second_half]
        self._cos, self._sin = cos, torch.cat((-sin[:, :half], sin[:, half:]), dim=1)

    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor, cache: PagedKVCache,
                meta: AttentionMetadata, logits_rows: torch.Tensor, max_position: int | None = None
                ) -> torch.Tensor:
        """token_ids, positions: [T]; logits_rows: [N] rows whose next-token logits to return."""
        if self.fast is None:
            return self.reference_forward(token_ids, positions, cache, meta, logits_rows)
        cfg = self.config
        if max_position is None:
            max_position = int(positions.max())
        if max_position >= self._cos.shape[0]:
            self._grow_rotary(max_position + 1)
        tokens = token_ids.shape[0]
        heads, kv_heads, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_size, qk_heads = heads * d, heads + kv_heads
        qk_size = qk_heads * d
        inter, eps = cfg.intermediate_size, cfg.rms_norm_eps
        scale = 1.0 / math.sqrt(d)
        half = d // 2
        x = F.embedding(token_ids, self.embed_tokens.weight)
        if self.fused:
            return self._forward_fused(x, positions, cache, meta, logits_rows)
        cos = self._cos[positions].unsqueeze(1)
        sin = self._sin[positions].unsqueeze(1)
        for layer, entry in enumerate(self.fast):
            h = rms_norm_fast(x, entry.ln1_pair, eps)
            qkv = entry.qkv(h)
            qk = qkv[:, :qk_size].view(tokens, qk_heads, d)
            # roll by half a head == swap the two halves: flip of a [2, half] view, one kernel
            swapped = qk.view(tokens, qk_heads, 2, half).flip(2).view(tokens, qk_heads, d)
            qk = torch.addcmul(qk * cos, swapped, sin)
            v = qkv[:, qk_size:].view(tokens, kv_heads, d)
            out = paged_attention(layer, qk[:, :heads], qk[:, heads:], v, cache, meta, scale)
            x += entry.o(out.reshape(tokens, q_size))       # x is this forward's own tensor
            h = rms_norm_fast(x, entry.ln2_pair, eps)
            gate_up = entry.gate_up(h)
            act = F.silu(gate_up[:, :inter]).mul_(gate_up[:, inter:])
            x += entry.down(act)
        if logits_rows.shape[0] != tokens:
            x = x[logits_rows]
        x = rms_norm_fast(x, self.final_norm, eps)
        return self.head(x).float()

    def _forward_fused(self, x: torch.Tensor, positions: torch.Tensor, cache: PagedKVCache,
                       meta: AttentionMetadata, logits_rows: torch.Tensor) -> torch.Tensor:
        """forward() with the CPU kernels of kernels/cpu/fused.cpp: per layer the four matmuls
        and five fused ops (norm, rotary + KV write, attention, residual add + norm, SiLU * up),
        where the torch path runs ~25 ops. Same arithmetic, rounded to the activation dtype once
        per op instead of after every step (tests/test_cpu_kernels.py, test_cpu_fast_path.py)."""
        ops = torch.ops.radixgate_cpu
        cfg = self.config
        tokens, eps = x.shape[0], cfg.rms_norm_eps
        heads, kv_heads, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_size, scale = heads * d, 1.0 / math.sqrt(d)
        layers = self.fast
        h = ops.rms_norm(x, layers[0].ln1, eps)
        for layer, entry in enumerate(layers):
            qkv = entry.qkv(h)          # [T, (H + 2 KV) d]: q and k rotated in place below
            ops.rotary_store(qkv, positions, self._cos, self._sin, heads, kv_heads,
                             cache.k_slots[layer], cache.v_slots[layer], meta.slots)
            if cache.kmin is not None:
                update_summaries(cache, layer, qkv[:, q_size:q_size + kv_heads * d].view(tokens, kv_heads, d), meta)
            q = qkv[:, :q_size].view(tokens, heads, d)
            out = attend(layer, q, cache, meta, scale, fused=True)
            h = ops.add_rms_norm(x, entry.o(out.reshape(tokens, q_size)), entry.ln2, eps)
            down = entry.down(ops.silu_mul(entry.gate_up(h)))
            next_norm = layers[layer + 1].ln1 if layer + 1 < len(layers) else self.norm.weight
            h = ops.add_rms_norm(x, down, next_norm, eps)
        if logits_rows.shape[0] != tokens:
            h = h[logits_rows]
        return self.head(h).float()

    def reference_forward(self, token_ids: torch.Tensor, positions: torch.Tensor, cache: PagedKVCache,
                          meta: AttentionMetadata, logits_rows: torch.Tensor) -> torch.Tensor:
        """The plain module-by-module forward (before prepare()): the readable reference."""
        x = self.embed_tokens(token_ids)
        cos, sin = self.rotary(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, cache, meta)
        x = self.norm(x[logits_rows])          # norm is per token: only the rows we need
        head = self.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight
        return F.linear(x, head).float()


@dataclass
class FastLayer:
    """One decoder layer's prepared weights: norms (plain for the fused CPU kernels, doubled for
    rms_norm_fast), fused QKV, output, fused gate/up, down."""

    ln1: torch.Tensor | None             # RMSNorm weights (fused kernels)
    ln2: torch.Tensor | None
    qkv: FastLinear
    o: FastLinear
    gate_up: FastLinear
    down: FastLinear
    ln1_pair: torch.Tensor | None = None  # cat([w, w]) for rms_norm_fast (torch path)
    ln2_pair: torch.Tensor | None = None
