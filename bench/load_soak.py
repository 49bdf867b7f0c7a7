"""Soak: many clients, every kind of request, good and bad, for a set time; then the books.

C clients (default 64) loop for D seconds (default 600) against `radixgate serve` (the embedded model,
one API key, a 1 MiB body limit). Each client draws its next request from one fixed mix with its own
seeded generator:
  short chat, plain or streamed (one shared system prompt: a cached prefix);
  the next turn of the client's conversation (streamed; its history is the prefix, reset after 4 turns);
  a document to summarise (~1,500 tokens, streamed; one in three from a set of four every client shares,
  the rest unique);
  a text completion (plain);
  a stream the client drops after two chunks (a disconnect mid-stream);
  a bad request, of nine kinds (malformed JSON, unknown model, temperature 5, no messages, max_tokens -1,
  stream "yes", a body over the limit, a prompt past the context, a wrong API key): each should be the
  4xx named in BAD.
Every request runs under a client timeout: one that passes it counts as a hang, not as a wait.

Printed: requests by kind and outcome; 4xx by kind (the expected status or not); 5xx (must be 0);
cut streams (a stream that ended without [DONE] which the client did not drop); stream error events;
hangs; p50/p99 TTFT (streamed) and latency (every request answered 200); completion tokens/s; engine
steps/s; RSS of the gateway and of the engine process at the start of the load, after the first minute,
and at the end, with the host KV tier's share of it (that tier fills up to its bound: flatness is judged
without it); once idle, the page books (no page held by a request or locked, free + cached = total);
and the SIGTERM exit (the server checks its books itself, logs them and exits 0).

Then the same load for --peer-duration seconds (default 120) against llama.cpp's server (`llama-server`
on PATH, or --llama-server) and mlx-lm's server (when mlx-lm is installed), each serving the same
weights; the printed table puts them side by side: errors, cut streams, 5xx, hangs, TTFT, latency. A
peer that is not installed is named and skipped. (They have no API keys: the wrong-key kind is ours only.)

    python bench/load.py soak                                                 # 10 min, then the peers
    python bench/load.py soak --duration 60 --clients 16 --peer-duration 30   # a quick look
    python bench/load.py soak --sides "mlx-lm server"                         # one side only
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
import yaml  # noqa: E402

from bench.load_admission import PARAGRAPHS, QUESTIONS, SYSTEM, pct  # noqa: E402
from bench.serve_process import ROOT, free_port, server_process  # noqa: E402

NAME = "soak-model"
KEY = "soak-key-0123456789"
SOURCE = "packaged:smollm2-135m-instruct"
BODY_LIMIT = 1 << 20                 # the server's max_body_bytes in this run
TURNS = 4                            # a conversation restarts after this many turns
SHARED_DOCS = 4                      # documents every client may send (a shared long prefix)
HOST_CACHE_GB = 2.0                  # the server's host KV tier (the default, set here to know its bytes)
# what each client sends, by weight (bad requests: about one in nine)
MIX = {"chat": 24, "chat_stream": 24, "turn": 18, "document": 8, "completion": 10, "drop": 6, "bad": 12}
# bad requests: kind -> the status it should get (an unknown model is a 404; the body limit a 413)
BAD = {"malformed JSON": 400, "unknown model": 404, "temperature 5": 400, "no messages": 400,
       "max_tokens -1": 400, "stream 'yes'": 400, "body over the limit": 413, "prompt past the context": 400,
       "wrong API key": 401}


@dataclass
class Target:
    """One server under load: where it is, which model name it answers to, what it supports."""
    label: str
    base_url: str
    model: str
    process: subprocess.Popen
    radixgate: bool = False          # ours: checks API keys (the wrong-key kind applies), books in /health


@dataclass
class Outcome:
    kind: str
    result: str                      # ok | 4xx | 5xx | cut | stream_error | hang | transport | dropped
    status: int = 0
    start: float = 0.0
    ttft: float | None = None
    latency: float | None = None
    completion_tokens: int = 0
    detail: str = ""


@dataclass
class Books:
    outcomes: list[Outcome] = field(default_factory=list)
    # (t, server, children, host-tier high water): bytes. The host KV tier (L2, host_cache_gb) is
    # reserved but not touched until evicted pages land in it: the engine's RSS grows with it up to
    # its bound. Flatness is judged on the RSS without it.
    rss: list[tuple[float, int, int, int]] = field(default_factory=list)
    l2_high_water: int = 0


# ---- what the clients send ---------------------------------------------------------------------------

def document(index: int, tag: str) -> str:
    """A document of ~1,500 tokens (~38 per paragraph for this tokenizer) to summarise."""
    body = "".join(PARAGRAPHS[(i + index) % len(PARAGRAPHS)] for i in range(40))
    return f"Document {tag}.\n{body}\nSummarise the document above in two sentences."


def past_the_context() -> str:
    """~12k tokens of text: past the embedded model's 8,192-token context, well under the body limit."""
    return "".join(PARAGRAPHS[i % len(PARAGRAPHS)] for i in range(320))


