"""Load Llama-family weights (Llama 2/3, Mistral, Qwen2, SmolLM) from a .gguf file or an HF folder.

Both loaders return the same thing: a ModelConfig and a dict of tensors named as in Hugging Face
checkpoints without the "model." prefix (embed_tokens.weight, layers.0.self_attn.q_proj.weight, ...,
norm.weight, lm_head.weight when untied), with Q/K rows in the HF rotate_half rotary layout.
With world > 1 the tensors are rank `rank`'s shards (backends/cuda/shard.py) and the config is
still the whole model's: HF checkpoints read only the shard from the file, GGUF files and random
weights make each whole tensor on the CPU (or, random, on the device) one at a time and keep the shard.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from backends.cuda.model_config import ModelConfig
from backends.cuda.shard import ShardPlan
from backends.gguf_file import GGUFFile

GGUF_ARCHS = ("llama", "qwen2")      # llama also covers Mistral and SmolLM (llama.cpp converts them so)
HF_MODEL_TYPES = ("llama", "mistral", "qwen2")

# GGUF tensor name pieces -> HF names (per block, then whole-model).
_GGUF_BLOCK = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GGUF_TOP = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}


def load_model(kind: str, path: str, dtype: torch.dtype = torch.float32, rank: int = 0, world: int = 1
               ) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Load from a ModelSource's kind ("gguf" | "hf" | "random") and path (for random: an
    ARCHITECTURES name); tensors are converted one by one. world > 1: rank's shards only."""
    if kind == "random":
        return random_weights(path, dtype, rank=rank, world=world)
    if kind == "gguf":
        config, weights = load_gguf(path, dtype)
        if world > 1:
            plan = ShardPlan(config, rank, world)
            weights = {name: plan.apply(name, weights.pop(name)) for name in list(weights)}
        return config, weights
    if kind == "hf":
        return load_hf_folder(path, dtype, rank, world)
    raise ValueError(f"unknown model source kind {kind!r}")


def unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (interleaved rotary pairs -> HF rotate_half halves)."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_dims(path: str, meta) -> dict:
    """The attention shape and rope scaling of a GGUF file's metadata (meta(key, default) reads
    "<arch>.<key>"), as ModelConfig fields; shared by every backend's GGUF loader."""
    hidden, heads = int(meta("embedding_length")), int(meta("attention.head_count"))
    head_dim = int(meta("attention.key_length", hidden // heads))
    rope_dim = int(meta("rope.dimension_count", head_dim))
    assert rope_dim == head_dim, f"partial rotary ({rope_dim} of {head_dim}) is not supported"
    scaling = ()
    scaling_type = meta("rope.scaling.type")
    if scaling_type not in (None, "none"):
        if scaling_type != "linear":
            raise ValueError(f"{path}: GGUF rope scaling {scaling_type!r} is not supported")
        scaling = (("rope_type", "linear"), ("factor", float(meta("rope.scaling.factor"))))
    return dict(hidden_size=hidden, num_heads=heads, num_kv_heads=int(meta("attention.head_count_kv", heads)),
                head_dim=head_dim, rope_scaling=scaling)


def gguf_model_config(meta, dims: dict, vocab_size: int, names, freq_factors) -> ModelConfig:
    """The ModelConfig of a GGUF file: its metadata, gguf_dims() and the loaded tensor names."""
    return ModelConfig(
        vocab_size=vocab_size, intermediate_size=int(meta("feed_forward_length")),
        num_layers=int(meta("block_count")), rope_theta=float(meta("rope.freq_base", 10000.0)),
        rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-5)),
        context_length=int(meta("context_length", 2048)),
        tie_word_embeddings="lm_head.weight" not in names,
        attention_bias="layers.0.self_attn.q_proj.bias" in names,
        rope_freq_factors=freq_factors, **dims)


