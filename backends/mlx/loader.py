"""Load Llama-family weights into MLX arrays: a .gguf file, an HF safetensors folder, or an MLX
quantised folder (what `mlx_lm.convert -q` writes).

All three return the one ModelConfig (backends/cuda/loader.py) and a dict of arrays under Hugging
Face names without the "model." prefix, with Q/K rows in the rotate_half rotary layout, plus the
quantisation of every quantised linear: {module path: (group_size, bits)}. Quantised weights stay
packed (MLX affine: uint32 weight, scales, biases); nothing is dequantised here. mx.load reads a
GGUF's Q4_0/Q4_1 (and Q8_0) blocks as MLX affine weights with group size 32 already: the formats
are the same numbers (value = scale * q + bias per group of 32).
"""
from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx

from backends.cuda.loader import GGUF_ARCHS, HF_MODEL_TYPES, ModelConfig, gguf_dims, gguf_model_config, rope_settings

Quantization = dict[str, tuple[int, int]]          # module path -> (group_size, bits)
GGUF_GROUP_SIZE = 32                               # every GGUF block format mx.load reads packs 32 weights

# GGUF tensor name pieces -> HF names (per block, then whole-model).
_GGUF_BLOCK = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GGUF_TOP = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}


def load_model(kind: str, path: str) -> tuple[ModelConfig, dict[str, mx.array], Quantization]:
    """Load a ModelSource ("gguf" | "hf"); an "hf" folder whose config.json has `quantization`
    is an MLX quantised folder."""
    if kind == "gguf":
        return load_gguf(path)
    if kind == "hf":
        return load_folder(path)
    raise ValueError(f"the MLX backend cannot load model source kind {kind!r} (gguf, hf)")


def unpermute_rows(w: mx.array, n_head: int) -> mx.array:
    """Undo llama.cpp's Q/K row permutation (interleaved rotary pairs -> rotate_half halves).

    Rows are output features, and a quantisation group never spans rows, so the packed weight,
    its scales and its biases are all unpermuted by the same row shuffle."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _meta(metadata: dict, key: str, default=None):
    value = metadata.get(key, default)
    return value.item() if isinstance(value, mx.array) else value


def _gguf_name(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "blk":
        return f"layers.{parts[1]}.{_GGUF_BLOCK[parts[2]]}.{parts[3]}"
    return f"{_GGUF_TOP[parts[0]]}.{parts[1]}"


def load_gguf(path: str) -> tuple[ModelConfig, dict[str, mx.array], Quantization]:
    """A llama/qwen2 .gguf: block-quantised tensors stay packed 4- or 8-bit with group size 32."""
    raw, metadata = mx.load(path, return_metadata=True)
    arch = _meta(metadata, "general.architecture")
    if arch not in GGUF_ARCHS:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported (only {GGUF_ARCHS})")

    def meta(name, default=None):
        return _meta(metadata, f"{arch}.{name}", default)

    dims = gguf_dims(path, meta)
    heads, kv_heads = dims["num_heads"], dims["num_kv_heads"]

    weights: dict[str, mx.array] = {}
    freq_factors = None
    for name, array in raw.items():
        if name == "rope_freqs.weight":             # llama3 rope scaling, baked per frequency
            freq_factors = tuple(array.astype(mx.float32).tolist())
            continue
        parts = name.split(".")
        if arch == "llama" and parts[0] == "blk" and parts[2] in ("attn_q", "attn_k"):
            array = unpermute_rows(array, heads if parts[2] == "attn_q" else kv_heads)
        weights[_gguf_name(name)] = array
    quant = quantization_of(weights, lambda module: GGUF_GROUP_SIZE)
    unsupported = [n for n, w in weights.items() if n.endswith(".weight") and w.dtype == mx.uint32
                   and n.rsplit(".", 1)[0] not in quant]
    assert not unsupported, f"{path}: packed tensors without scales: {unsupported[:3]}"
    vocab = weights["embed_tokens.weight"].shape[0]
    config = gguf_model_config(meta, dims, vocab, weights, freq_factors)
    return config, weights, quant


def quantization_of(weights: dict[str, mx.array], group_size_of) -> Quantization:
    """(group_size, bits) of every module with packed weights: bits follow from the packed width,
    in_features = scales columns * group_size and packed columns = in_features * bits / 32."""
    quant: Quantization = {}
    for name, scales in weights.items():
        if not name.endswith(".scales"):
            continue
        module = name.removesuffix(".scales")
        packed = weights[f"{module}.weight"]
        group = group_size_of(module)
        bits, rest = divmod(packed.shape[-1] * 32, scales.shape[-1] * group)
        assert rest == 0 and bits in (2, 3, 4, 5, 6, 8), f"{module}: cannot infer bits from {packed.shape}"
        quant[module] = (group, bits)
    return quant


def load_folder(folder: str) -> tuple[ModelConfig, dict[str, mx.array], Quantization]:
    """config.json + *.safetensors: a Hugging Face checkpoint, or an MLX quantised one (its
    config.json's `quantization` gives the group size, globally and per module)."""
    root = Path(folder)
    cfg = json.loads((root / "config.json").read_text())
    if cfg.get("model_type") not in HF_MODEL_TYPES:
        raise ValueError(f"{folder}: model_type {cfg.get('model_type')!r} is not supported "
                         f"(only {HF_MODEL_TYPES})")
    weights: dict[str, mx.array] = {}
    for file in sorted(root.glob("*.safetensors")):
        for key, array in mx.load(str(file)).items():
            if key.endswith("rotary_emb.inv_freq"):   # stale buffer in old checkpoints; recomputed
                continue
            weights[key.removeprefix("model.")] = array
    spec = cfg.get("quantization") or cfg.get("quantization_config") or {}

    def group_size_of(module: str) -> int:
        override = spec.get(f"model.{module}", spec.get(module))
        source = override if isinstance(override, dict) else spec
        assert "group_size" in source, f"{folder}: packed weights of {module} but no quantization group_size"
        return int(source["group_size"])

    quant = quantization_of(weights, group_size_of)
    heads = cfg["num_attention_heads"]
    theta, scaling = rope_settings(cfg)
    tied = "lm_head.weight" not in weights
    if tied and not cfg.get("tie_word_embeddings", True):
        raise ValueError(f"{folder}: lm_head.weight is missing but tie_word_embeddings is false")
    config = ModelConfig(
        vocab_size=weights["embed_tokens.weight"].shape[0], hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"], num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, rope_theta=theta,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        context_length=int(cfg.get("max_position_embeddings", 2048)), tie_word_embeddings=tied,
        attention_bias="layers.0.self_attn.q_proj.bias" in weights, rope_scaling=scaling)
    return config, weights, quant
