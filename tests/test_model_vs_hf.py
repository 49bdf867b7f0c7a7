"""Our torch Llama over paged KV against Hugging Face transformers on the same weights.

Tolerances (float32): embedded SmolLM2 GGUF, last-token logits: max abs diff < 1e-3 and cosine
> 0.99999 (observed ~4e-5); tiny random Llama/Mistral/Qwen2 from an HF folder: max abs diff < 1e-4.
"""
from __future__ import annotations

import functools
import itertools
import os
import random

import numpy as np
import pytest
import torch

from backends.base import ForwardBatch, RunnerSettings, SampleSpec, SequenceChunk
from backends.cuda.loader import rope_settings
from backends.cuda.runner import TorchRunner
from backends.sampling_params import SamplingParams
from backends.source import resolve_source

PAGE_SIZE = 16
GGUF_ATOL, GGUF_MIN_COS, TINY_ATOL = 1e-3, 0.99999, 1e-4
THREADS = 1          # the 2-core CI box is shared by parallel jobs: one thread wastes no spinning
GREEDY = SampleSpec(SamplingParams(temperature=0), 0.5)
_EPOCHS: dict[tuple[int, ...], int] = {}


def last_logits(runner: TorchRunner, tokens: list[int], start: int, table: list[int]) -> np.ndarray:
    """One sequence (seq slot 0) runs `tokens` after `start` cached ones: its last token's logits.
    The table_epoch names the page table, so a new table is uploaded whole."""
    epoch = _EPOCHS.setdefault(tuple(table), len(_EPOCHS) + 1)
    chunk = SequenceChunk(tokens, start, table, seq_slot=0, table_epoch=epoch, sample=GREEDY)
    return runner.forward(ForwardBatch([chunk], return_logits=True)).logits[0]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))


