"""Same request, same answer: batch-invariant kernels and what they promise a user.

Kernels: the CPU int4/int8 matmul (kernels/cpu/quant_linear.cpp) and the CPU prefill attention give
a row the same bits alone or among others; the deterministic CUDA paths (invariant Triton matmul,
split-K decode with fixed splits) the same, under the Triton interpreter. The runner: the embedded
model at the default dtype writes bit-identical KV whether a prompt is prefilled in one chunk or
many, or decoded token by token. Over HTTP (real server, default dtype): a seeded temperature-1
request gives the same text cold, cached, batched with 8 and with 32 other streams; greedy streams
survive preemption unchanged; n > 1 choices with a seed repeat.
"""
from __future__ import annotations

import asyncio
import importlib
import uuid

import httpx
import numpy as np
import openai
import pytest
import torch
import torch.nn.functional as F

from backends.base import ForwardBatch, RunnerSettings, SampleSpec, SequenceChunk
from backends.cuda.linear import FastLinear, quantize_int4, quantize_int8
from backends.cuda.runner import TorchRunner
from backends.sampling_params import SamplingParams
from backends.source import resolve_source
from kernels import reference
from kernels.cpu import quant_linear
from tests.conftest import MODEL, model_config, start_server

needs_quant = pytest.mark.skipif(not quant_linear.available(),
                                 reason="quant_linear needs the CPU kernels (AVX-512 BF16, or AVX2 and FMA)")
GREEDY = SampleSpec(SamplingParams(temperature=0), 0.0)


# ---- CPU kernels --------------------------------------------------------------------------------