def load_gguf(path: str, dtype: torch.dtype = torch.float32
              ) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Dequantise every tensor of a llama/qwen2 .gguf file at load."""
    import gguf

    file = GGUFFile(path)
    arch = file.fields.get("general.architecture")
    if arch not in GGUF_ARCHS:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported (only {GGUF_ARCHS})")

    def meta(name, default=None):
        return file.fields.get(f"{arch}.{name}", default)

    dims = gguf_dims(path, meta)
    heads, kv_heads = dims["num_heads"], dims["num_kv_heads"]

    weights: dict[str, torch.Tensor] = {}
    freq_factors = None
    for t in tqdm(file.tensors, desc=f"loading {Path(path).name}", unit="tensor"):
        array = gguf.quants.dequantize(t.data, gguf.GGMLQuantizationType(t.tensor_type))
        array = np.asarray(array, dtype=np.float32).reshape([int(n) for n in reversed(t.shape)])
        tensor = torch.from_numpy(array.copy())     # copy: the memmap behind F32 tensors is read-only
        if t.name == "rope_freqs.weight":            # llama3 rope scaling, baked per frequency
            freq_factors = tuple(tensor.tolist())
            continue
        parts = t.name.split(".")
        if parts[0] == "blk":
            name = f"layers.{parts[1]}.{_GGUF_BLOCK[parts[2]]}.{parts[3]}"
        else:
            name = f"{_GGUF_TOP[parts[0]]}.{parts[1]}"
        if arch == "llama" and parts[0] == "blk" and parts[2] in ("attn_q", "attn_k"):
            tensor = unpermute_rows(tensor, heads if parts[2] == "attn_q" else kv_heads)
        weights[name] = tensor.to(dtype)

    config = gguf_model_config(meta, dims, weights["embed_tokens.weight"].shape[0], weights, freq_factors)
    return config, weights


def rope_settings(cfg: dict) -> tuple[float, tuple[tuple[str, float], ...]]:
    """(rope_theta, scaling items) from config.json: transformers 5 keeps both in rope_parameters."""
    params = dict(cfg.get("rope_parameters") or {})
    params.update(cfg.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    if rope_type == "default":
        return theta, ()
    if rope_type not in ("linear", "llama3"):
        raise ValueError(f"rope type {rope_type!r} is not supported (default, linear, llama3)")
    return theta, (("rope_type", rope_type), *sorted((k, float(v)) for k, v in params.items()
                                                     if isinstance(v, (int, float))))


def load_hf_folder(folder: str, dtype: torch.dtype = torch.float32, rank: int = 0, world: int = 1
                   ) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Load config.json + *.safetensors of a Llama/Mistral/Qwen2 Hugging Face checkpoint
    (world > 1: only rank's shard of each tensor is read from the file)."""
    from safetensors import safe_open

    root = Path(folder)
    cfg = json.loads((root / "config.json").read_text())
    if cfg.get("model_type") not in HF_MODEL_TYPES:
        raise ValueError(f"{folder}: model_type {cfg.get('model_type')!r} is not supported "
                         f"(only {HF_MODEL_TYPES})")
    files = sorted(root.glob("*.safetensors"))
    handles = [safe_open(str(f), framework="pt") for f in files]
    keys = [(h, k) for h in handles for k in h.keys()
            if not k.endswith("rotary_emb.inv_freq")]     # stale buffer in old checkpoints; recomputed
    names = {k.removeprefix("model."): h for h, k in keys}
    embed_handle, embed_key = next((h, k) for h, k in keys if k.removeprefix("model.") == "embed_tokens.weight")

    heads = cfg["num_attention_heads"]
    theta, scaling = rope_settings(cfg)
    tied = "lm_head.weight" not in names
    if tied and not cfg.get("tie_word_embeddings", True):
        raise ValueError(f"{folder}: lm_head.weight is missing but tie_word_embeddings is false")
    config = ModelConfig(
        vocab_size=embed_handle.get_slice(embed_key).get_shape()[0],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        rope_theta=theta,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        context_length=int(cfg.get("max_position_embeddings", 2048)),
        tie_word_embeddings=tied,
        attention_bias="layers.0.self_attn.q_proj.bias" in names,
        rope_scaling=scaling,
    )
    plan = ShardPlan(config, rank, world) if world > 1 else None
    weights: dict[str, torch.Tensor] = {}
    for handle, key in tqdm(keys, desc=f"loading {root.name}", unit="tensor"):
        name = key.removeprefix("model.")
        part = plan.part(name) if plan else None
        if part is None:
            tensor = handle.get_tensor(key)
        else:                   # read only the shard's rows or columns
            dim, start, stop = part
            piece = handle.get_slice(key)
            tensor = plan.pad(name, piece[start:stop] if dim == 0 else piece[:, start:stop])
        weights[name] = tensor.to(dtype)
    return config, weights


