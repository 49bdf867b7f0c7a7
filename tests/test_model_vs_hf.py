"""Our torch Llama over paged KV against Hugging Face transformers on the same weights.

Tolerances (float32): embedded SmolLM2 GGUF, last-token logits: max abs diff < 1e-3 and cosine
> 0.99999 (observed ~4e-5); tiny random Llama/Mistral/Qwen2 from an HF folder: max abs diff < 1e-4.
"""
from __future__ import annotations

import itertools
import os
import random

import numpy as np
import pytest
import torch

from backends.base import ForwardBatch, RunnerSettings, SequenceChunk
from backends.cuda.runner import TorchRunner
from backends.source import resolve_source

PAGE_SIZE = 16
GGUF_ATOL, GGUF_MIN_COS, TINY_ATOL = 1e-3, 0.99999, 1e-4
THREADS = 1          # the 2-core CI box is shared by parallel jobs: one thread wastes no spinning


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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(smol_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return model, tokenizer


@pytest.fixture(scope="module")
def smol_runner(smol_path) -> TorchRunner:
    return TorchRunner(RunnerSettings("gguf", smol_path, "smollm2", dtype="float32",
                                      page_size=PAGE_SIZE, num_pages=64, threads=THREADS))


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
    logits = smol_runner.forward(ForwardBatch([SequenceChunk(prompt, 0, table)])).logits
    got_logits, got_tokens = [logits[0]], []
    for step in range(steps):
        token = int(got_logits[-1].argmax())
        got_tokens.append(token)
        chunk = SequenceChunk([token], len(prompt) + step, table)
        got_logits.append(smol_runner.forward(ForwardBatch([chunk])).logits[0])

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
        chunk = SequenceChunk(prompt[start:end], start, table)
        got = smol_runner.forward(ForwardBatch([chunk])).logits[0]
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


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_tiny_hf_folder_matches_transformers(kind, tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(kind), dtype=torch.float32).eval()
    with torch.no_grad():                      # random biases: Qwen2 initialises them to zero
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(tmp_path, safe_serialization=True)
    ids = torch.randint(0, 256, (1, 90), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = model(ids).logits[0].numpy()

    runner = TorchRunner(RunnerSettings("hf", str(tmp_path), kind, page_size=PAGE_SIZE, num_pages=16,
                                         threads=THREADS))
    assert runner.config.attention_bias == (kind == "qwen2")
    tokens, table = ids[0].tolist(), shuffled_table(16, 90, seed=3)
    got = [runner.forward(ForwardBatch([SequenceChunk(tokens[:70], 0, table)])).logits[0]]
    for pos in range(70, 90):                  # decode across the page boundary at 80
        got.append(runner.forward(ForwardBatch([SequenceChunk([tokens[pos]], pos, table)])).logits[0])
    assert np.abs(np.stack(got) - expected[69:]).max() < TINY_ATOL