@needs_quant
@pytest.mark.parametrize("mode", ["int4", "int8"])
@pytest.mark.parametrize("n,k", [(80, 64), (96, 576), (576, 1536)])
def test_quant_linear_is_row_invariant_and_exact_to_its_rounding(mode, n, k):
    torch.manual_seed(n + k)
    weight = torch.randn(n, k) * 0.05
    linear = FastLinear(weight, torch.randn(n) * 0.1, mode)
    assert linear.quant is not None and linear.q4 is None
    wide = torch.randn(140, k + 32).bfloat16()
    x = wide[:, :k]                                         # strided rows, as the model's norms give
    batch = linear(x)
    # the kernel's weights: (q - 8) * scale + zero (int4) or q * scale (int8), never rounded to bf16
    if mode == "int4":
        q = quantize_int4(weight)[0].view(n, k // 32, 32).double()
        sz = linear.scale_zero.double().transpose(0, 1)                     # [N, K/32, 2]
        exact = ((q - 8) * sz[..., :1] + sz[..., 1:]).view(n, k)
    else:
        exact = quantize_int8(weight)[0].double() * linear.scale.double()[:, None]
    expected = x.double() @ exact.T + linear.bias.double()
    assert torch.allclose(batch.double(), expected, rtol=2 ** -7, atol=1e-3)     # two roundings: y, y + bias
    # and the layer's reference, F.linear with the bf16 round-trip weight (each weight within 2^-9)
    reference_y = F.linear(x.float(), linear.weight.float(), linear.bias.float())
    assert (batch.float() - reference_y).norm() < 4e-3 * reference_y.norm()
    for rows in (slice(0, 1), slice(5, 6), slice(3, 5), slice(7, 14), slice(0, 129), slice(130, 140)):
        assert torch.equal(linear(x[rows]), batch[rows]), rows


def attention_case(dtype: torch.dtype, group: int, head_dim: int, page_size: int = 16):
    """A cache whose unowned slots hold NaN, one sequence of 600 keys on shuffled pages, its queries."""
    torch.manual_seed(group * head_dim)
    kv_heads, keys = 2, 600
    pages = -(-keys // page_size)
    k_cache = torch.full((pages + 8, page_size, kv_heads, head_dim), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    table = torch.randperm(pages + 8)[:pages]
    kv = torch.randn(2, keys, kv_heads, head_dim).to(dtype)
    reference.write_kv(k_cache, v_cache, table, 0, kv[0], kv[1])
    q = torch.randn(keys, group * kv_heads, head_dim).to(dtype)
    return q, k_cache, v_cache, table, page_size


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("group,head_dim", [(3, 64), (1, 64), (4, 128), (2, 32)])
def test_prefill_attention_rows_are_decodes(dtype, group, head_dim):
    """Every row of a prefill chunk equals the decode of the same length, bit for bit, wherever the
    chunk starts and whatever else it holds; and the causal reference, to rounding."""
    q, k_cache, v_cache, table, page_size = attention_case(dtype, group, head_dim)
    k_slots, v_slots = k_cache.flatten(0, 1), v_cache.flatten(0, 1)
    scale = head_dim ** -0.5
    ops = torch.ops.radixgate_cpu

    def prefill(start: int, end: int, other: bool = False) -> torch.Tensor:
        tables = table.view(1, -1)
        seq = torch.zeros(end - start, dtype=torch.long)
        counts = torch.arange(start + 1, end + 1)
        if other:       # a second sequence's rows (the same pages, other lengths) ahead in the chunk
            tables = torch.cat([table.view(1, -1), tables])
            seq, counts = torch.cat([torch.zeros(9, dtype=torch.long), seq + 1]), torch.cat([counts[:9], counts])
            qs = torch.cat([q[start:start + 9], q[start:end]])
            return ops.paged_prefill_attention(qs, k_slots, v_slots, tables, seq, counts, page_size, scale)[9:]
        return ops.paged_prefill_attention(q[start:end], k_slots, v_slots, tables, seq, counts, page_size, scale)

    rows = torch.tensor([0, 1, 17, 255, 256, 257, 511, 513, 599])
    decodes = ops.paged_decode_attention(q[rows], k_slots, v_slots, table.expand(len(rows), -1).contiguous(),
                                         rows + 1, page_size, scale)
    whole = prefill(0, 600)
    assert torch.equal(whole[rows], decodes)
    assert torch.equal(prefill(250, 520, other=True), whole[250:520])
    assert torch.equal(prefill(599, 600), whole[599:])
    expected = reference.paged_attention(q.float(), k_cache, v_cache, table, 0, scale)
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert torch.allclose(whole.float(), expected, atol=tolerance, rtol=tolerance)


def test_prefill_attention_refuses_bad_rows():
    q, k_cache, v_cache, table, page_size = attention_case(torch.float32, 1, 64)
    args = (k_cache.flatten(0, 1), v_cache.flatten(0, 1), table.view(1, -1))
    with pytest.raises(RuntimeError, match="key count"):
        torch.ops.radixgate_cpu.paged_prefill_attention(q[:2], *args, torch.zeros(2, dtype=torch.long),
                                                        torch.tensor([1, 10_000]), page_size, 0.1)
    with pytest.raises(RuntimeError, match="names sequence"):
        torch.ops.radixgate_cpu.paged_prefill_attention(q[:2], *args, torch.tensor([0, 1]),
                                                        torch.tensor([1, 2]), page_size, 0.1)


def test_device_sampler_draws_a_row_alone_as_in_a_batch():
    """The token drawn for a row depends on its logits, parameters and uniform only, not on the
    rows beside it (mixed greedy, temperature, top-k, top-p and min-p rows, near-tie logits)."""
    from backends.cuda.sampler import TorchSampler
    from backends.sampling_params import draw_uniform

    vocab = 3000
    sampler = TorchSampler(vocab, torch.device("cpu"))
    rng = np.random.default_rng(6)
    logits = torch.from_numpy(rng.normal(0, 2, (33, vocab)).astype(np.float32))
    logits[:, 7] = logits[:, 8]                            # ties everywhere
    kinds = [SamplingParams(temperature=0), SamplingParams(temperature=1.0), SamplingParams(top_k=40),
             SamplingParams(temperature=0.7, top_p=0.9), SamplingParams(min_p=0.05, temperature=1.3)]
    specs = [SampleSpec(kinds[i % len(kinds)], draw_uniform(99, i)) for i in range(33)]
    together = [t.token_id for t in sampler.sample(logits, specs)]
    alone = [sampler.sample(logits[i:i + 1], [spec])[0].token_id for i, spec in enumerate(specs)]
    assert together == alone


# ---- the deterministic CUDA kernels, under the Triton interpreter -------------------------------

@pytest.fixture
def interpreted_invariant_matmul(triton_interpreter, monkeypatch):
    """kernels/triton/invariant_matmul.py under the interpreter too (conftest reloads its own list).

    The interpreter's tl.dot is numpy's matmul, and OpenBLAS's AVX2 kernels round a row differently
    by its position in the block (an AMD EPYC host: 6 of 16 rows of a 16x64 @ 64x16 product), where
    the GPU's tile MMA computes every row alike. The dots here run in float64 and round once to the
    accumulator's dtype (exact for bf16 operands at these sizes), so that the tests check our
    kernels' batch invariance and not the host BLAS's."""
    import numpy
    from triton.runtime import interpreter

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.primitive_bitwidth == 8 or b.dtype.primitive_bitwidth == 8:
            return plain_dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        exact = numpy.matmul(a.data.astype(numpy.float64), b.data.astype(numpy.float64))
        return interpreter.TensorHandle((exact + d.data).astype(d.data.dtype), d.dtype.scalar)

    plain_dot = interpreter.InterpreterBuilder.create_dot
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)
    return importlib.reload(importlib.import_module("kernels.triton.invariant_matmul"))


def test_invariant_matmul_rows_do_not_depend_on_the_batch(interpreted_invariant_matmul):
    invariant_matmul = interpreted_invariant_matmul.invariant_matmul

    torch.manual_seed(0)
    weight, bias = (torch.randn(96, 160) * 0.05).bfloat16(), (torch.randn(96) * 0.1).bfloat16()
    x = torch.randn(37, 160).bfloat16()
    batch = invariant_matmul(x, weight, bias)
    expected = F.linear(x.float(), weight.float(), bias.float())
    assert torch.allclose(batch.float(), expected, rtol=2 ** -7, atol=1e-2)
    for rows in (slice(0, 1), slice(20, 21), slice(3, 19), slice(15, 37)):
        assert torch.equal(invariant_matmul(x[rows], weight, bias), batch[rows]), rows


def test_split_k_decode_with_fixed_splits_is_batch_invariant(triton_interpreter):
    from kernels.triton.decode import split_k_decode

    torch.manual_seed(1)
    page_size, kv_heads, group, d = 16, 2, 2, 64
    lengths = torch.tensor([600, 17, 256, 300], dtype=torch.int32)
    pages = 64
    k_cache = torch.randn(pages, page_size, kv_heads, d).bfloat16()
    v_cache = torch.randn(pages, page_size, kv_heads, d).bfloat16()
    tables = torch.stack([torch.randperm(pages)[:40] for _ in lengths]).to(torch.int32)
    q = torch.randn(len(lengths), kv_heads * group, d).bfloat16()
    batch = split_k_decode(q, k_cache, v_cache, tables, lengths, split_tokens=256)
    bounded = split_k_decode(q, k_cache, v_cache, tables, lengths, split_tokens=256, num_splits=3)   # 600 keys
    assert torch.equal(bounded, batch)
    for row in range(len(lengths)):
        alone = split_k_decode(q[row:row + 1], k_cache, v_cache, tables[row:row + 1], lengths[row:row + 1],
                               split_tokens=256)
        wider = torch.cat([tables[row:row + 1], tables[row:row + 1, :24]], dim=1)     # a wider table
        padded = split_k_decode(q[row:row + 1], k_cache, v_cache, wider, lengths[row:row + 1], split_tokens=256)
        assert torch.equal(alone, batch[row:row + 1]) and torch.equal(padded, alone), row
        expected = reference.paged_attention(q[row:row + 1].float(), k_cache, v_cache, tables[row].long(),
                                             int(lengths[row]) - 1, d ** -0.5)
        assert torch.allclose(alone.float(), expected, atol=2e-2, rtol=2e-2)


def test_deterministic_triton_runner_chunking_and_batching(interpreted_invariant_matmul):
    """A tiny random model with deterministic: true (the triton_invariant backend and layer ops):
    chunked vs whole prefill write the same KV, and a stream's logits alone and batched agree."""
    runner = TorchRunner(RunnerSettings("random", "tiny", "tiny", dtype="bfloat16", page_size=8, num_pages=40,
                                        threads=1, context_length=256, attention="triton", max_sequences=4,
                                        deterministic=True, validate_batches=True))
    assert runner.attention.name == "triton_invariant" and runner.model.ops.name == "triton_invariant"
    # chunks ending inside a page, of one token, and across page boundaries (pages of 8)
    prompt = np.random.default_rng(2).integers(0, 200, 23).tolist()
    whole = prefill_in_chunks(runner, prompt, [23], list(range(0, 6)), slot=0)
    chunked = prefill_in_chunks(runner, prompt, [5, 1, 9, 8], list(range(6, 12)), slot=1)
    assert torch.equal(whole[1], chunked[1]) and np.array_equal(whole[0], chunked[0])
    other = np.random.default_rng(3).integers(0, 200, 13).tolist()
    both = runner.forward(ForwardBatch([SequenceChunk(other, 0, list(range(12, 15)), 2, 9, GREEDY),
                                        SequenceChunk(prompt, 0, list(range(15, 21)), 3, 9, GREEDY)],
                                       return_logits=True))
    assert np.array_equal(both.logits[1], whole[0])


def test_deterministic_needs_a_batch_invariant_backend():
    from backends.cuda.attention.factory import deterministic_attention

    assert deterministic_attention("triton", "bfloat16") == "triton_invariant"
    with pytest.raises(ValueError, match="deterministic: true needs"):
        deterministic_attention("torch", "float32")


# ---- the embedded model at the default dtype ----------------------------------------------------

@pytest.fixture(scope="module")
def embedded_runner() -> TorchRunner:
    source = resolve_source("packaged:smollm2-135m-instruct")
    return TorchRunner(RunnerSettings(source.kind, source.path, MODEL, page_size=16, num_pages=256,
                                      max_sequences=8, validate_batches=True, deterministic=True))


def layer_kv(runner: TorchRunner, table: list[int], positions: int) -> torch.Tensor:
    cache = runner.cache
    return torch.stack([store[table].flatten(0, 1)[:positions] for layer in range(len(cache.k))
                        for store in (cache.k[layer], cache.v[layer])])


def prefill_in_chunks(runner: TorchRunner, prompt: list[int], sizes: list[int], table: list[int], slot: int):
    """Prefill `prompt` in chunks of `sizes` -> (the last chunk's logits, the KV it wrote)."""
    start = 0
    for size in sizes:
        last = start + size == len(prompt)
        result = runner.forward(ForwardBatch([SequenceChunk(prompt[start:start + size], start, table, slot,
                                                            table[0], GREEDY if last else None)],
                                             return_logits=last))
        start += size
    assert start == len(prompt)
    return result.logits[0], layer_kv(runner, table, len(prompt))


@needs_quant
def test_default_dtype_kv_does_not_depend_on_chunks(embedded_runner):
    runner = embedded_runner
    assert runner.info.dtype == "int4" and runner.attention.name == "cpu_fused"
    prompt = np.random.default_rng(4).integers(10, 40000, 150).tolist()
    logits, kv = prefill_in_chunks(runner, prompt, [150], list(range(0, 10)), slot=0)
    for slot, sizes in enumerate(([5, 16, 37, 1, 1, 90], [64, 64, 22], [1] * 20 + [130]), start=1):
        table = list(range(10 * slot, 10 * slot + 10))
        other_logits, other_kv = prefill_in_chunks(runner, prompt, sizes, table, slot)
        assert np.array_equal(other_logits, logits), sizes
        assert torch.equal(other_kv, kv), sizes


@needs_quant
def test_default_dtype_decode_writes_what_a_recompute_writes(embedded_runner):
    """Greedy decode of 12 tokens, then prompt + output prefilled in one chunk (what preemption
    recomputes): the same KV bits, and the same next token."""
    runner = embedded_runner
    prompt = np.random.default_rng(5).integers(10, 40000, 40).tolist()
    table, tokens = list(range(40, 44)), list(prompt)
    result = runner.forward(ForwardBatch([SequenceChunk(prompt, 0, table, 0, 77, GREEDY)]))
    tokens.append(result.tokens[0].token_id)
    for _ in range(12):
        result = runner.forward(ForwardBatch([SequenceChunk([tokens[-1]], len(tokens) - 1, table, 0, 77, GREEDY)]))
        tokens.append(result.tokens[0].token_id)
    decoded = layer_kv(runner, table, len(tokens) - 1)
    _, recomputed = prefill_in_chunks(runner, tokens[:-1], [len(tokens) - 1], list(range(44, 48)), slot=1)
    assert torch.equal(recomputed, decoded)


# ---- over HTTP, the default dtype ---------------------------------------------------------------

def seeded_request(prompt: str) -> dict:
    return dict(model=MODEL, messages=[{"role": "user", "content": prompt}], temperature=1.0, max_tokens=24,
                seed=4242)


def run_with_others(base_url: str, target: dict, others: int) -> str:
    """The target request streamed concurrently with `others` other streams; its text."""
    async def one(client, spec: dict) -> str:
        stream = await client.chat.completions.create(stream=True, **spec)
        return "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])

    async def main():
        async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600) as client:
            rivals = [dict(model=MODEL, messages=[{"role": "user", "content": f"Tell me fact {i} about ships."}],
                           temperature=0.7 if i % 2 else 0.0, max_tokens=8 + i % 20, seed=i) for i in range(others)]
            texts = await asyncio.gather(*(one(client, spec) for spec in [*rivals[:others // 2], target,
                                                                         *rivals[others // 2:]]))
            return texts[others // 2]
    return asyncio.run(main())


@needs_quant
def test_seeded_request_same_text_cold_cached_and_batched(live_server):
    client = openai.OpenAI(base_url=live_server.base_url, api_key="unused", max_retries=0)
    target = seeded_request(f"[{uuid.uuid4().hex[:8]}] Write a short poem about the moon and the tides.")
    # cold: nothing cached, not even the chat template's system preamble that earlier tests sent
    assert httpx.post(f"{live_server.url}/clear_radix_cache").status_code == 200
    cold = client.chat.completions.create(**target)
    cached = client.chat.completions.create(**target)
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    assert cached.usage.prompt_tokens_details.cached_tokens > 0
    text = cold.choices[0].message.content
    assert len(text) > 20 and cached.choices[0].message.content == text
    assert httpx.post(f"{live_server.url}/clear_radix_cache").status_code == 200
    assert run_with_others(live_server.base_url, target, 8) == text          # cold, batched with 8
    assert run_with_others(live_server.base_url, target, 32) == text         # cached, batched with 32
    live_server.wait_idle()


@needs_quant
def test_seeded_n_choices_repeat(live_server):
    client = openai.OpenAI(base_url=live_server.base_url, api_key="unused", max_retries=0)
    target = seeded_request("Name an animal and say one thing about it.")
    first = [c.message.content for c in client.chat.completions.create(n=3, **target).choices]
    again = [c.message.content for c in client.chat.completions.create(n=3, **target).choices]
    assert first == again and len(set(first)) > 1
    live_server.wait_idle()


@pytest.fixture(scope="module")
def preempting_server():
    # the default dtype; a pool of 30 pages of 16 tokens that 5 long streams outgrow
    server = start_server(model_config(kv_cache={"page_size": 16, "num_pages": 30},
                                       scheduler={"max_running_requests": 8, "prefill_chunk_tokens": 64}))
    yield server
    assert server.engine.fatal_error is None, server.engine.fatal_error
    server.stop()


@needs_quant
def test_greedy_same_under_preemption_default_dtype(preempting_server):
    server = preempting_server
    specs = [dict(model=MODEL, messages=[{"role": "user", "content": f"Story {i}: a fox and a crow."}],
                  temperature=0, max_tokens=90 + 5 * i, extra_body={"ignore_eos": True}) for i in range(5)]
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    alone = [client.chat.completions.create(**spec).choices[0].message.content for spec in specs[:2]]

    async def main():
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0,
                                      timeout=600) as aclient:
            replies = await asyncio.gather(*(aclient.chat.completions.create(**spec) for spec in specs))
            return [r.choices[0].message.content for r in replies]
    together = asyncio.run(main())
    assert together[:2] == alone
    health = httpx.get(f"{server.url}/health", timeout=30).json()["models"][MODEL]
    assert health["preemptions_total"] > 0
    server.wait_idle()
