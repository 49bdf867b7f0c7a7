"""The MLX backend's model against the torch backend on the same weights: the embedded GGUF (its
Q4_1 blocks served as MLX 4-bit weights, against torch's float32 on the dequantised weights) and
a tiny random model from an HF folder and from an MLX quantised folder.

Tolerances: on the GGUF both sides compute with the same numbers (MLX's quantized matmul, or the
CPU's float32 linears, dequantise the same Q4_1/Q8_0 groups to float32), so logits agree to
float32 rounding, well inside LOGIT_ATOL (max abs; SmolLM2's logits span about +-30). Greedy: 32 tokens equal the torch
float32 run's; where they may differ, the first differing step must be a near tie of the torch
run (as tests/test_cpu_fast_path.py phrases it): our pick within GREEDY_GAP of its maximum.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("mlx.core", reason="mlx is not installed: the MLX backend cannot be tested")
import mlx.core as mx  # noqa: E402

from backends.base import ForwardBatch, RunnerSettings, SampleSpec, SequenceChunk  # noqa: E402
from backends.cuda.runner import TorchRunner  # noqa: E402
from backends.mlx.cpu_linear import ColumnSplitLinear  # noqa: E402
from backends.mlx.runner import MlxRunner, cpu_float_linears  # noqa: E402
from backends.sampling_params import SamplingParams  # noqa: E402
from backends.source import resolve_source  # noqa: E402

PAGE = 16
STEPS = 32
GREEDY_GAP = 0.5
LOGIT_ATOL = 0.01        # measured on mlx 0.32.4 / mlx-cpu: max 1.3e-4 over 32 steps (auto and int4), greedy identical
GREEDY = SampleSpec(SamplingParams(temperature=0), 0.5)


def logits_of(r, *chunks: SequenceChunk) -> np.ndarray:
    return r.forward(ForwardBatch(list(chunks), return_logits=True)).logits


def chunk(tokens: list[int], start: int, table: list[int], slot: int = 0) -> SequenceChunk:
    return SequenceChunk(tokens, start, table, seq_slot=slot, table_epoch=1, sample=GREEDY)


def greedy_run(r, prompt: list[int], table: list[int], steps: int) -> tuple[list[int], np.ndarray]:
    """Greedy tokens and the logits of every step (fed the run's own tokens)."""
    rows = [logits_of(r, chunk(prompt, 0, table))[0]]
    out = [int(rows[-1].argmax())]
    for i in range(steps - 1):
        rows.append(logits_of(r, chunk([out[-1]], len(prompt) + i, table))[0])
        out.append(int(rows[-1].argmax()))
    return out, np.stack(rows)


def forced_logits(r, prompt: list[int], tokens: list[int], table: list[int]) -> np.ndarray:
    out = [logits_of(r, chunk(prompt, 0, table))[0]]
    for i, tok in enumerate(tokens):
        out.append(logits_of(r, chunk([tok], len(prompt) + i, table))[0])
    return np.stack(out)


@pytest.fixture(scope="module")
def source():
    return resolve_source("packaged:smollm2-135m-instruct")


@pytest.fixture(scope="module")
def prompt(source) -> list[int]:
    from gateway.templating import load_tokenizer

    tokenizer = load_tokenizer(source)
    return tokenizer.encode(tokenizer.render_chat([{"role": "user", "content": "Name three primary colours."}]))


@pytest.mark.parametrize("dtype", ["auto", "int4"])
def test_gguf_greedy_and_logits_match_torch(source, prompt, dtype):
    """auto: on the CPU the float32 column-split linears (cpu_linear.py), on a GPU the packed
    weights; int4: the packed weights and MLX's quantized matmuls everywhere."""
    settings = dict(source_kind=source.kind, source_path=source.path, model_name="smollm2", page_size=PAGE,
                    num_pages=16, validate_batches=True)
    mlx_runner = MlxRunner(RunnerSettings(**settings, device="mlx", dtype=dtype))
    layer = mlx_runner.model.layers[0].mlp.gate_proj
    if cpu_float_linears(dtype):
        assert mlx_runner.info.dtype == "float32 (dequantised int4/int8)"
        assert isinstance(layer, ColumnSplitLinear) and layer.blocks[0].dtype == mx.float32
        assert isinstance(mlx_runner.model.lm_head, ColumnSplitLinear)     # the tied head's own copy
    else:
        assert mlx_runner.info.dtype == "int4/int8/float32"
        assert layer.weight.dtype == mx.uint32 and (layer.group_size, layer.bits) == (32, 4)   # packed
    assert mlx_runner.info.backend == "mlx"
    table = list(range(6))
    got, got_logits = greedy_run(mlx_runner, prompt, table, STEPS)
    del mlx_runner
    torch_runner = TorchRunner(RunnerSettings(**settings, dtype="float32", threads=1))
    want = forced_logits(torch_runner, prompt, got[:-1], table)
    err = np.abs(got_logits - want).max(axis=1)
    assert err.max() <= LOGIT_ATOL, err
    reference, _ = greedy_run(torch_runner, prompt, table, STEPS)
    if got != reference:
        step = next(i for i, (a, b) in enumerate(zip(got, reference, strict=True)) if a != b)
        gap = float(want[step].max() - want[step][got[step]])
        assert gap <= GREEDY_GAP, f"step {step}: we picked {got[step]}, {gap:.3f} below the torch max"


def tiny_folder(path, quantized: bool):
    """The torch loader's 'tiny' random architecture written as an HF folder, or (quantized) as an
    MLX 4-bit folder; returns the float32 weights the torch side should run (dequantised if so)."""
    from backends.cuda.loader import random_weights

    cfg, weights = random_weights("tiny", __import__("torch").float32)
    arrays = {f"model.{k}" if k != "lm_head.weight" else k: mx.array(w.numpy()) for k, w in weights.items()}
    config = {"model_type": "llama", "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
              "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
              "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "rope_theta": cfg.rope_theta,
              "rms_norm_eps": cfg.rms_norm_eps, "max_position_embeddings": cfg.context_length,
              "tie_word_embeddings": False, "vocab_size": cfg.vocab_size}
    if quantized:
        config["quantization"] = {"group_size": 32, "bits": 4}
        for name in [n for n in arrays if n.endswith("proj.weight")]:
            packed, scales, biases = mx.quantize(arrays[name], group_size=32, bits=4)
            arrays[name] = packed
            arrays[name.replace(".weight", ".scales")] = scales
            arrays[name.replace(".weight", ".biases")] = biases
    mx.save_safetensors(str(path / "model.safetensors"), arrays)
    (path / "config.json").write_text(json.dumps(config))
    torch_folder = path.parent / f"{path.name}-torch"
    torch_folder.mkdir()
    if quantized:                                 # torch runs the weights MLX's groups hold
        for name in [n for n in arrays if n.endswith("proj.weight")]:
            base = name.removesuffix(".weight")
            arrays[name] = mx.dequantize(arrays[name], arrays.pop(base + ".scales"), arrays.pop(base + ".biases"),
                                         group_size=32, bits=4)
        del config["quantization"]
    mx.save_safetensors(str(torch_folder / "model.safetensors"), arrays)
    (torch_folder / "config.json").write_text(json.dumps(config))
    return torch_folder


@pytest.mark.parametrize(("quantized", "dtype"), [(False, "auto"), (True, "auto"), (True, "int4")],
                         ids=["hf-folder", "mlx-4bit-folder", "mlx-4bit-folder-int4"])
def test_tiny_random_model_matches_torch(tmp_path, quantized, dtype):
    folder = tmp_path / "tiny"
    folder.mkdir()
    torch_folder = tiny_folder(folder, quantized)
    common = dict(page_size=4, num_pages=32, validate_batches=True)
    mlx_runner = MlxRunner(RunnerSettings("hf", str(folder), "tiny", device="mlx", dtype=dtype, **common))
    torch_runner = TorchRunner(RunnerSettings("hf", str(torch_folder), "tiny", dtype="float32", threads=1, **common))
    q_proj = mlx_runner.model.layers[0].self_attn.q_proj
    if cpu_float_linears(dtype):
        assert isinstance(q_proj, ColumnSplitLinear)
    elif quantized:
        assert q_proj.bits == 4
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 256, n).tolist() for n in (13, 6)]
    tables = [list(range(0, 8)), list(range(8, 16))]
    # both sequences prefilled in one batch, then 8 batched decode steps fed torch's greedy tokens
    batch = [chunk(p, 0, t, i) for i, (p, t) in enumerate(zip(prompts, tables, strict=True))]
    for step in range(9):
        want = logits_of(torch_runner, *batch)
        got = logits_of(mlx_runner, *batch)
        np.testing.assert_allclose(got, want, atol=2e-4, rtol=0)
        nxt = want.argmax(axis=1)
        batch = [chunk([int(nxt[i])], len(p) + step, t, i)
                 for i, (p, t) in enumerate(zip(prompts, tables, strict=True))]


