"""Tensor parallelism on the CPU: two ranks over gloo (a follower process and this one) against the
same model on one rank, float32, through prefill, decode, new pages, a reused slot, a step too
large for one message and sparse decode; the shard plan's arithmetic; the split point (all-reduce
of float32 partials + residual add + RMSNorm) over two gloo processes and, for the fused CUDA
kernel, one rank's side under the Triton interpreter; the float32 output of the GEMV kernels."""
from __future__ import annotations

import dataclasses
import importlib

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from backends.base import PENDING_TOKEN, ForwardBatch, RunnerSettings, SampleSpec, SequenceChunk, SparseSettings
from backends.cuda.collectives import TorchCollectives
from backends.cuda.layer_ops import TorchLayerOps
from backends.cuda.linear import FastLinear
from backends.cuda.loader import ARCHITECTURES
from backends.cuda.parallel import _free_port
from backends.cuda.runner import TorchRunner
from backends.cuda.shard import ShardPlan
from backends.cuda.step_channel import MESSAGE_WORDS
from backends.sampling_params import SamplingParams
from gateway.config import ModelConfig
from gateway.local_model import runner_settings
from tests.conftest import tiny_llama_folder

PAGE = 16
VOCAB = 129            # odd: the last rank's vocabulary shard is padded
GREEDY = SampleSpec(SamplingParams(temperature=0), 0.5)
EPS = 1e-5
SPARSE = SparseSettings(True, token_budget=64, dense_layers=1, sink_tokens=16, recent_tokens=16, summary_tokens=4)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    return tiny_llama_folder(tmp_path_factory.mktemp("tiny-llama-tp"), hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                             max_position_embeddings=2048)


def steps(runner: TorchRunner) -> tuple[list[np.ndarray], list[list[int]]]:
    """Logits and greedy tokens of a fixed script of steps."""
    rng = np.random.default_rng(0)
    long_prompt = rng.integers(0, VOCAB, MESSAGE_WORDS + 100).tolist()      # two messages
    short_prompt = rng.integers(0, VOCAB, 21).tolist()
    long_table = list(range(0, 80))
    short_table = list(range(80, 84))
    logits, tokens = [], []

    def run(*chunks: SequenceChunk) -> None:
        result = runner.forward(ForwardBatch(list(chunks), return_logits=True))
        logits.append(result.logits)
        tokens.append([t.token_id for t in result.tokens])

    # prefill: the short prompt in two chunks, the long one whole, in one mixed step
    run(SequenceChunk(short_prompt[:9], 0, short_table, 1, 1, None),
        SequenceChunk(long_prompt, 0, long_table, 0, 1, GREEDY))
    run(SequenceChunk(short_prompt[9:], 9, short_table, 1, 1, GREEDY))
    long_at, short_at = len(long_prompt), len(short_prompt)
    for _ in range(14):          # decode both (the short one crosses into a new page); long: sparse
        run(SequenceChunk([PENDING_TOKEN], long_at, long_table, 0, 1, GREEDY),
            SequenceChunk([PENDING_TOKEN], short_at, short_table, 1, 1, GREEDY))
        long_at, short_at = long_at + 1, short_at + 1
    # slot 1 reused by a new sequence with a new page table (a new epoch)
    run(SequenceChunk(short_prompt[::-1], 0, [90, 91], 1, 2, GREEDY))
    run(SequenceChunk([PENDING_TOKEN], len(short_prompt), [90, 91], 1, 2, GREEDY))
    return logits, tokens