def bad_request(kind: str, target: Target) -> tuple[bytes | dict, dict]:
    """(body, extra headers) of one bad request."""
    messages = [{"role": "user", "content": "Hello there."}]
    good = {"model": target.model, "messages": messages, "max_tokens": 8}
    if kind == "malformed JSON":
        return b'{"model": "' + target.model.encode() + b'", "messages": [{"role": "user", "con', {}
    if kind == "unknown model":
        return {**good, "model": "no-such-model"}, {}
    if kind == "temperature 5":
        return {**good, "temperature": 5}, {}
    if kind == "no messages":
        return {**good, "messages": []}, {}
    if kind == "max_tokens -1":
        return {**good, "max_tokens": -1}, {}
    if kind == "stream 'yes'":
        return {**good, "stream": "yes"}, {}
    if kind == "body over the limit":
        return {**good, "messages": [{"role": "user", "content": "x" * (2 * BODY_LIMIT)}]}, {}
    if kind == "prompt past the context":
        return {**good, "messages": [{"role": "user", "content": past_the_context()}]}, {}
    if kind == "wrong API key":
        return good, {"Authorization": "Bearer not-the-key"}
    raise ValueError(kind)


class Client:
    """One looping client: its own generator, its own conversation."""

    def __init__(self, index: int, target: Target, http: httpx.AsyncClient, books: Books, seed: int):
        self.index, self.target, self.http, self.books = index, target, http, books
        self.rng = random.Random(seed * 1000 + index)
        self.history: list[dict] = []
        self.bad_kinds = [k for k in BAD if target.radixgate or k != "wrong API key"]

    async def run(self, deadline: float) -> None:
        kinds, weights = list(MIX), list(MIX.values())
        while time.perf_counter() < deadline:
            kind = self.rng.choices(kinds, weights)[0]
            self.books.outcomes.append(await getattr(self, kind)())

    def chat_body(self, messages: list[dict], max_tokens: int, stream: bool) -> dict:
        body = {"model": self.target.model, "messages": messages, "max_tokens": max_tokens,
                "temperature": 0.8, "seed": self.rng.randrange(1 << 30), "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body

    def question(self) -> str:
        return f"(visitor {self.index}) {self.rng.choice(QUESTIONS)}"

    async def chat(self) -> Outcome:
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": self.question()}]
        return await self.plain("chat", "/chat/completions", self.chat_body(messages, 24, False))

    async def chat_stream(self) -> Outcome:
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": self.question()}]
        return await self.streamed("chat_stream", "/chat/completions", self.chat_body(messages, 24, True))

    async def turn(self) -> Outcome:
        if len(self.history) >= 2 * TURNS + 1 or not self.history:
            self.history = [{"role": "system", "content": SYSTEM}]
        self.history.append({"role": "user", "content": self.question()})
        outcome = await self.streamed("turn", "/chat/completions", self.chat_body(self.history, 32, True))
        if outcome.result == "ok":
            self.history.append({"role": "assistant", "content": outcome.detail})
        else:
            self.history = []
        return outcome

    async def document(self) -> Outcome:
        shared = self.rng.random() < 1 / 3
        index = self.rng.randrange(SHARED_DOCS) if shared else self.rng.randrange(1 << 30)
        text = document(index, f"S{index}" if shared else f"U{index:x}")
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]
        return await self.streamed("document", "/chat/completions", self.chat_body(messages, 32, True))

    async def completion(self) -> Outcome:
        prompt = f"{SYSTEM}\nVisitor {self.index} asks: {self.rng.choice(QUESTIONS)}\n"
        body = {"model": self.target.model, "prompt": prompt, "max_tokens": 24, "temperature": 0.8,
                "seed": self.rng.randrange(1 << 30)}
        return await self.plain("completion", "/completions", body)

    async def drop(self) -> Outcome:
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": self.question()}]
        return await self.streamed("drop", "/chat/completions", self.chat_body(messages, 64, True), drop_after=2)

    async def bad(self) -> Outcome:
        kind = self.rng.choice(self.bad_kinds)
        body, headers = bad_request(kind, self.target)
        return await self.plain(f"bad: {kind}", "/chat/completions", body, headers)

    # ---- one request, plain or streamed -------------------------------------------------------------

    def headers(self, extra: dict | None = None) -> dict:
        return {"Authorization": f"Bearer {KEY}", **(extra or {})}

    async def plain(self, kind: str, path: str, body: bytes | dict, extra: dict | None = None) -> Outcome:
        out = Outcome(kind, "ok", start=time.perf_counter())
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        try:
            response = await self.http.post(self.target.base_url + path, content=content,
                                            headers={"Content-Type": "application/json", **self.headers(extra)})
        except httpx.HTTPError as error:
            return classify_error(out, error)
        out.status, out.latency = response.status_code, time.perf_counter() - out.start
        if response.status_code != 200:
            return classify_status(out, response.text)
        try:
            usage = response.json().get("usage") or {}
            out.completion_tokens = usage.get("completion_tokens", 0)
        except ValueError:
            out.result, out.detail = "5xx", "a 200 whose body is not JSON"
        return out

    async def streamed(self, kind: str, path: str, body: dict, drop_after: int = 0) -> Outcome:
        out = Outcome(kind, "ok", start=time.perf_counter())
        text, chunks, done = [], 0, False
        try:
            async with self.http.stream("POST", self.target.base_url + path, json=body,
                                        headers=self.headers()) as response:
                out.status = response.status_code
                if response.status_code != 200:
                    return classify_status(out, (await response.aread()).decode(errors="replace"))
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        break
                    try:
                        event = json.loads(data)
                    except ValueError:
                        out.result, out.detail = "cut", f"an event that is not JSON: {data[:80]!r}"
                        return out
                    if "error" in event:
                        out.result, out.detail = "stream_error", str(event["error"])[:200]
                        return out
                    piece = "".join((c.get("delta") or {}).get("content") or c.get("text") or ""
                                    for c in event.get("choices") or [])
                    if piece:
                        chunks += 1
                        text.append(piece)
                        if out.ttft is None:
                            out.ttft = time.perf_counter() - out.start
                        if drop_after and chunks >= drop_after:
                            out.result = "dropped"        # leaving the block closes the connection
                            return out
                    if event.get("usage"):
                        out.completion_tokens = event["usage"].get("completion_tokens", 0)
        except httpx.HTTPError as error:
            return classify_error(out, error)
        out.latency = time.perf_counter() - out.start
        if not done:
            out.result, out.detail = "cut", f"ended after {chunks} chunks without [DONE]"
        elif drop_after:
            out.result = "dropped"                        # it finished before the second chunk
        out.detail = out.detail or "".join(text)
        return out


