"""A Llama decoder over a flattened batch of many sequences and a paged KV cache.

embed -> [RMSNorm -> attention (rotary, GQA, paged) -> residual -> RMSNorm -> SwiGLU -> residual]
x layers -> RMSNorm -> lm head (the rows whose next token is sampled only).
Under tensor parallelism the module holds one rank's shard (backends/cuda/shard.py: a model of
fewer heads, MLP columns and vocabulary rows) and its collectives (backends/cuda/collectives.py)
sum the float32 partial outputs after attention and after the MLP (with the residual add and the
next RMSNorm: comm.add_rms_norm), and gather the vocabulary's logits; on one device add_rms_norm
is the layer op itself and the rest are no-ops.
The modules only hold weights under Hugging Face names, so the loader's tensors load with
load_state_dict; prepare() fuses them for serving, and forward() is the one serving path: the
small ops go through the layer ops and attention through the attention backend, both chosen once
at start-up (backends/cuda/layer_ops.py, backends/cuda/attention/).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from backends.cuda.attention.base import AttentionBackend
from backends.cuda.collectives import SingleRank
from backends.cuda.layer_ops import TorchLayerOps
from backends.cuda.linear import FastLinear
from backends.cuda.loader import ModelConfig


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


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse rotary frequencies [head_dim / 2], float32, with linear or llama3 scaling."""
    dim = config.head_dim
    # on the CPU whatever the default device: under from_weights' meta device the arithmetic would
    # run through torch's reference ops, whose first use imports torch._dynamo (~2 s a start)
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim)
    if config.rope_freq_factors is not None:          # GGUF bakes llama3 scaling into factors
        return inv_freq / torch.tensor(config.rope_freq_factors, dtype=torch.float32, device="cpu")
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
    def __init__(self, config: ModelConfig):
        super().__init__()
        q_size, kv_size = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, q_size, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_size, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_size, bias=bias)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=False)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)


@dataclass
class FastLayer:
    """One decoder layer's prepared weights: norms (in the layer ops' form), fused QKV, output,
    fused gate/up, down."""

    ln1: torch.Tensor
    ln2: torch.Tensor
    qkv: FastLinear
    o: FastLinear
    gate_up: FastLinear
    down: FastLinear


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        # the table given, not drawn: from_weights builds on the meta device, where drawing the
        # normal init imports torch._dynamo (2-3 s of every engine start on a 2-core host)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.inv_freq = rope_inv_freq(config)      # plain attribute: stays float32 under .to(dtype)
        self.fast: list[FastLayer] = []            # set by prepare()
        self.comm = None                           # the split points' collectives (from_weights)

    @classmethod
    def from_weights(cls, config: ModelConfig, weights: dict[str, torch.Tensor],
                     device: torch.device | str, dtype: torch.dtype, mode: str, ops: TorchLayerOps,
                     comm=None) -> LlamaModel:
        """Build without allocating random weights, adopt the loaded tensors, prepare for serving.

        mode: float32 | bfloat16 | float16 | int8 | int4 (weight-only, bfloat16 activations).
        config and weights: one rank's shard under tensor parallelism, with that rank's comm.
        """
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(weights, strict=True, assign=True)
        model.inv_freq = rope_inv_freq(config).to(device)
        model = model.to(device=device).eval().requires_grad_(False)
        if mode not in ("int8", "int4"):    # these quantise from the float32 weights as loaded
            model = model.to(dtype=dtype)
        model.prepare(mode, ops)
        model.comm = comm or SingleRank(ops)
        if model.comm.world > 1:    # row-parallel partial sums stay float32 until the ranks add them
            for entry in model.fast:
                entry.o.use_float32_output()
                entry.down.use_float32_output()
        return model

    def rotary_tables(self, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed-sin tables [max_positions, head_dim] in the activation dtype, made once
        at start-up (graphs need fixed tables): rotate_half(x) * sin == swap_halves(x) * sin_signed."""
        positions = torch.arange(max_positions, device=self.inv_freq.device)
        freqs = positions.float().unsqueeze(1) * self.inv_freq.unsqueeze(0)
        angles = torch.cat((freqs, freqs), dim=-1)
        cos, sin = angles.cos().to(self.act_dtype), angles.sin().to(self.act_dtype)
        half = sin.shape[1] // 2
        return cos.contiguous(), torch.cat((-sin[:, :half], sin[:, half:]), dim=1).contiguous()

    @torch.no_grad()
    def prepare(self, mode: str, ops: TorchLayerOps) -> None:
        """Fuse Q/K/V and gate/up into one weight each and prepare norms for the layer ops.

        The modules keep their HF names and now hold views into the fused weights (state_dict
        still works and no second copy is kept). int8/int4 replace the weights by their round trip.
        """
        self.mode, self.ops = mode, ops
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
                ln1=layer.input_layernorm.weight, ln2=layer.post_attention_layernorm.weight,
                qkv=FastLinear(qkv_w, qkv_b, mode), o=FastLinear(attn.o_proj.weight, None, mode),
                gate_up=FastLinear(gate_up_w, None, mode), down=FastLinear(mlp.down_proj.weight, None, mode))
            del qkv_w, gate_up_w
            q, kv = attn.q_proj.weight.shape[0], attn.k_proj.weight.shape[0]
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
            entry.ln1 = ops.prepare_norm(layer.input_layernorm.weight)
            entry.ln2 = ops.prepare_norm(layer.post_attention_layernorm.weight)
            ops.prepare_linears(entry.qkv, entry.o, entry.gate_up, entry.down)
        self.final_norm = ops.prepare_norm(self.norm.weight)
        ops.prepare_head(self.head)
        self.fast = linears

    def forward(self, token_ids: torch.Tensor, attention: AttentionBackend,
                logits_rows: torch.Tensor | None) -> torch.Tensor:
        """token_ids: [T] of the step attention.plan() was given; logits_rows: [N] rows whose
        next-token logits to return (None: every row) -> float32 [N, vocab]."""
        ops, layers, comm = self.ops, self.fast, self.comm
        x = comm.embed(token_ids, self.embed_tokens.weight)
        h = ops.rms_norm(x, layers[0].ln1)
        for index, entry in enumerate(layers):
            out = attention.forward(index, entry.qkv(h))       # rotary, KV write, attention
            h = comm.add_rms_norm(x, entry.o(out), entry.ln2)   # x += the ranks' sum; RMSNorm
            down = ops.mlp_down(entry.gate_up(h), entry.down)
            next_norm = layers[index + 1].ln1 if index + 1 < len(layers) else self.final_norm
            h = comm.add_rms_norm(x, down, next_norm)           # the last one is the final norm
        if logits_rows is not None and logits_rows.shape[0] != h.shape[0]:
            h = h[logits_rows]
        return comm.gather_vocab(self.head(h)).float()
