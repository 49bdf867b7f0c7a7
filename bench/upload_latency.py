"""/health latency while large bodies upload to a live server (the embedded model on CPU, default limits).

Each row: the body sent, what the server answered, and /health latency (p50 / p99 / max, ms) sampled
in a loop while that body uploads, beside the idle figures. The last rows time, in this process, what
parsing the values body would have cost the event loop without the shape check (json.loads + the
request model), for comparison.

    .venv/bin/python -m bench.upload_latency
"""
from __future__ import annotations

import json
import socket
import statistics
import threading
import time

import httpx

from gateway.config import RequestLimits
from gateway.protocol import CompletionRequest
from tests.conftest import MODEL, model_config, start_server

MiB = 1 << 20


def upload(port: int, head: bytes, pieces, answers: list[bytes]) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=120) as raw:
        try:
            raw.sendall(head)
            for piece in pieces:
                raw.sendall(piece)
        except OSError:
            pass                                # the server answered and closed before the end
        answers.append(b"".join(iter(lambda: raw.recv(65536), b"")).split(b"\r\n", 1)[0])


def health_while(url: str, port: int, head: bytes, pieces) -> tuple[str, list[float]]:
    answers: list[bytes] = []
    thread = threading.Thread(target=upload, args=(port, head, pieces, answers))
    samples = []
    with httpx.Client(timeout=30) as http:
        thread.start()
        while thread.is_alive() or len(samples) < 20:
            started = time.perf_counter()
            assert http.get(f"{url}/health").status_code == 200
            samples.append(1e3 * (time.perf_counter() - started))
    thread.join()
    return answers[0].decode(), samples


def paced(body: bytes, piece: int = MiB, pause_s: float = 0.02):
    for start in range(0, len(body), piece):
        yield body[start:start + piece]
        time.sleep(pause_s)


def request_head(length: int | None) -> bytes:
    size = f"content-length: {length}" if length is not None else "transfer-encoding: chunked"
    return (f"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n{size}\r\n"
            "connection: close\r\n\r\n").encode()


def chunked(body: bytes):
    for piece in paced(body):
        yield f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    yield b"0\r\n\r\n"


def row(name: str, answer: str, samples: list[float], idle_p50: float) -> str:
    q = statistics.quantiles(samples, n=100, method="inclusive")
    return (f"| {name} | {answer} | {len(samples)} | {q[49]:.1f} | {q[98]:.1f} | {max(samples):.1f} | "
            f"{q[49] / idle_p50:.2f}x |")


def main() -> None:
    server = start_server(model_config(kv_cache={"num_pages": 256}))
    port = int(server.url.rsplit(":", 1)[1])
    try:
        idle = []
        with httpx.Client(timeout=30) as http:
            for _ in range(200):
                started = time.perf_counter()
                http.get(f"{server.url}/health")
                idle.append(1e3 * (time.perf_counter() - started))
        idle_p50 = statistics.median(idle)
        thirty = b'{"model": "' + MODEL.encode() + b'", "prompt": "' + b"z" * (30 * MiB) + b'"}'
        fifteen = json.dumps({"model": MODEL, "prompt": "z" * (15 * MiB)}).encode()
        values = b'{"model": "' + MODEL.encode() + b'", "prompt": [' + b"1," * (7 * MiB) + b"1]}"
        cases = [("30 MiB, Content-Length", request_head(len(thirty)), paced(thirty)),
                 ("30 MiB, chunked (no length)", request_head(None), chunked(thirty)),
                 ("15 MiB text prompt", request_head(len(fifteen)), paced(fifteen)),
                 ("14 MiB token-id prompt (7.3M values)", request_head(len(values)), paced(values))]
        lines = ["| body | answer | /health samples | p50 ms | p99 ms | max ms | p50 / idle |",
                 "| --- | --- | --- | --- | --- | --- | --- |", row("none (idle)", "", idle, idle_p50)]
        for name, head, pieces in cases:
            answer, samples = health_while(server.url, port, head, pieces)
            lines.append(row(name, answer.removeprefix("HTTP/1.1 "), samples, idle_p50))
        for ids in (RequestLimits().max_json_values, 7 * MiB):       # the limit, and the body above unchecked
            body = b'{"model": "m", "prompt": [' + b"1," * (ids - 1) + b"1]}"
            started = time.perf_counter()
            CompletionRequest.model_validate(json.loads(body))
            lines.append(f"| in process: json.loads + CompletionRequest of {ids} token ids | | | "
                         f"{1e3 * (time.perf_counter() - started):.0f} (one stall) | | | |")
        print("\n".join(lines))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
