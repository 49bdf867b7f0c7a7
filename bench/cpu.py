"""CPU engine benchmark: radixgate in process and over HTTP vs HF transformers and llama.cpp, one run.

Same model (the packaged SmolLM2-135M-Instruct Q4_1 GGUF), same chat prompt, greedy, N new tokens:
  * single-stream decode tok/s (after the first token),
  * TTFT of a cold ~650-token prompt (a fresh nonce defeats every prefix cache),
  * aggregate tok/s and p95 TTFT of 8 concurrent streams (servers; in process: one batched loop).
Decode and 8-stream figures are the median of --repeat runs (default 3; every run is in the JSON
line printed per section): one 128-token stream lasts 2-3 s, and a 2-core machine shared with
others swings by 20-30% from one second to the next.

    python bench/cpu.py                      # everything that is installed
    python bench/cpu.py --skip-hf --skip-llama

llama.cpp is optional: CMAKE_ARGS="-DGGML_NATIVE=ON" pip install 'llama-cpp-python[server]==0.3.36'
(builds from source, ~7-15 min on 2 cores), in this venv or another one named by --llama-python.
On a host whose CPU has AMX but whose hypervisor does not grant the tile state, a native build
dies with SIGSEGV at its first matmul (ldtilecfg); build it without AMX instead:
CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON
-DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF
-DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF". When absent the bench says so and prints the peer
figures of the issue instead, labelled as not measured in this run.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODEL = "smollm2-135m-instruct"
SOURCE = "packaged:smollm2-135m-instruct"
CHAT = ("Write a short story about a lighthouse keeper who finds a message in a bottle. "
        "Describe the sea, the weather and what the message says.")
PARAGRAPH = ("The history of the printing press is a story of many hands. Movable type appeared in "
             "East Asia centuries before Gutenberg, and the spread of paper, ink and presses changed "
             "how ideas travelled between cities, universities and markets. ")
# Reference figures from the issue (same machine kind, 2026-11-22), used when llama.cpp is absent.
PEERS = {"llama.cpp in process decode": 94.5, "llama.cpp in process TTFT 650": 2.85,
         "llama.cpp server 1 stream decode": 71.0, "llama.cpp server 8-stream agg": 37.5,
         "llama.cpp server 8-stream p95 TTFT": 11.0, "HF fp32 decode": 14.0}


def long_message(tokenizer, target: int = 650) -> str:
    """A user message whose chat prompt is about `target` tokens, unique per call (cold)."""
    nonce = f"[{uuid.uuid4().hex}] "
    text = nonce
    while len(tokenizer.encode(tokenizer.render_chat([{"role": "user", "content": text + PARAGRAPH}]))) < target:
        text += PARAGRAPH
    return text + "Summarise the text above in one sentence."


def median(values: list[float]) -> float:
    return pct(values, 0.5)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


# ---------------------------------------------------------------------------------------------
# radixgate in process (TorchRunner, the engine's backend)


def ours_in_process(args, tokenizer, dtype: str) -> dict:
    from backends.base import ForwardBatch, RunnerSettings, SampleSpec, SequenceChunk
    from backends.cuda.runner import TorchRunner
    from backends.sampling_params import SamplingParams
    from backends.source import resolve_source

    src = resolve_source(SOURCE)
    runner = TorchRunner(RunnerSettings(src.kind, src.path, MODEL, dtype=dtype, page_size=16,
                                        num_pages=1024, threads=args.threads))
    prompt = tokenizer.encode(tokenizer.render_chat([{"role": "user", "content": CHAT}]))
    pages = iter(range(runner.num_pages))

    def table(n):
        return [next(pages) for _ in range(-(-n // 16))]

    greedy = SampleSpec(SamplingParams(temperature=0), 0.0)
    epochs = iter(range(1, 1 << 30))

    def generate(prompt_ids, n, streams=1):
        # stream i in seq slot i; new pages each call, so a new table epoch for every slot
        tables = [(table(len(prompt_ids) + n), next(epochs)) for _ in range(streams)]
        toks = []
        for i, (t, epoch) in enumerate(tables):
            first = runner.forward(ForwardBatch([SequenceChunk(prompt_ids, 0, t, i, epoch, greedy)]))
            toks.append(first.tokens[0].token_id)
        started = time.perf_counter()
        for step in range(n - 1):
            result = runner.forward(ForwardBatch([SequenceChunk([toks[i]], len(prompt_ids) + step, t, i, epoch, greedy)
                                                  for i, (t, epoch) in enumerate(tables)]))
            toks = [token.token_id for token in result.tokens]
        return streams * (n - 1) / (time.perf_counter() - started)

    generate(prompt, 8)                                           # warm-up
    decodes = [generate(prompt, args.tokens) for _ in range(args.repeat)]
    long_ids = tokenizer.encode(tokenizer.render_chat([{"role": "user", "content": long_message(tokenizer)}]))
    started = time.perf_counter()
    runner.forward(ForwardBatch([SequenceChunk(long_ids, 0, table(len(long_ids) + 1), 0, next(epochs), greedy)]))
    ttft = time.perf_counter() - started
    pages = iter(range(runner.num_pages))
    batched = [generate(prompt, args.tokens, streams=args.streams) for _ in range(args.repeat)]
    return {"dtype": runner.info.dtype, "device": runner.info.device, "prompt_tokens": len(prompt),
            "long_tokens": len(long_ids), "decode": median(decodes), "decode_runs": decodes,
            "ttft_long": ttft, "agg": median(batched), "agg_runs": batched}


# ---------------------------------------------------------------------------------------------
# OpenAI-compatible servers over HTTP (radixgate, llama.cpp's server)


async def one_stream(client, model: str, content: str, max_tokens: int, extra: dict) -> dict:
    started = time.perf_counter()
    stamps = []
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], temperature=0,
        max_tokens=max_tokens, stream=True, extra_body=extra)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
    # One content chunk per token on both servers (radixgate may merge a few for UTF-8 pieces).
    n = len(stamps)
    return {"ttft": stamps[0] - started if stamps else float("nan"), "tokens": n,
            "decode": (n - 1) / (stamps[-1] - stamps[0]) if n > 1 else float("nan"),
            "end": stamps[-1] if stamps else time.perf_counter(), "start": started}


async def http_suite(base_url: str, model: str, args, tokenizer, extra: dict) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=900)
    await one_stream(client, model, CHAT, 8, extra)                         # warm-up
    singles = [await one_stream(client, model, CHAT, args.tokens, extra) for _ in range(args.repeat)]
    long = await one_stream(client, model, long_message(tokenizer), 4, extra)
    aggs, p95s, empty = [], [], 0
    for run in range(args.repeat):
        started = time.perf_counter()
        many = await asyncio.gather(*(one_stream(client, model, f"(reader {i}, run {run}) {CHAT}", args.tokens,
                                                 extra) for i in range(args.streams)))
        wall = max(r["end"] for r in many) - started
        aggs.append(sum(r["tokens"] for r in many) / wall)
        p95s.append(pct([r["ttft"] for r in many if r["tokens"]], 0.95))
        empty += sum(1 for r in many if not r["tokens"])
    decodes = [r["decode"] for r in singles]
    return {"decode": median(decodes), "decode_runs": decodes, "tokens": singles[0]["tokens"],
            "ttft_long": long["ttft"], "agg": median(aggs), "agg_runs": aggs, "p95_ttft": median(p95s),
            "empty_streams": empty}


def ours_http(args, tokenizer) -> dict:
    from bench.serve_process import radixgate_server

    model = {"name": MODEL, "backend": "cpu", "source": SOURCE, "dtype": args.dtype}
    if args.threads:
        model["threads"] = args.threads
    with radixgate_server(model) as base_url:
        return asyncio.run(http_suite(base_url, MODEL, args, tokenizer, {"ignore_eos": True}))


@contextlib.contextmanager
def llama_server(path: str, threads: int, python: str):

    from bench.serve_process import free_port, wait_until_ready

    port = free_port()
    log_path = Path(tempfile.mkdtemp()) / "llama_server.log"
    log = open(log_path, "w")
    process = subprocess.Popen([python, "-m", "llama_cpp.server", "--model", path, "--port", str(port),
                                "--n_ctx", "4096", "--n_threads", str(threads), "--model_alias", MODEL,
                                # its default cuts a running stream when the next request arrives;
                                # measure it at its best: one request after the other
                                "--interrupt_requests", "False"],
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_ready(process, f"http://127.0.0.1:{port}/v1/models", log_path, 300)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


# ---------------------------------------------------------------------------------------------
# Peers in process


def hf_fp32(args, tokenizer) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from backends.source import resolve_source

    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    path = resolve_source(SOURCE).path
    folder, name = os.path.split(path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer.encode(tokenizer.render_chat([{"role": "user", "content": CHAT}]))])

    def gen(input_ids, n):
        started = time.perf_counter()
        model.generate(input_ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - started

    gen(ids, 4)
    first = gen(ids, 1)
    decodes = [(args.tokens - 1) / (gen(ids, args.tokens) - first) for _ in range(args.repeat)]
    long_ids = torch.tensor([tokenizer.encode(tokenizer.render_chat(
        [{"role": "user", "content": long_message(tokenizer)}]))])
    return {"decode": median(decodes), "decode_runs": decodes, "ttft_long": gen(long_ids, 1)}


def llama_in_process(args, tokenizer, path: str) -> dict:
    """llama-cpp-python in a fresh process: loaded next to torch's OpenMP it crashed (GPF in ggml-cpu)."""
    import json
    import tempfile

    threads = args.threads or len(os.sched_getaffinity(0))
    prompt = tokenizer.encode(tokenizer.render_chat([{"role": "user", "content": CHAT}]))
    long_ids = tokenizer.encode(tokenizer.render_chat([{"role": "user", "content": long_message(tokenizer)}]))
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"path": path, "threads": threads, "tokens": args.tokens, "prompt": prompt, "long": long_ids,
                   "repeat": args.repeat}, f)
    out = subprocess.run([args.llama_python, __file__, "--llama-worker", f.name], capture_output=True, text=True,
                         timeout=900)
    os.unlink(f.name)
    if out.returncode != 0:
        raise RuntimeError(f"worker exit status {out.returncode} (negative: killed by that signal) "
                           f"{out.stderr[-1500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def llama_worker(job_path: str) -> None:
    import json

    from llama_cpp import Llama

    job = json.loads(Path(job_path).read_text())
    llm = Llama(model_path=job["path"], n_ctx=4096, n_threads=job["threads"], n_threads_batch=job["threads"],
                verbose=False)

    def gen(ids, n):
        llm.reset()
        stamps, started = [], time.perf_counter()
        for i, _ in enumerate(llm.generate(ids, temp=0.0, top_k=1, reset=True)):
            stamps.append(time.perf_counter())
            if i + 1 >= n:
                break
        return stamps[0] - started, (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0

    gen(job["prompt"], 8)
    decodes = [gen(job["prompt"], job["tokens"])[1] for _ in range(job["repeat"])]
    ttft, _ = gen(job["long"], 1)
    print(json.dumps({"decode": sorted(decodes)[len(decodes) // 2], "decode_runs": decodes, "ttft_long": ttft}))


# ---------------------------------------------------------------------------------------------


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--llama-worker":
        return llama_worker(sys.argv[2])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of each decode and 8-stream measurement; the table shows the median")
    parser.add_argument("--dtype", default="auto", help="the server's dtype (auto: int4 on a CPU that has the kernel)")
    parser.add_argument("--dtypes", default="auto,float32", help="in-process runs, comma-separated")
    parser.add_argument("--threads", type=int, default=None, help="default: all cores of the affinity mask")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--skip-http", action="store_true")
    parser.add_argument("--skip-llama", action="store_true")
    parser.add_argument("--llama-python", default=sys.executable,
                        help="a Python with llama-cpp-python[server] installed (default: this one)")
    args = parser.parse_args()

    from backends.source import resolve_source
    from gateway.templating import load_tokenizer

    tokenizer = load_tokenizer(resolve_source(SOURCE))
    path = resolve_source(SOURCE).path
    print(f"# bench/cpu.py  {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  "
          f"cmd: python {' '.join(sys.argv)}")
    print(f"# radixgate HTTP server dtype: {args.dtype}")
    print(f"# host: {os.cpu_count()} cpus, affinity {len(os.sched_getaffinity(0))}, load {os.getloadavg()[0]:.2f}; "
          f"greedy, {args.tokens} new tokens, {args.streams} streams")
    rows: dict[str, dict] = {}

    def section(name, fn, *a):
        print(f"... {name}", flush=True)
        started = time.perf_counter()
        try:
            rows[name] = fn(*a)
        except Exception as exc:          # a missing peer must not sink the rest of the table
            print(f"    {name} failed: {type(exc).__name__}: {exc}")
            return
        print(f"    {rows[name]}  ({time.perf_counter() - started:.0f} s)", flush=True)

    for dtype in args.dtypes.split(","):
        section(f"radixgate in process {dtype}", ours_in_process, args, tokenizer, dtype)
    if not args.skip_http:
        section("radixgate HTTP", ours_http, args, tokenizer)   # dtype: args.dtype
    if not args.skip_hf:
        section("HF transformers fp32", hf_fp32, args, tokenizer)
    have_llama = False
    if not args.skip_llama:
        have_llama = subprocess.run([args.llama_python, "-c", "import llama_cpp"],
                                    capture_output=True).returncode == 0
        if not have_llama:
            print("SKIP llama.cpp: llama-cpp-python is not installed. To measure it: "
                  "CMAKE_ARGS=\"-DGGML_NATIVE=ON\" pip install 'llama-cpp-python[server]==0.3.36' (~7 min build). "
                  "Peer figures below are the issue's, NOT measured in this run.")
    if have_llama:
        section("llama.cpp in process", llama_in_process, args, tokenizer, path)
        threads = args.threads or len(os.sched_getaffinity(0))

        def llama_http():
            with llama_server(path, threads, args.llama_python) as url:
                return asyncio.run(http_suite(url, MODEL, args, tokenizer, {}))
        section("llama.cpp server HTTP", llama_http)

    def get(name, key):
        return rows.get(name, {}).get(key, float("nan"))

    print()
    print(f"| engine | decode tok/s (1 stream) | TTFT cold ~650-tok prompt s | {args.streams}-stream aggregate tok/s | "
          f"{args.streams}-stream p95 TTFT s |")
    print("|---|---|---|---|---|")
    for name in rows:
        r = rows[name]
        label = name + (f" ({r['dtype']}, {r['device']})" if "dtype" in r else "")
        print(f"| {label} | {r.get('decode', float('nan')):.1f} | {r.get('ttft_long', float('nan')):.2f} | "
              f"{r.get('agg', float('nan')):.1f} | {r.get('p95_ttft', float('nan')):.2f} |")
    llama_decode = get("llama.cpp in process", "decode")
    llama_ttft = get("llama.cpp in process", "ttft_long")
    llama_agg = get("llama.cpp server HTTP", "agg")
    measured = "measured"
    if not have_llama or llama_decode != llama_decode or llama_agg != llama_agg:     # absent or failed (nan)
        llama_decode, llama_ttft = PEERS["llama.cpp in process decode"], PEERS["llama.cpp in process TTFT 650"]
        llama_agg, measured = PEERS["llama.cpp server 8-stream agg"], "peer figures, not this run"
    hf = get("HF transformers fp32", "decode")
    http = get("radixgate HTTP", "decode")
    print()
    print(f"ratios (llama.cpp: {measured}):")
    print(f"  HTTP decode / llama.cpp in process = {http / llama_decode:.2f}  (target >= 0.5)")
    print(f"  HTTP decode / HF fp32              = {http / hf:.2f}  (target >= 3)")
    print(f"  HTTP {args.streams}-stream agg / llama.cpp server agg = {get('radixgate HTTP', 'agg') / llama_agg:.2f}"
          f"  (target >= 3)")
    print(f"  cold 650 TTFT: ours HTTP {get('radixgate HTTP', 'ttft_long'):.2f} s, in process "
          f"{get('radixgate in process ' + args.dtype, 'ttft_long'):.2f} s vs llama.cpp in process {llama_ttft:.2f} s "
          f"(target: no slower)")


if __name__ == "__main__":
    main()
