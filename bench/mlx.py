"""Our MLX backend over HTTP against mlx-lm on the same weights and prompts, one run, one table:
mlx-lm's stream_generate in process and mlx-lm's own server (`python -m mlx_lm server`).

    python bench/mlx.py                  # Linux, mlx-cpu: small sizes (the defaults)
    python bench/mlx.py --prompt 512 --new 256 --repeats 5 --turns 6 --turn-new 64    # a Mac (Metal GPU)

Sides. Ours: `radixgate serve` with `backend: mlx` on the embedded SmolLM2-135M GGUF (Q4_1 blocks,
Q8_0 embedding), started by bench/serve_process.py and driven with the openai SDK. mlx-lm cannot
load a GGUF, so the arrays our loader returns (backends/mlx/loader.py: packed 4-/8-bit, group 32,
already in Hugging Face names and rotary layout) are written as an MLX quantised folder
(config.json + model.safetensors + the tokenizer with our chat template), float arrays cast to the
activation dtype our runner picks (float32 on the CPU, the GGUF's float16 on a GPU). mlx-lm's
stream_generate loads that folder in this process and `mlx_lm server` serves it: every side runs
the same numbers. Ours runs them as its start-up choice for the device (--dtype, default auto): on
a Metal GPU the same quantized matmuls as mlx-lm; on the CPU float32 linears of the dequantised
groups split over CPU streams (backends/mlx/cpu_linear.py), where `--dtype int4` runs the
quantized matmuls instead. The earlier in-process side (the engine's
Scheduler over MlxRunner, driven without the server) is dropped: the server runs that same
Scheduler over the same MlxRunner, and the issue's targets are about the server.

Requests. Every side gets the same chat messages, greedy, and generates exactly max_tokens: the
EOS and end-of-turn ids are banned with logit_bias -100 in every request (mlx-lm's server has no
ignore_eos; stream_generate gets the same ban as a logits processor), so the servers do the same
work and the greedy texts can be compared. Each server answers one warm-up request first.
  single-stream decode   --repeats requests one after the other, each a fresh note of --prompt
                         tokens to summarise, --new tokens: (completion tokens - 1) / time from the
                         first streamed token to the last; median. Ours over HTTP against
                         stream_generate in process (the target), and against mlx-lm's server
                         (both over HTTP: what the serving layers cost)
  N-stream aggregate     --streams such requests at once (other notes), on both servers:
                         decode tok/s = completion tokens after each stream's first / time from the
                         earliest first token to the last token; end-to-end tok/s = all completion
                         tokens / time from sending to the last token (prefill included)
  multi-turn TTFT        --conversations conversations, one after the other, of --turns user turns
                         under one system prompt; each turn appends the side's own reply
                         (--turn-new tokens), so all but the last turn's new message was sent before
                         and is cached where the server keeps it. Median time to the first streamed
                         token of the last turn, and that turn's prompt and cached tokens as each
                         server reports them (usage.prompt_tokens_details.cached_tokens)
Prints progress lines, then one markdown table with the ratios and the issue's targets.
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Running `python bench/mlx.py` puts bench/ first on sys.path, where this file would shadow the
# mlx package itself: keep the repository root instead.
sys.path[:] = [str(ROOT)] + [p for p in sys.path if os.path.abspath(p or ".") != str(ROOT / "bench")]

import httpx  # noqa: E402
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
import openai  # noqa: E402

from backends.mlx.loader import load_gguf  # noqa: E402
from backends.mlx.runner import activation_dtype  # noqa: E402
from backends.source import resolve_source  # noqa: E402
from bench.serve_process import free_port, radixgate_server, server_process  # noqa: E402
from gateway.templating import load_tokenizer  # noqa: E402

SOURCE = "packaged:smollm2-135m-instruct"
OURS = "bench-model"
THEIRS = "default_model"          # mlx_lm server: the model given by --model
BAN = -100                        # logit_bias for EOS ids: OpenAI's floor, far below any greedy pick
PASSAGE = ("The history of the printing press is a story of many hands. Movable type appeared in East "
           "Asia centuries before Gutenberg, and the spread of paper, ink and presses changed how ideas "
           "travelled. Harbour towns grew around their lighthouses; keepers logged the weather, the ships "
           "and the tides, and their notebooks are now read by historians of climate and of trade. ")
SYSTEM = ("You are a helpful assistant at a city library. You answer questions about books, opening "
          "hours, membership and events. Answer briefly and kindly; when you do not know something, "
          "say so and suggest the front desk.")
TURNS = ["Can you recommend a book about astronomy?", "Is there a shorter one?", "Who wrote it?",
         "Can I borrow it for three weeks?", "What is the late fee if I keep it longer?",
         "Are there astronomy events this month?", "Thanks. Anything for children?"]


def say(line: str = "") -> None:
    print(line, flush=True)


def note(tokenizer, index: int, tokens: int) -> list[dict]:
    """Chat messages asking to summarise a note of `tokens` tokens; the note's number comes first, so
    two notes share no more than the chat template's head (no prefix cache hit beyond it)."""
    ids = tokenizer.hf.encode(PASSAGE * (tokens // 50 + 1), add_special_tokens=False)[:tokens]
    # a short system message: without one the template inserts its own, ~10 tokens longer, prefill
    # that mlx-cpu pays for on every request
    return [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": f"Note {index}: {tokenizer.decode(ids)}\nSummarise the note in one sentence."}]


@dataclass
class Reply:
    start: float                  # request sent
    first: float                  # first token (first streamed text)
    last: float                   # last token
    text: str
    prompt: int
    cached: int | None            # None: the server did not say
    completion: int

    @property
    def ttft(self) -> float:
        return self.first - self.start

    @property
    def decode(self) -> float:
        # nan when every token came in one piece (a very short run)
        return (self.completion - 1) / (self.last - self.first) if self.last > self.first else float("nan")


# ---- mlx-lm: the weights as an MLX folder, and stream_generate in process -----------------------


def write_mlx_folder(path: str, folder: Path, tokenizer) -> mx.Dtype:
    """The GGUF's arrays (backends/mlx/loader.py) as an MLX quantised folder mlx-lm can load and serve,
    floats in our runner's activation dtype; returns that dtype."""
    config, weights, quant = load_gguf(path)
    assert quant, "the embedded GGUF should be block-quantised"
    assert not config.rope_scaling and config.rope_freq_factors is None, "this writer has no rope scaling"
    act = activation_dtype("auto", weights)
    # our runner calls model.set_dtype(act), which casts scales and biases too: cast the same here,
    # since mlx-lm's server loads the folder as it is
    mx.save_safetensors(str(folder / "model.safetensors"), {
        (k if k == "lm_head.weight" else f"model.{k}"): w.astype(act) if mx.issubdtype(w.dtype, mx.floating) else w
        for k, w in weights.items()})
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim, "rope_theta": config.rope_theta,
        "rms_norm_eps": config.rms_norm_eps, "vocab_size": config.vocab_size,
        "max_position_embeddings": config.context_length, "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": config.attention_bias,
        # mlx-lm reads each module's bits from its packed shape; this is only the default
        "quantization": {"group_size": 32, "bits": 4}}))
    # the GGUF's template may live outside the HF tokenizer object (gateway/templating.py): save the
    # one our server applies, so both servers render the same prompt ids
    hf = copy.deepcopy(tokenizer.hf)
    hf.chat_template = tokenizer.chat_template
    hf.save_pretrained(str(folder))
    return act