CPU_DRAW_PARAMS = 2_000_000_000
# Named architectures for random-weight benchmarks (the device machine cannot download weights).
ARCHITECTURES = {
    "llama-3-8b": ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                              num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
                              rms_norm_eps=1e-5, context_length=131072, tie_word_embeddings=False,
                              attention_bias=False),
    "llama-3-70b": ModelConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80,
                               num_heads=64, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
                               rms_norm_eps=1e-5, context_length=131072, tie_word_embeddings=False,
                               attention_bias=False),
    "llama-3.2-1b": ModelConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
                                num_heads=32, num_kv_heads=8, head_dim=64, rope_theta=500000.0,
                                rms_norm_eps=1e-5, context_length=131072, tie_word_embeddings=True,
                                attention_bias=False),
    # every code path at CPU-test sizes (head_dim 64: what the Triton kernels take)
    "tiny": ModelConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=3, num_heads=4,
                        num_kv_heads=2, head_dim=64, rope_theta=10000.0, rms_norm_eps=1e-5,
                        context_length=4096, tie_word_embeddings=False, attention_bias=False),
}


def random_weights(name: str, dtype: torch.dtype, device: torch.device | str = "cpu", seed: int = 0,
                   rank: int = 0, world: int = 1) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A named architecture with random weights (std 0.02, norms 1). Up to CPU_DRAW_PARAMS they are
    drawn on the CPU, so one seed gives the same weights on every device (tests compare a GPU run
    with the CPU path); larger ones (benchmarks only) are drawn on the device, which takes seconds
    where the CPU takes minutes. world > 1: every rank draws each whole tensor in the same order
    (the same weights as world 1) and keeps its shard; one whole tensor exists at a time."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown random architecture {name!r} (one of {sorted(ARCHITECTURES)})")
    cfg = ARCHITECTURES[name]
    plan = ShardPlan(cfg, rank, world) if world > 1 else None
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes = {"embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size)}
    for i in range(cfg.num_layers):
        block = f"layers.{i}."
        shapes |= {block + "self_attn.q_proj.weight": (q, cfg.hidden_size),
                   block + "self_attn.k_proj.weight": (kv, cfg.hidden_size),
                   block + "self_attn.v_proj.weight": (kv, cfg.hidden_size),
                   block + "self_attn.o_proj.weight": (cfg.hidden_size, q),
                   block + "mlp.gate_proj.weight": (cfg.intermediate_size, cfg.hidden_size),
                   block + "mlp.up_proj.weight": (cfg.intermediate_size, cfg.hidden_size),
                   block + "mlp.down_proj.weight": (cfg.hidden_size, cfg.intermediate_size)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    on_cpu = sum(math.prod(shape) for shape in shapes.values()) <= CPU_DRAW_PARAMS
    draw_device = "cpu" if on_cpu else device
    gen = torch.Generator(device=draw_device).manual_seed(seed)
    weights = {}
    for key, shape in shapes.items():
        whole = torch.randn(shape, generator=gen, device=draw_device).mul_(0.02)
        weights[key] = (plan.apply(key, whole) if plan else whole).to(device=device, dtype=dtype)
        del whole
    for i in range(cfg.num_layers):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            weights[f"layers.{i}.{norm}.weight"] = torch.ones(cfg.hidden_size, device=device, dtype=dtype)
    weights["norm.weight"] = torch.ones(cfg.hidden_size, device=device, dtype=dtype)
    return cfg, weights