def classify_status(out: Outcome, body: str) -> Outcome:
    out.result = "5xx" if out.status >= 500 else "4xx"
    out.detail = body[:200]
    return out


def classify_error(out: Outcome, error: Exception) -> Outcome:
    out.result = "hang" if isinstance(error, httpx.TimeoutException) else "transport"
    out.detail = f"{type(error).__name__}: {error}"[:200]
    return out


# ---- the process side: RSS, the page books -----------------------------------------------------------

def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found + [g for c in found for g in children(c)]


async def sample_rss(target: Target, books: Books, started: float, deadline: float) -> None:
    while True:
        await sample_once(target, books, started)
        if time.perf_counter() >= deadline:
            return
        await asyncio.sleep(min(10.0, max(0.0, deadline - time.perf_counter())))


async def sample_once(target: Target, books: Books, started: float) -> None:
    pid = target.process.pid
    if target.radixgate:
        cache = (await health(target))["radix_cache_stats"]
        if cache.get("l2_capacity_pages"):
            page_bytes = int(HOST_CACHE_GB * (1 << 30)) // cache["l2_capacity_pages"]
            books.l2_high_water = max(books.l2_high_water, cache["l2_pages"] * page_bytes)
    books.rss.append((time.perf_counter() - started, rss_bytes(pid), sum(rss_bytes(c) for c in children(pid)),
                      books.l2_high_water))