class StreamGenerate:
    """mlx-lm's stream_generate on the folder, in this process."""

    def __init__(self, folder: Path, tokenizer):
        from mlx_lm.tokenizer_utils import TokenizerWrapper
        from mlx_lm.utils import load_model

        self.model, _ = load_model(folder)
        mx.eval(self.model.parameters())
        self.tokenizer = TokenizerWrapper(tokenizer.hf)
        # ours stops at its own EOS set (end-of-turn tokens too), mlx-lm at its wrapper's: ban both
        self.banned = sorted(set(tokenizer.eos_token_ids) | set(self.tokenizer.eos_token_ids))
        ban = np.zeros(tokenizer.vocab_size, dtype=np.float32)
        ban[self.banned] = BAN
        self.ban = mx.array(ban)

    def run(self, prompt: list[int], new: int) -> Reply:
        from mlx_lm.generate import stream_generate

        start, first, last, text, count = time.perf_counter(), 0.0, 0.0, [], 0
        for response in stream_generate(self.model, self.tokenizer, prompt, max_tokens=new,
                                        logits_processors=[lambda _, logits: logits + self.ban]):
            last = time.perf_counter()
            first = first or last
            count += 1
            text.append(response.text)
        return Reply(start, first, last, "".join(text), len(prompt), 0, count)


# ---- a server over HTTP (ours or mlx-lm's), the same requests ----------------------------------


