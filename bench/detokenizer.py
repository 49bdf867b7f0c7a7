"""Host cost of incremental detokenization per generated token: IncrementalDetokenizer.add_token
against the original two-decodes-per-token method (tests/test_detokenizer.py::_Reference).

64 streams x 256 tokens of real text (a paragraph encoded with the packaged SmolLM2 tokenizer,
each stream starting elsewhere in it), fed step by step across the streams as the scheduler does,
finish() included, without and with 3 stop strings. Tokenizers: the server's ChatTokenizer (the
new detokenizer takes its byte-level path) and "general", the same Rust tokenizer with its decoder
wrapped in a Sequence so that it is not recognised as byte-level (the path SentencePiece models
get); each new row is compared with the reference on the same tokenizer. tokenizers'
DecodeStream is timed for comparison (it handles no stop strings). Best of --repeat runs.

    python bench/detokenizer.py [--streams 64] [--tokens 256] [--repeat 7]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backends.source import resolve_source  # noqa: E402
from gateway.detokenizer import IncrementalDetokenizer, byte_level_table  # noqa: E402
from gateway.templating import load_tokenizer  # noqa: E402
from tests.test_detokenizer import _Reference  # noqa: E402

PARAGRAPH = (
    "The committee met on Tuesday to review the quarterly results. Revenue grew by 12% compared "
    "with the same period last year, driven mainly by strong demand in the Asia-Pacific region, "
    "while operating costs rose only slightly. \"We're pleased with the progress,\" said the chief "
    "financial officer, adding that the company would keep investing in research and development. "
    "Several members asked about the new product line: its launch was delayed by two months because "
    "of supply-chain problems, but early feedback from customers in Tokyo (東京) and São Paulo has "
    "been positive. The board approved a dividend of €0.45 per share, payable on 15 March. Next, "
    "the discussion turned to hiring plans for the engineering teams, remote work policies, and the "
    "budget for the annual conference — which, after a vote, will be held in Lisbon this year. "
)
STOPS = ["\n\nUser:", "###", "</answer>"]     # typical API stop strings that never match here


def streams(tok, n_streams: int, n_tokens: int) -> list[list[int]]:
    ids = tok.encode(PARAGRAPH)
    reps = (n_tokens + 37 * n_streams) // len(ids) + 2
    ids = tok.encode(PARAGRAPH * reps)
    return [ids[37 * k:37 * k + n_tokens] for k in range(n_streams)]


def run_detok(make, seqs) -> float:
    dets = [make() for _ in seqs]
    t0 = time.perf_counter()
    for step in range(len(seqs[0])):
        for det, seq in zip(dets, seqs, strict=True):
            det.add_token(seq[step])
    for det in dets:
        det.finish()
    return time.perf_counter() - t0


def run_decode_stream(backend, seqs) -> float:
    from tokenizers.decoders import DecodeStream
    dets = [DecodeStream(skip_special_tokens=True) for _ in seqs]
    t0 = time.perf_counter()
    for step in range(len(seqs[0])):
        for det, seq in zip(dets, seqs, strict=True):
            det.step(backend, seq[step])
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()

    from tokenizers import Tokenizer, decoders
    tok = load_tokenizer(resolve_source("packaged:smollm2-135m-instruct"))
    t0 = time.perf_counter()
    byte_level_table(tok, True)          # built once per tokenizer and process; not in the rows
    table_s = time.perf_counter() - t0
    general = Tokenizer.from_str(tok._backend.to_str())
    general.decoder = decoders.Sequence([decoders.ByteLevel()])     # same text, not recognised
    assert byte_level_table(general, True) is None
    seqs = streams(tok, args.streams, args.tokens)
    n = args.streams * args.tokens

    # (method, tokenizer, stops, factory): the ratio is against the reference on the same
    # tokenizer with the same stops.
    rows = []
    for stops in ([], STOPS):
        for label, t in (("ChatTokenizer", tok), ("general", general)):
            rows.append(("reference: 2 decodes/token", label, stops, lambda t=t, s=stops: _Reference(t, s)))
            path = "byte-level path" if label == "ChatTokenizer" else "general path"
            rows.append((f"new: {path}", label, stops, lambda t=t, s=stops: IncrementalDetokenizer(t, s)))

    # Same output as the reference first (the tests prove it more broadly).
    def chunks(det, seq):
        return [det.add_token(i) for i in seq] + [det.finish()]
    for _, _, stops, make in rows:
        for seq in seqs[:8]:
            assert chunks(make(), seq) == chunks(_Reference(tok, stops), seq)

    # Round-robin repeats, so that load from elsewhere on the machine hits every row alike.
    times: list[list[float]] = [[] for _ in range(len(rows) + 1)]
    for _ in range(args.repeat):
        for k, (_, _, _, make) in enumerate(rows):
            times[k].append(run_detok(make, seqs))
        times[-1].append(run_decode_stream(tok._backend, seqs))

    print(f"{args.streams} streams x {args.tokens} tokens = {n} tokens of real text; "
          f"best / median of {args.repeat}; byte table built once in {table_s * 1e3:.0f} ms")
    print(f"{'method':30} {'tokenizer':>13} {'stops':>5} {'us/token':>9} {'median':>7} {'vs ref':>7}")
    base = {}
    for (name, label, stops, _), ts in zip(rows, times, strict=False):
        per = min(ts) / n * 1e6
        if name.startswith("reference"):
            base[label, len(stops)] = per
        print(f"{name:30} {label:>13} {len(stops):5d} {per:9.3f} {statistics.median(ts) / n * 1e6:7.3f} "
              f"{base[label, len(stops)] / per:6.2f}x")
    per = min(times[-1]) / n * 1e6
    print(f"{'tokenizers DecodeStream.step':30} {'Tokenizer':>13} {'-':>5} {per:9.3f} "
          f"{statistics.median(times[-1]) / n * 1e6:7.3f} {base['ChatTokenizer', 0] / per:6.2f}x"
          "  (no stop strings; not identical on SentencePiece)")

if __name__ == "__main__":
    main()