def test_sparse_decode_matches_torch(tmp_path):
    """Quest through the whole runner on the tiny model, coarse to fine (a shortlist of 32 tokens):
    sequences past the budget select and read the same pages as the torch backend, so logits agree.
    Budget 4 pages, shortlist 8: the 31-page row is scored coarse to fine (its logits move by about
    0.16 with the shortlist off, so matching torch checks the coarse stage), the 7-page row is past
    the budget but within the shortlist, the 3-page row is dense."""
    from backends.base import SparseSettings

    folder = tmp_path / "tiny"
    folder.mkdir()
    torch_folder = tiny_folder(folder, quantized=False)
    sparse = SparseSettings(enabled=True, token_budget=16, dense_layers=1, sink_tokens=4, recent_tokens=4,
                            summary_tokens=2, shortlist_tokens=32)
    common = dict(page_size=4, num_pages=64, validate_batches=True, sparse=sparse)
    mlx_runner = MlxRunner(RunnerSettings("hf", str(folder), "tiny", device="mlx", **common))
    torch_runner = TorchRunner(RunnerSettings("hf", str(torch_folder), "tiny", dtype="float32", threads=1,
                                              attention="torch", **common))
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 256, n).tolist() for n in (121, 9, 25)]    # 31, 3 and 7 pages
    tables = [list(range(0, 32)), list(range(32, 40)), list(range(40, 48))]
    batch = [chunk(p, 0, t, i) for i, (p, t) in enumerate(zip(prompts, tables, strict=True))]
    logits_of(torch_runner, *batch), logits_of(mlx_runner, *batch)
    for step in range(3):
        decode = [chunk([7 + step], len(p) + step, t, i) for i, (p, t) in enumerate(zip(prompts, tables, strict=True))]
        t_result = torch_runner.forward(ForwardBatch(decode, return_logits=True))
        m_result = mlx_runner.forward(ForwardBatch(decode, return_logits=True))
        np.testing.assert_allclose(m_result.logits, t_result.logits, atol=2e-4, rtol=0)
        assert mlx_runner.attention.step.quest.shortlist_pages == 2 * 4      # the coarse stage ran
        assert m_result.attention.pages_skipped > 0
        assert (m_result.attention.pages_read, m_result.attention.pages_skipped) == \
            (t_result.attention.pages_read, t_result.attention.pages_skipped)