def test_two_ranks_match_one(folder):
    def settings(world: int) -> RunnerSettings:
        return RunnerSettings("hf", folder, "tiny", dtype="float32", device="cpu", page_size=PAGE, num_pages=128,
                              max_sequences=4, attention="torch", context_length=2048, threads=1,
                              validate_batches=True, sparse=SPARSE, tensor_parallel_size=world)

    single = TorchRunner(settings(1))
    want_logits, want_tokens = steps(single)
    pair = TorchRunner(settings(2))
    try:
        assert pair.cache.k.shape[3] == 1 and single.cache.k.shape[3] == 2     # one KV head per rank
        assert pair.num_pages == single.num_pages
        got_logits, got_tokens = steps(pair)
    finally:
        pair.close()
    assert [p.poll() for p in pair.tp.followers] == [0]
    assert got_tokens == want_tokens
    for got, want in zip(got_logits, want_logits, strict=True):
        assert got.shape == want.shape == (want.shape[0], VOCAB)
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)


def test_shards_reassemble_the_whole_tensors():
    cfg = ARCHITECTURES["tiny"]
    shapes = {"embed_tokens.weight": (cfg.vocab_size + 3, cfg.hidden_size),
              "layers.0.self_attn.q_proj.weight": (cfg.num_heads * cfg.head_dim, cfg.hidden_size),
              "layers.0.self_attn.k_proj.bias": (cfg.num_kv_heads * cfg.head_dim,),
              "layers.0.self_attn.o_proj.weight": (cfg.hidden_size, cfg.num_heads * cfg.head_dim),
              "layers.0.mlp.up_proj.weight": (cfg.intermediate_size, cfg.hidden_size),
              "layers.0.mlp.down_proj.weight": (cfg.hidden_size, cfg.intermediate_size),
              "layers.0.input_layernorm.weight": (cfg.hidden_size,)}
    cfg = dataclasses.replace(cfg, vocab_size=cfg.vocab_size + 3)        # 259: not a multiple of 2
    plans = [ShardPlan(cfg, rank, 2) for rank in range(2)]
    assert plans[0].local_config.num_kv_heads == 1 and plans[1].vocab_start == 130
    for name, shape in shapes.items():
        whole = torch.randn(shape)
        parts = [plan.apply(name, whole) for plan in plans]
        part = plans[0].part(name)
        if part is None:
            assert all(torch.equal(p, whole) for p in parts)
            continue
        joined = torch.cat(parts, dim=part[0])
        if name == "embed_tokens.weight":       # one zero row of padding
            assert joined.shape[0] == 260 and not joined[259].any()
            joined = joined[:259]
        assert torch.equal(joined, whole), name


def test_indivisible_splits_and_config():
    with pytest.raises(ValueError, match="does not divide the model's 4 attention heads"):
        ShardPlan(ARCHITECTURES["tiny"], 0, 3)
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        ModelConfig(name="m", tensor_parallel_size=0)
    assert runner_settings(ModelConfig(name="m", tensor_parallel_size=2), "cpu").tensor_parallel_size == 2


def test_one_shot_kernel_one_rank_at_a_time():
    """The peer-to-peer all-reduce kernel under the Triton interpreter, this rank's side of three
    calls with the peer's block and flag put in place beforehand: sums, the alternating buffer
    halves, the flags raised in the peer's memory, the call counts; then a wait that times out."""
    import importlib

    from tests.conftest import triton_interpreter_mode
    with triton_interpreter_mode():
        kernels = importlib.reload(importlib.import_module("backends.cuda.peer_all_reduce"))
        n = kernels.BLOCK * 2 + 3                          # three blocks, the last one partial
        blocks, half = 3, kernels.CAPACITY_BYTES // 4
        mine, peer = torch.zeros(2 * half), torch.zeros(2 * half)
        my_flags, peer_flags, counts = (torch.zeros(8, dtype=torch.int64) for _ in range(3))
        error = torch.zeros(1, dtype=torch.int32)
        rng = torch.Generator().manual_seed(0)
        for call in (1, 2, 3):
            x, y = torch.randn(n, generator=rng), torch.randn(n, generator=rng)
            at = (call % 2) * half
            peer[at:at + n] = y                                # the peer's side of this call
            my_flags[:blocks] = call
            out = x.clone()
            kernels._one_shot_kernel[(blocks,)](out, mine, peer, my_flags, peer_flags, counts, error, n, half,
                                                100, BLOCK=kernels.BLOCK)
            assert torch.equal(out, x + y) and torch.equal(mine[at:at + n], x)
            assert peer_flags[:blocks].tolist() == counts[:blocks].tolist() == [call] * blocks
            assert error.item() == 0 and not peer_flags[blocks:].any()
        kernels._one_shot_kernel[(blocks,)](x.clone(), mine, peer, my_flags, peer_flags, counts, error, n, half,
                                            100, BLOCK=kernels.BLOCK)      # no peer this time
        assert error.item() == 1
    importlib.reload(kernels)       # compiled again for any later CUDA test