def shuffled_table(num_pages: int, length: int, seed: int) -> list[int]:
    pages = list(range(num_pages))
    random.Random(seed).shuffle(pages)
    return pages[:-(-length // PAGE_SIZE)]


@pytest.fixture(scope="module")
def smol_path() -> str:
    return resolve_source("packaged:smollm2-135m-instruct").path


@pytest.fixture(scope="module")
def hf_smol(smol_path):
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF file")
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(smol_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    with pytest.MonkeyPatch.context() as patch:
        # transformers rebuilds gguf's tensor-name map for each of ~400 modules (a fifth of its load
        # time); the map is a pure function of (arch, layers) and is only read, so memoise it.
        patch.setattr(gguf, "get_tensor_name_map", functools.lru_cache(gguf.get_tensor_name_map))
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def smol_runner(smol_path) -> TorchRunner:
    return TorchRunner(RunnerSettings("gguf", smol_path, "smollm2", dtype="float32",
                                      page_size=PAGE_SIZE, num_pages=64, threads=THREADS, validate_batches=True))


@pytest.fixture(scope="module")
def prompt(hf_smol) -> list[int]:
    messages = [{"role": "user", "content": "Name three primary colours and say why they matter."}]
    ids = hf_smol[1].apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    return list(ids)


def test_gguf_hyper_parameters(smol_runner):
    config = smol_runner.config
    assert config.rope_theta == 100000.0          # SmolLM2's, not the 10000 default
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == (30, 9, 3, 64)
    assert config.tie_word_embeddings and config.context_length == 8192
    assert smol_runner.info.vocab_size == 49152


def test_prefill_and_greedy_decode_match_hf(smol_runner, hf_smol, prompt):
    model, _ = hf_smol
    steps = 32
    with torch.inference_mode():
        out = model(torch.tensor([prompt]), use_cache=True)
        expected_logits, expected_tokens = [out.logits[0, -1].numpy()], []
        for _ in range(steps):
            token = int(out.logits[0, -1].argmax())
            expected_tokens.append(token)
            out = model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
            expected_logits.append(out.logits[0, -1].numpy())

    table = shuffled_table(smol_runner.num_pages, len(prompt) + steps, seed=1)
    got_logits, got_tokens = [last_logits(smol_runner, prompt, 0, table)], []
    for step in range(steps):
        token = int(got_logits[-1].argmax())
        got_tokens.append(token)
        got_logits.append(last_logits(smol_runner, [token], len(prompt) + step, table))

    assert got_tokens == expected_tokens
    worst = max(float(np.abs(g - e).max()) for g, e in zip(got_logits, expected_logits, strict=True))
    assert worst < GGUF_ATOL
    assert min(cosine(g, e) for g, e in zip(got_logits, expected_logits, strict=True)) > GGUF_MIN_COS


def test_chunked_prefill_matches_hf(smol_runner, hf_smol, prompt):
    with torch.inference_mode():
        expected = hf_smol[0](torch.tensor([prompt])).logits[0].numpy()
    table = shuffled_table(smol_runner.num_pages, len(prompt), seed=2)
    cuts = [0, 11, 29, len(prompt)]               # 11 and 29: chunk ends inside pages
    for start, end in itertools.pairwise(cuts):
        got = last_logits(smol_runner, prompt[start:end], start, table)
        assert np.abs(got - expected[end - 1]).max() < GGUF_ATOL
        assert cosine(got, expected[end - 1]) > GGUF_MIN_COS


def test_gguf_loader_undoes_qk_permutation(smol_runner, hf_smol):
    ours, theirs = smol_runner.model.state_dict(), hf_smol[0].state_dict()
    for name in ("layers.0.self_attn.q_proj.weight", "layers.7.self_attn.k_proj.weight"):
        assert torch.equal(ours[name], theirs["model." + name])


def tiny_config(kind: str):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)
    if kind == "llama":              # llama3 rope scaling, untied head
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        return LlamaConfig(**sizes, rope_parameters=rope, tie_word_embeddings=False)
    if kind == "mistral":
        return MistralConfig(**sizes, tie_word_embeddings=False)
    return Qwen2Config(**sizes, tie_word_embeddings=True)   # q/k/v bias, tied head


def tiny_model(kind: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(kind), dtype=torch.float32).eval()
    with torch.no_grad():                      # random biases: Qwen2 initialises them to zero
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def assert_runner_matches(runner: TorchRunner, model) -> None:
    """Prefill 70 random tokens, decode 20 more across a page boundary; compare every logits row."""
    ids = torch.randint(0, 256, (1, 90), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = model(ids).logits[0].numpy()
    tokens, table = ids[0].tolist(), shuffled_table(runner.num_pages, 90, seed=3)
    got = [last_logits(runner, tokens[:70], 0, table)]
    for pos in range(70, 90):
        got.append(last_logits(runner, [tokens[pos]], pos, table))
    assert np.abs(np.stack(got) - expected[69:]).max() < TINY_ATOL


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_tiny_hf_folder_matches_transformers(kind, tmp_path):
    model = tiny_model(kind)
    model.save_pretrained(tmp_path, safe_serialization=True)
    runner = TorchRunner(RunnerSettings("hf", str(tmp_path), kind, page_size=PAGE_SIZE, num_pages=16,
                                        threads=THREADS, validate_batches=True))
    assert runner.config.attention_bias == (kind == "qwen2")
    assert runner.config.tie_word_embeddings == (kind == "qwen2")
    assert_runner_matches(runner, model)


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to Q/K rows of llama-architecture models."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
              "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "model.embed_tokens": "token_embd",
              "model.norm": "output_norm", "lm_head": "output"}


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_tiny_gguf_matches_transformers(kind, tmp_path):
    """A GGUF written as llama.cpp would (permuted Q/K for llama, rope_freqs for llama3 scaling)."""
    import gguf

    model, path = tiny_model(kind), tmp_path / "tiny.gguf"
    cfg, heads, kv_heads = model.config, model.config.num_attention_heads, model.config.num_key_value_heads
    writer = gguf.GGUFWriter(str(path), kind)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if kind == "llama":                        # llama.cpp stores llama3 scaling as frequency divisors
        head_dim = cfg.hidden_size // heads
        theta = cfg.rope_parameters["rope_theta"]
        plain = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
        writer.add_tensor("rope_freqs.weight", (plain / model.model.rotary_emb.inv_freq).numpy())
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        stem, leaf = name.rsplit(".", 1)
        if stem.startswith("model.layers."):
            layer, module = stem.removeprefix("model.layers.").split(".", 1)
            stem = f"blk.{layer}.{GGUF_NAMES[module]}"
        else:
            stem = GGUF_NAMES[stem]
        array = tensor.numpy()
        if kind == "llama" and stem.endswith(("attn_q", "attn_k")):
            array = llama_cpp_permute(array, heads if stem.endswith("attn_q") else kv_heads)
        writer.add_tensor(f"{stem}.{leaf}", array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    runner = TorchRunner(RunnerSettings("gguf", str(path), kind, page_size=PAGE_SIZE, num_pages=16,
                                        threads=THREADS, validate_batches=True))
    assert runner.config.rope_freq_factors is not None or kind == "qwen2"
    assert_runner_matches(runner, model)


def test_rope_settings_from_old_and_new_config_json():
    new = {"rope_parameters": {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0,
                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192}}
    old = {"rope_theta": 500000.0, "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 8192}}
    assert rope_settings(new) == rope_settings(old)
    assert rope_settings(new)[0] == 500000.0
    smollm2 = {"rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}}
    assert rope_settings(smollm2) == (100000.0, ())
    assert rope_settings({}) == (10000.0, ())