async def chat(client, model: str, messages: list[dict], new: int, bias: dict[str, int]) -> Reply:
    start = time.perf_counter()
    first = last = 0.0
    text, usage = [], None
    stream = await client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=new, logit_bias=bias, stream=True,
        stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            last = time.perf_counter()
            first = first or last
            text.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage
    if usage is None or not first:
        raise RuntimeError(f"{model}: a stream without usage or text")
    if usage.completion_tokens != new:
        raise RuntimeError(f"{model}: {usage.completion_tokens} tokens, wanted {new}")
    details = usage.prompt_tokens_details
    return Reply(start, first, last, "".join(text), usage.prompt_tokens,
                 details.cached_tokens if details else None, usage.completion_tokens)


async def conversation(client, model: str, index: int, args, bias: dict[str, int]) -> list[Reply]:
    messages = [{"role": "system", "content": SYSTEM}]
    replies = []
    for turn in range(args.turns):
        messages.append({"role": "user", "content": f"(visitor {index}) {TURNS[turn % len(TURNS)]}"})
        reply = await chat(client, model, messages, args.turn_new, bias)
        messages.append({"role": "assistant", "content": reply.text})
        replies.append(reply)
    return replies


async def server_suite(url: str, model: str, args, tokenizer, bias: dict[str, int], label: str) -> dict:
    client = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=3600)
    await chat(client, model, note(tokenizer, 0, args.prompt), min(args.new, 8), bias)     # warm-up
    singles = [await chat(client, model, note(tokenizer, i, args.prompt), args.new, bias)
               for i in range(1, args.repeats + 1)]
    say(f"{label}: single stream, decode tok/s {[round(r.decode, 2) for r in singles]}")
    sent = time.perf_counter()
    many = await asyncio.gather(*(chat(client, model, note(tokenizer, 1000 + i, args.prompt), args.new, bias)
                                  for i in range(args.streams)))
    agg = {"decode": sum(r.completion - 1 for r in many) / (max(r.last for r in many) - min(r.first for r in many)),
           "end_to_end": sum(r.completion for r in many) / (max(r.last for r in many) - sent)}
    say(f"{label}: {args.streams} streams, aggregate decode {agg['decode']:.2f} tok/s, "
        f"end-to-end {agg['end_to_end']:.2f} tok/s, TTFT {[round(r.ttft, 2) for r in many]} s")
    convs = [await conversation(client, model, c, args, bias) for c in range(args.conversations)]
    for c, replies in enumerate(convs):
        say(f"{label}: conversation {c}, per turn TTFT s / prompt / cached: "
            + ", ".join(f"{r.ttft:.2f}/{r.prompt}/{r.cached}" for r in replies))
    await client.close()
    return {"single": singles, "many": many, "agg": agg, "last_turns": [replies[-1] for replies in convs]}


def ours(args, tokenizer, bias: dict[str, int]) -> dict:
    with radixgate_server({"name": OURS, "source": SOURCE, "backend": "mlx", "dtype": args.dtype}) as url:
        info = httpx.get(url.removesuffix("/v1") + "/health", timeout=30).json()["models"][OURS]
        say(f"ours: radixgate backend {info['backend']}, device {info['device']}, weights {info['dtype']}")
        return asyncio.run(server_suite(url, OURS, args, tokenizer, bias, "ours"))


def mlx_lm_server(folder: Path, args, tokenizer, bias: dict[str, int]) -> dict:
    port = free_port()
    argv = [sys.executable, "-m", "mlx_lm", "server", "--model", str(folder), "--host", "127.0.0.1",
            "--port", str(port), "--log-level", "WARNING"]
    # a local folder needs no hub; offline keeps a missing file from turning into a download
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with server_process(argv, f"http://127.0.0.1:{port}/health", folder.parent / "mlx_lm_server.log", env=env):
        return asyncio.run(server_suite(f"http://127.0.0.1:{port}/v1", THEIRS, args, tokenizer, bias, "mlx-lm server"))


# ---- the run --------------------------------------------------------------------------------------