def _split_point_inputs(rows: int, hidden: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The residual (bf16), the RMSNorm weight (bf16) and both ranks' float32 partials [2, rows,
    hidden]: the same on every rank (one seed), as the replicated residual is."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(rows, hidden, generator=gen).bfloat16()
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).bfloat16()
    return x, weight, torch.randn(2, rows, hidden, generator=gen)


def _split_point_rank(rank: int, port: int, folder: str) -> None:
    """One gloo rank: TorchCollectives.add_rms_norm of its float32 partial, and of the same partial
    rounded to bf16 first (what a CPU kernel that rounds leaves); results saved for the parent."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    ops = TorchLayerOps(EPS)
    x, weight, partials = _split_point_inputs(5, 64)
    comm = TorchCollectives(dist.group.WORLD, 2, 0, 1, 1, ops)
    x_rounded = x.clone()
    h = comm.add_rms_norm(x, partials[rank].clone(), ops.prepare_norm(weight))
    h_rounded = comm.add_rms_norm(x_rounded, partials[rank].bfloat16(), ops.prepare_norm(weight))
    torch.save({"x": x, "h": h, "x_rounded": x_rounded, "h_rounded": h_rounded}, f"{folder}/rank{rank}.pt")
    dist.destroy_process_group()


def test_split_point_over_two_gloo_ranks(tmp_path):
    """The torch split point on two processes: both ranks end with the same residual and norm, bit
    for bit, and both are one GPU's composition: the float32 sum of the partials rounded once to
    bf16, then the layer ops' x += delta and RMSNorm."""
    mp.start_processes(_split_point_rank, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    ops = TorchLayerOps(EPS)
    x, weight, partials = _split_point_inputs(5, 64)
    x_rounded = x.clone()
    want = ops.add_rms_norm(x, (partials[0] + partials[1]).bfloat16(), ops.prepare_norm(weight))
    rounded = partials.bfloat16().float()
    want_rounded = ops.add_rms_norm(x_rounded, (rounded[0] + rounded[1]).bfloat16(), ops.prepare_norm(weight))
    for got in ranks:
        assert got["x"].dtype == got["h"].dtype == torch.bfloat16
        assert torch.equal(got["x"], x) and torch.equal(got["h"], want)
        assert torch.equal(got["x_rounded"], x_rounded) and torch.equal(got["h_rounded"], want_rounded)


def test_fused_split_point_one_rank_at_a_time():
    """kernels/triton/fused_all_reduce.py under the Triton interpreter, this rank's side of four
    calls with the peer's rows put in this rank's slot beforehand: the residual and the norm equal
    one GPU's composition (the float32 sum rounded once, then Triton's add_rms_norm) bit for bit,
    and the plain torch layer ops' within a bf16 step; this rank's rows sent into the peer's slot
    (-0.0 as +0.0), the slot read the call before emptied, the call counts; then a wait that times out."""
    from tests.conftest import triton_interpreter_mode
    with triton_interpreter_mode():
        fused = importlib.reload(importlib.import_module("kernels.triton.fused_all_reduce"))
        from kernels.triton import layer_ops  # reloaded for the interpreter
        rows, hidden, slot = 3, 96, 512       # 96: not a power of two, so the row's block is masked
        mine = fused.empty_slots(torch.zeros(fused.SLOTS * slot))
        peer = fused.empty_slots(torch.zeros(fused.SLOTS * slot))
        counts = torch.zeros(8, dtype=torch.int64)
        error = torch.zeros(1, dtype=torch.int32)
        x, weight, _ = _split_point_inputs(rows, hidden)
        plain = TorchLayerOps(EPS)
        gen = torch.Generator().manual_seed(1)

        def is_empty(t: torch.Tensor) -> bool:
            return bool((t.view(torch.int32) == fused.EMPTY_BITS).all())

        for call in (1, 2, 3, 4):
            partial, peer_partial = torch.randn(2, rows, hidden, generator=gen)
            partial[0, 5] = -0.0
            at = (call % 3) * slot
            mine[at:at + rows * hidden] = peer_partial.flatten()          # the peer's side of this call
            delta = (partial + peer_partial).bfloat16()
            want_x, plain_x = x.clone(), x.clone()
            want = layer_ops.add_rms_norm(want_x, delta, weight, EPS)
            plain_h = plain.add_rms_norm(plain_x, delta, plain.prepare_norm(weight))
            got = fused.all_reduce_add_rms_norm(partial, x, weight, EPS, mine, peer, counts, error, 100)
            assert torch.equal(x, want_x) and torch.equal(got, want)
            assert torch.equal(x, plain_x)
            torch.testing.assert_close(got.float(), plain_h.float(), rtol=2 ** -7, atol=2 ** -7)
            sent = peer[at:at + rows * hidden]
            assert torch.equal(sent, partial.flatten()) and sent[5].item() == 0.0 and not sent[5].signbit()
            stale = ((call + 2) % 3) * slot
            assert is_empty(mine[stale:stale + rows * hidden])
            assert counts[:rows].tolist() == [call] * rows and not counts[rows:].any()
            assert error.item() == 0
            peer[at:at + rows * hidden] = fused.empty_slots(torch.zeros(rows * hidden))   # the peer read it
        fused.all_reduce_add_rms_norm(partial, x.clone(), weight, EPS, mine, peer, counts, error, 100)   # no peer
        assert error.item() == 1
    importlib.reload(fused)         # compiled again for any later CUDA test


def test_gemv_float32_output():
    """out_dtype=float32 stores the GEMV's float32 accumulation unrounded: rounded to bf16 it is the
    default output bit for bit (plain and with SiLU * up fused); the skinny kernel's is F.linear's
    float32 product. On the CPU a linear keeps its kernels' output (the collectives widen it)."""
    from tests.conftest import triton_interpreter_mode
    with triton_interpreter_mode():
        from kernels.triton.gemv import GemvConfig, gemv, skinny_gemm
        gen = torch.Generator().manual_seed(4)
        n, k = 24, 160
        w = (0.1 * torch.randn(n, k, generator=gen)).bfloat16()
        x, gate_up = torch.randn(1, k, generator=gen).bfloat16(), torch.randn(1, 2 * k, generator=gen).bfloat16()
        config = GemvConfig(8, 64, 2, 1)
        for row, silu in ((x, False), (gate_up, True)):
            wide = gemv(row, w, silu=silu, config=config, out_dtype=torch.float32)
            assert wide.dtype == torch.float32
            assert torch.equal(wide.bfloat16(), gemv(row, w, silu=silu, config=config))
        rows = torch.randn(5, k, generator=gen).bfloat16()
        wide = skinny_gemm(rows, w, config=GemvConfig(16, 64, 4, 1), out_dtype=torch.float32)
        torch.testing.assert_close(wide, rows.float() @ w.float().t(), rtol=1e-5, atol=1e-5)
    linear = FastLinear(w, None, "bfloat16")
    linear.use_float32_output()
    assert linear(x).dtype == torch.bfloat16