async def health(target: Target) -> dict:
    async with httpx.AsyncClient(timeout=30) as http:
        return (await http.get(target.base_url.removesuffix("/v1") + "/health")).json()["models"][target.model]


async def idle_books(target: Target) -> dict:
    """Once the engine is idle: what it holds. free + cached must be every page, nothing held or locked."""
    for _ in range(600):
        snap = await health(target)
        if snap["running_requests"] == 0 and snap["waiting_requests"] == 0:
            break
        await asyncio.sleep(0.1)
    cache = snap["radix_cache_stats"]
    return {"total": snap["kv_pages_total"], "free": snap["kv_pages_free"], "cached": cache["evictable_pages"],
            "held": snap["kv_pages_held_by_requests"], "locked": cache["protected_pages"],
            "leaked": snap["kv_pages_total"] - snap["kv_pages_free"] - cache["evictable_pages"],
            "running": snap["running_requests"], "waiting": snap["waiting_requests"],
            "cancelled_total": snap["cancelled_total"], "steps_total": snap["steps_total"]}


# ---- one load run ----------------------------------------------------------------------------------------

async def run_load(target: Target, clients: int, duration: float, seed: int) -> dict:
    books = Books()
    # client timeout: no byte for this long is a hang (a long document behind 63 others takes a few s)
    timeout = httpx.Timeout(connect=10, read=120, write=30, pool=120)
    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=clients + 8)) as http:
        warm = Client(-1, target, http, Books(), seed)
        await warm.chat_stream()                      # the shared system prompt goes into the cache
        before = await health(target) if target.radixgate else None
        started = time.perf_counter()
        deadline = started + duration
        sampler = asyncio.create_task(sample_rss(target, books, started, deadline))
        await asyncio.gather(*(Client(i, target, http, books, seed).run(deadline) for i in range(clients)))
        ended = time.perf_counter()
        await sampler
        await sample_once(target, books, started)
    summary = summarise(books, ended - started)
    if target.radixgate:
        pages = await idle_books(target)
        summary["pages"] = pages
        summary["steps_per_s"] = (pages["steps_total"] - before["steps_total"]) / (ended - started)
        summary["cancelled"] = pages["cancelled_total"] - before["cancelled_total"]
    return summary


def summarise(books: Books, wall: float) -> dict:
    outcomes = books.outcomes
    counts = {result: sum(o.result == result for o in outcomes)
              for result in ("ok", "dropped", "4xx", "5xx", "cut", "stream_error", "hang", "transport")}
    by_kind: dict[str, dict[str, int]] = {}
    for o in outcomes:
        row = by_kind.setdefault(o.kind, {})
        key = f"{o.result} {o.status}" if o.result in ("4xx", "5xx") else o.result
        row[key] = row.get(key, 0) + 1
    unexpected = [o for o in outcomes if o.kind.startswith("bad: ") and o.status != BAD[o.kind[5:]]]
    good_failed = [o for o in outcomes if not o.kind.startswith("bad: ") and o.result not in ("ok", "dropped")]
    ttft = [o.ttft for o in outcomes if o.ttft is not None and o.result in ("ok", "dropped")]
    latency = [o.latency for o in outcomes if o.result == "ok" and o.latency is not None]
    first_minute = next((r for r in books.rss if r[0] >= 60), books.rss[0])
    return {
        "requests": len(outcomes), "wall_s": wall, **counts,
        "bad_unexpected": len(unexpected), "good_failed": len(good_failed),
        "examples": sorted({f"{o.kind}: {o.result} {o.status} {o.detail[:120]}"
                            for o in unexpected + good_failed})[:12],
        "by_kind": by_kind,
        "ttft_p50": pct(ttft, 0.5), "ttft_p99": pct(ttft, 0.99),
        "latency_p50": pct(latency, 0.5), "latency_p99": pct(latency, 0.99),
        "completion_tok_s": sum(o.completion_tokens for o in outcomes) / wall,
        "rss_start": books.rss[0], "rss_1min": first_minute, "rss_end": books.rss[-1],
        "rss_max": max(r[1] + r[2] for r in books.rss), "l2_high_water": books.l2_high_water,
    }


# ---- the servers -------------------------------------------------------------------------------------------

def ours_config(folder: Path, port: int) -> Path:
    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump({
        "server": {"host": "127.0.0.1", "port": port, "api_keys": [KEY], "limits": {"max_body_bytes": BODY_LIMIT}},
        "models": [{"name": NAME, "source": SOURCE, "kv_cache": {"host_cache_gb": HOST_CACHE_GB}}]}))
    return config