def same(a: list[Reply], b: list[Reply]) -> str:
    return f"{sum(x.text == y.text for x, y in zip(a, b, strict=True))} of {len(a)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", type=int, default=24, help="note tokens per single/N-stream request "
                        "(the chat around it adds ~34; default 24)")
    parser.add_argument("--new", type=int, default=32, help="new tokens per single/N-stream request (default 32)")
    parser.add_argument("--repeats", type=int, default=3, help="single-stream requests per side (default 3)")
    parser.add_argument("--streams", type=int, default=8, help="concurrent streams (default 8)")
    parser.add_argument("--turns", type=int, default=4, help="user turns per conversation (default 4)")
    parser.add_argument("--turn-new", type=int, default=16, help="new tokens per turn (default 16)")
    parser.add_argument("--conversations", type=int, default=2, help="conversations per server (default 2)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "int4"], help="our server's models[].dtype: "
                        "auto (the device's choice: float32 linears on the CPU) or int4 (quantized matmuls)")
    args = parser.parse_args()
    started = datetime.datetime.now(datetime.timezone.utc)

    import mlx_lm

    source = resolve_source(SOURCE)
    tokenizer = load_tokenizer(source)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        folder.mkdir()
        act = write_mlx_folder(source.path, folder, tokenizer)
        generate = StreamGenerate(folder, tokenizer)
        banned = generate.banned
        bias = {str(t): BAN for t in banned}
        say(f"mx {mx.__version__} on {mx.default_device()}, mlx-lm {mlx_lm.__version__}; activations "
            f"{str(act).removeprefix('mlx.core.')} on every side; EOS ids banned: {banned}")

        prompts = [tokenizer.apply_chat_template(note(tokenizer, i, args.prompt)) for i in range(args.repeats + 1)]
        generate.run(prompts[0], min(args.new, 8))                                                 # warm-up
        lm_single = [generate.run(p, args.new) for p in prompts[1:]]
        say(f"mlx-lm stream_generate: {len(prompts[1])}-token prompts, decode tok/s "
            f"{[round(r.decode, 2) for r in lm_single]}")
        del generate                       # the servers run alone
        gc.collect()
        mx.clear_cache()

        us = ours(args, tokenizer, bias)
        them = mlx_lm_server(folder, args, tokenizer, bias)

    counts = {name: [r.prompt for r in side] for name, side in
              (("ours", us["single"]), ("stream_generate", lm_single), ("mlx-lm server", them["single"]))}
    if len({tuple(c) for c in counts.values()}) > 1:
        say(f"note: the sides' prompt tokens differ: {counts}")
    say(f"greedy text equal: single stream {same(us['single'], lm_single)} (ours vs stream_generate), "
        f"{same(us['single'], them['single'])} (vs mlx-lm server); {args.streams} streams "
        f"{same(us['many'], them['many'])}; last turns {same(us['last_turns'], them['last_turns'])}")

    def cached(side: dict) -> str:
        turns = side["last_turns"]
        hit = "-" if any(r.cached is None for r in turns) else f"{statistics.median_low(r.cached for r in turns)}"
        return f"{hit} / {statistics.median_low(r.prompt for r in turns)}"

    def row(label: str, a: float, b: float, fmt: str, faster: float, target: float | None, peer: str) -> str:
        goal = f">= {target:g}x" if target else "-"
        met = ("yes" if faster >= target else "no") if target else "-"
        return f"| {label} | {fmt.format(a)} | {fmt.format(b)} ({peer}) | {faster:.2f}x | {goal} | {met} |"

    single, lm, lm_http = (statistics.median(r.decode for r in s) for s in (us["single"], lm_single, them["single"]))
    ttft_us, ttft_them = (statistics.median(r.ttft for r in s["last_turns"]) * 1e3 for s in (us, them))
    say()
    say(f"{started:%Y-%m-%d %H:%M} UTC, {platform.node()}, {platform.system()} {platform.machine()}; "
        f"notes of {args.prompt} tokens ({len(prompts[1])}-token prompts) + {args.new} new, {args.repeats} "
        f"single-stream requests, {args.streams} streams, {args.conversations} conversations x {args.turns} "
        f"turns of {args.turn_new} new; greedy; ours with dtype {args.dtype}")
    say()
    say("| measure | ours (radixgate `backend: mlx`, HTTP) | mlx-lm | ours faster by | target | met |")
    say("| --- | --- | --- | --- | --- | --- |")
    say(row("single-stream decode tok/s", single, lm, "{:.2f}", single / lm, 1.0, "stream_generate, in process"))
    say(row("single-stream decode tok/s, both over HTTP", single, lm_http, "{:.2f}", single / lm_http, None,
            "its server"))
    say(row(f"{args.streams}-stream aggregate decode tok/s", us["agg"]["decode"], them["agg"]["decode"], "{:.2f}",
            us["agg"]["decode"] / them["agg"]["decode"], 2.0, "its server"))
    say(row(f"{args.streams}-stream end-to-end tok/s (prefill included)", us["agg"]["end_to_end"],
            them["agg"]["end_to_end"], "{:.2f}", us["agg"]["end_to_end"] / them["agg"]["end_to_end"], None,
            "its server"))
    say(row(f"multi-turn TTFT, turn {args.turns} (ms)", ttft_us, ttft_them, "{:.0f}", ttft_them / ttft_us, 1.0,
            "its server"))
    say(f"| turn {args.turns}: cached / prompt tokens (as reported) | {cached(us)} | {cached(them)} (its server) "
        f"| - | - | - |")


if __name__ == "__main__":
    main()