def soak_ours(args) -> dict:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        argv = [sys.executable, "-m", "gateway", "serve", "--config", str(ours_config(folder, port)),
                "--log-level", "info"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
        log_path = folder / "server.log"
        with server_process(argv, f"http://127.0.0.1:{port}/health", log_path, env=env) as process:
            target = Target("radixgate", f"http://127.0.0.1:{port}/v1", NAME, process, radixgate=True)
            summary = asyncio.run(run_load(target, args.clients, args.duration, args.seed))
            process.send_signal(signal.SIGTERM)
            summary["exit_code"] = process.wait(timeout=120)
        log = log_path.read_text()
        summary["shutdown_log"] = [line[line.index("model "):] for line in log.splitlines()
                                   if "KV pages in use" in line]
        summary["tracebacks"] = log.count("Traceback")
    return summary


def soak_llama(args) -> dict | str:
    binary = args.llama_server or shutil.which("llama-server")
    if not binary:
        return "not installed (no llama-server on PATH; --llama-server names one)"
    from backends.source import resolve_source
    port = free_port()
    # 8 slots sharing one 32k KV (--kv-unified): continuous batching, as llama.cpp serves many clients
    argv = [binary, "-m", resolve_source(SOURCE).path, "--host", "127.0.0.1", "--port", str(port),
            "-c", "32768", "-np", "8", "--kv-unified", "-t", str(os.cpu_count()), "--alias", NAME,
            "--log-disable"]
    with tempfile.TemporaryDirectory() as tmp, \
            server_process(argv, f"http://127.0.0.1:{port}/health", Path(tmp) / "llama.log") as process:
        target = Target("llama.cpp server", f"http://127.0.0.1:{port}/v1", NAME, process)
        return asyncio.run(run_load(target, args.clients, args.peer_duration, args.seed))


def soak_mlx_lm(args) -> dict | str:
    try:
        import mlx_lm  # noqa: F401
    except ImportError as error:
        return f"not installed (pip install mlx-lm): {error}"
    from backends.source import resolve_source
    from bench.mlx import THEIRS, write_mlx_folder
    from gateway.templating import load_tokenizer
    source = resolve_source(SOURCE)
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        folder.mkdir()
        write_mlx_folder(source.path, folder, load_tokenizer(source))
        argv = [sys.executable, "-m", "mlx_lm", "server", "--model", str(folder), "--host", "127.0.0.1",
                "--port", str(port), "--log-level", "WARNING"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        with server_process(argv, f"http://127.0.0.1:{port}/health", Path(tmp) / "mlx.log", env=env) as process:
            target = Target("mlx-lm server", f"http://127.0.0.1:{port}/v1", THEIRS, process)
            return asyncio.run(run_load(target, args.clients, args.peer_duration, args.seed))


# ---- the report --------------------------------------------------------------------------------------------

def mib(n: int) -> str:
    return f"{n / 2**20:.0f}"


def report(results: dict[str, dict | str]) -> str:
    """The side-by-side table of every side that ran, then radixgate's own books when it ran."""
    sides = {k: v for k, v in results.items() if isinstance(v, dict)}
    head = " | ".join(f"{k} ({v['wall_s']:.0f} s)" for k, v in sides.items())
    lines = [f"| measure | {head} |", "|---" * (len(sides) + 1) + "|"]

    def row(label, fn):
        lines.append(f"| {label} | " + " | ".join(fn(v) for v in sides.values()) + " |")

    row("requests (answered 200 / dropped by the client)", lambda v: f"{v['requests']} ({v['ok']} / {v['dropped']})")
    row("4xx (bad requests answered with another status)", lambda v: f"{v['4xx']} ({v['bad_unexpected']})")
    row("5xx", lambda v: str(v["5xx"]))
    row("good requests that failed", lambda v: str(v["good_failed"]))
    row("cut streams / stream error events", lambda v: f"{v['cut']} / {v['stream_error']}")
    row("hangs (no byte for 120 s) / transport errors", lambda v: f"{v['hang']} / {v['transport']}")
    row("TTFT p50 / p99 (s, streamed)", lambda v: f"{v['ttft_p50']:.2f} / {v['ttft_p99']:.2f}")
    row("latency p50 / p99 (s, answered 200)", lambda v: f"{v['latency_p50']:.2f} / {v['latency_p99']:.2f}")
    row("completion tok/s", lambda v: f"{v['completion_tok_s']:.1f}")
    row("RSS MiB server + children: start / 1 min / end",
        lambda v: " / ".join(mib(r[1] + r[2]) for r in (v["rss_start"], v["rss_1min"], v["rss_end"])))
    out = ["\n".join(lines), ""]
    out += [f"{name}: {v}" for name, v in results.items() if isinstance(v, str)]
    for name, v in sides.items():
        out.append(f"{name} by kind: " + json.dumps(v["by_kind"]))
        if v["examples"]:
            out.append(f"{name}, failures and unexpected statuses (up to 12 kinds):\n  " + "\n  ".join(v["examples"]))
    if "radixgate" in sides:
        out.append(books(sides["radixgate"]))
    return "\n".join(out)


def books(ours: dict) -> str:
    """radixgate's engine, memory and page books, the SIGTERM exit, and the verdict."""
    pages = ours["pages"]
    g0, g1, g2 = ours["rss_start"], ours["rss_1min"], ours["rss_end"]
    growth = (g2[1] + g2[2] - g2[3]) / (g1[1] + g1[2] - g1[3]) - 1
    verdict = {"5xx = 0": ours["5xx"] == 0, "no good request failed": ours["good_failed"] == 0,
               "every bad request got its 4xx": ours["bad_unexpected"] == 0,
               "0 pages leaked, held or locked": pages["leaked"] == pages["held"] == pages["locked"] == 0,
               "RSS without the host KV tier flat after the first minute (< 5%)": growth < 0.05,
               "SIGTERM exit 0": ours["exit_code"] == 0}
    return "\n".join([
        f"\nradixgate engine: {ours['steps_per_s']:.1f} steps/s, {ours['cancelled']} requests cancelled "
        f"(the dropped streams); RSS gateway {mib(g0[1])} / {mib(g1[1])} / {mib(g2[1])} MiB, engine "
        f"{mib(g0[2])} / {mib(g1[2])} / {mib(g2[2])} MiB, of which the host KV tier's pages in use "
        f"{mib(g0[3])} / {mib(g1[3])} / {mib(g2[3])} MiB (start / 1 min / end; the tier's bound "
        f"{HOST_CACHE_GB:g} GiB)",
        f"pages once idle: {pages['total']} total = {pages['free']} free + {pages['cached']} cached; "
        f"held by requests {pages['held']}, locked {pages['locked']}, leaked {pages['leaked']}",
        f"SIGTERM: exit code {ours['exit_code']}; {' / '.join(ours['shutdown_log']) or 'no books logged'}; "
        f"{ours['tracebacks']} tracebacks in the server log",
        f"RSS growth from 1 min to the end, the host KV tier's pages left out: {growth:+.1%} "
        f"(with them: {(g2[1] + g2[2]) / (g1[1] + g1[2]) - 1:+.1%})",
        "verdict: " + ", ".join(f"{k}: {'yes' if ok else 'NO'}" for k, ok in verdict.items())])


SIDES = {"radixgate": soak_ours, "llama.cpp server": soak_llama, "mlx-lm server": soak_mlx_lm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=600, help="seconds of load on radixgate")
    parser.add_argument("--peer-duration", type=float, default=120, help="seconds of load on each peer")
    parser.add_argument("--sides", default="radixgate,llama.cpp server,mlx-lm server",
                        help="which servers, comma-separated, of: " + ", ".join(SIDES))
    parser.add_argument("--llama-server", help="llama.cpp's llama-server binary (default: the one on PATH)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the raw figures here")
    args = parser.parse_args()
    started = datetime.datetime.now(datetime.timezone.utc)
    results: dict[str, dict | str] = {}
    for name in args.sides.split(","):
        results[name] = SIDES[name](args)
        print(f"{name}:", results[name] if isinstance(results[name], str)
              else json.dumps({k: v for k, v in results[name].items() if k != "by_kind"}), flush=True)
    print(f"\n{started:%Y-%m-%d %H:%M} UTC, {platform.node()}, {os.cpu_count()} CPUs, {args.clients} clients, "
          f"radixgate {args.duration:.0f} s, peers {args.peer_duration:.0f} s each, seed {args.seed}\n")
    print(report(results))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), **results}, indent=1, default=str))


if __name__ == "__main__":
    main()
