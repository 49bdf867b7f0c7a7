"""A learned page selector for Quest-style sparse decode, trained on the embedded model itself.

    python bench/sparse_gate.py train --out gate.pt           # record, train, save (this CPU)
    python bench/sparse_gate.py eval gate.pt --sweep rule=gate ...   # bench/sparse_quality.py with rule "gate"

What it tries: bench/sparse_quality.py's `oracle4` rule (pages chosen by the true attention mass
of each 64-token group) meets every quality target at 7k, while the engine's min/max bounds need
4-token blocks (half the key bytes) to get there. A gate scores each group of `group_pages` pages
from one small vector per group and KV head, [max, min, mean of its keys] projected to `rank`
numbers, against each q head projected the same way; it is trained to reproduce the model's own
distribution of attention over the groups (KL to the true group masses), in the spirit of
SeerAttention-R's attention gates. Stored per group, that vector would be 1/256 of the K/V bytes.

Recording: teacher-forced decode over text the quality bench does not use (english_text() past the
bench's first four 7000-token texts), with the oracle choosing the pages (so the K/V evolve close to
dense), and at every `--every`-th step each sparse layer's queries, group features and true group
masses kept. Training: per layer, Adam on the mean KL over recorded (step, head) rows.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from backends.base import ForwardBatch, RunnerSettings, SequenceChunk, SparseSettings  # noqa: E402
from backends.cuda.attention import sparse as sa  # noqa: E402
from backends.cuda.runner import TorchRunner  # noqa: E402
from backends.source import resolve_source  # noqa: E402
from bench.sparse_quality import grouped_keys  # noqa: E402


def group_features(q: torch.Tensor, k_layer: torch.Tensor, plan, group_pages: int, scale: float,
                   with_mass: bool = True):
    """Per row: the group features [B, G, kvh, 3d] (max, min, mean of each group's written keys),
    the true group masses [B, kvh, g, G] of each q head (softmax over the whole row; None
    without with_mass), and the groups' validity [B, G]."""
    keys, written = grouped_keys(k_layer, plan, group_pages)
    batch, groups, span, kv_heads, head_dim = keys.shape
    count = written.sum(dim=2).clamp(min=1)                                        # [B, G, 1, 1]
    hi = keys.masked_fill(~written, float("-inf")).amax(dim=2)
    lo = keys.masked_fill(~written, float("inf")).amin(dim=2)
    valid = written.any(dim=2).view(batch, groups)
    hi = hi.masked_fill(~valid.view(batch, groups, 1, 1), 0.0)
    lo = lo.masked_fill(~valid.view(batch, groups, 1, 1), 0.0)
    mean = (keys * written).sum(dim=2) / count
    features = torch.cat((hi, lo, mean), dim=-1)                                   # [B, G, kvh, 3d]
    if not with_mass:
        return features, None, valid
    heads = q.shape[1]
    qg = q.float().view(batch, kv_heads, heads // kv_heads, head_dim)
    flat = keys.view(batch, groups * span, kv_heads, head_dim)
    logits = torch.einsum("bhgd,bthd->bhgt", qg, flat) * scale
    logits = logits.masked_fill(~written.view(batch, 1, 1, -1), float("-inf"))
    mass = logits.softmax(dim=-1).view(batch, kv_heads, -1, groups, span).sum(dim=-1)
    return features, mass, valid


@dataclasses.dataclass
class Gate:
    """One layer's projections: q heads [kvh, g, d, r], group features [kvh, 3d, r]."""
    wq: torch.Tensor
    wk: torch.Tensor

    def logits(self, q: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """q [B, H, d], features [B, G, kvh, 3d] -> [B, kvh, g, G]."""
        kv_heads, group, head_dim, _ = self.wq.shape
        qg = q.float().view(q.shape[0], kv_heads, group, head_dim)
        gq = torch.einsum("bhgd,hgdr->bhgr", qg, self.wq)
        gk = torch.einsum("bnhf,hfr->bhnr", features, self.wk)
        return torch.einsum("bhgr,bhnr->bhgn", gq, gk)


def gate_selector(gates: dict[int, Gate], group_pages: int, cache_layers):
    """Pages by the gate's group scores: log-softmax over the row's groups per q head, max over
    the GQA group, every page scoring its group's, forced pages and padding through the plan."""

    def select(q, kmin_layer, kmax_layer, pmin_layer, pmax_layer, plan, scale, fused):
        features, _, valid = group_features(q, cache_layers(kmin_layer), plan, group_pages, scale, with_mass=False)
        logits = gates[cache_layers.index(kmin_layer)].logits(q, features)
        logits = logits.masked_fill(~valid.view(valid.shape[0], 1, 1, -1), float("-inf"))
        scores = (logits - logits.logsumexp(dim=-1, keepdim=True)).amax(dim=2)
        width = plan.sparse_pages.shape[1]
        scores = scores.repeat_interleave(group_pages, dim=-1)[..., :width]
        return sa.select_pages(scores, plan.bias, plan.budget_pages)

    return select


def load_gates(path: str) -> tuple[dict[int, Gate], int]:
    saved = torch.load(path)
    return {int(k): Gate(*v) for k, v in saved["layers"].items()}, int(saved["group_pages"])


def train_layer(records: list[tuple], kv_heads: int, group: int, head_dim: int, rank: int, steps: int,
                seed: int) -> tuple[Gate, float, float]:
    """Fit one layer's gate to its recorded (q, features, mass, valid) rows; returns the gate and
    the mean KL before (a random gate) and after."""
    records = [tuple(t.clone() for t in r) for r in records]       # recorded in inference mode
    torch.manual_seed(seed)
    wq = (torch.randn(kv_heads, group, head_dim, rank) / head_dim ** 0.5).requires_grad_()
    wk = (torch.randn(kv_heads, 3 * head_dim, rank) / (3 * head_dim) ** 0.5).requires_grad_()
    optimizer = torch.optim.Adam([wq, wk], lr=1e-2)

    def loss_of() -> torch.Tensor:
        total, rows = 0.0, 0
        for q, features, mass, valid in records:
            logits = Gate(wq, wk).logits(q, features).masked_fill(~valid.view(valid.shape[0], 1, 1, -1), -1e9)
            log_p = logits.log_softmax(dim=-1)
            target = mass.clamp(min=1e-12)
            kl = (mass * (target.log() - log_p)).sum(dim=-1)                       # [B, kvh, g]
            total = total + kl.sum()
            rows += kl.numel()
        return total / rows

    with torch.no_grad():
        before = float(loss_of())
    for _ in range(steps):
        optimizer.zero_grad()
        loss = loss_of()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = float(loss_of())
    return Gate(wq.detach(), wk.detach()), before, after


class Recorder:
    """A page selector that keeps (q, features, mass, valid) of every sparse layer at every
    `every`-th forward and chooses by the true group mass (the oracle)."""

    def __init__(self, cache_layers, group_pages: int, every: int):
        self.cache_layers, self.group_pages, self.every = cache_layers, group_pages, every
        self.records: dict[int, list[tuple]] = {}
        self.calls = 0
        self.step = 0

    def __call__(self, q, kmin_layer, kmax_layer, pmin_layer, pmax_layer, plan, scale, fused):
        layer = self.cache_layers.index(kmin_layer)
        features, mass, valid = group_features(q, self.cache_layers(kmin_layer), plan, self.group_pages, scale)
        if self.step % self.every == 0:
            self.records.setdefault(layer, []).append((q.float().clone(), features, mass, valid))
        scores = mass.amax(dim=2)
        width = plan.sparse_pages.shape[1]
        scores = scores.repeat_interleave(self.group_pages, dim=-1)[..., :width]
        return sa.select_pages(scores, plan.bias, plan.budget_pages)


def train(argv: list[str]) -> None:
    from bench.sparse_quality import EPOCHS, GREEDY, CacheLayers, Pages, Tokenizer, english_text, prefill
    parser = argparse.ArgumentParser(prog="sparse_gate.py train")
    parser.add_argument("--model", default="packaged:smollm2-135m-instruct")
    parser.add_argument("--tokenizer-json", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-tokens", type=int, default=28000, help="text the quality bench uses, skipped")
    parser.add_argument("--texts", type=int, default=2)
    parser.add_argument("--context", type=int, default=7000)
    parser.add_argument("--positions", type=int, default=400)
    parser.add_argument("--every", type=int, default=8, help="record every N-th decode step")
    parser.add_argument("--budget", type=int, default=1024, help="the recording run's budget (oracle-chosen)")
    parser.add_argument("--group-pages", type=int, default=4)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    source = resolve_source(args.model)
    tok = Tokenizer(args.tokenizer_json, source)
    ids = tok.encode(english_text())[args.skip_tokens:]
    assert len(ids) >= args.texts * args.context, f"only {len(ids)} tokens past the bench's texts"
    texts = [ids[i * args.context:(i + 1) * args.context] for i in range(args.texts)]
    sparse = SparseSettings(True, args.budget, 2, 16, 64, 4, 8192)
    runner = TorchRunner(RunnerSettings(source.kind, source.path, "gate", dtype="float32", device=args.device,
                                        page_size=16, num_pages=args.texts * (args.context + 64) // 16 + 16,
                                        context_length=8192, threads=args.threads, sparse=sparse,
                                        attention="torch"))
    recorder = Recorder(CacheLayers(runner), args.group_pages, args.every)
    start = (args.context - args.positions) // 16 * 16
    pages = Pages(16)
    tables = [pages.take(args.context) for _ in texts]
    t0 = time.perf_counter()
    prefill(runner, [(t[:start], p) for t, p in zip(texts, tables, strict=True)], 1024)
    print(f"prefill {time.perf_counter() - t0:.0f} s", flush=True)
    runner.sparse = runner.attention.sparse = sparse
    runner.attention.page_selector = recorder
    t0 = time.perf_counter()
    for pos in range(start, args.context - 1):
        chunks = [SequenceChunk([t[pos]], pos, table, seq_slot=i, table_epoch=next(EPOCHS), sample=GREEDY)
                  for i, (t, table) in enumerate(zip(texts, tables, strict=True))]
        runner.forward(ForwardBatch(chunks, return_logits=True))
        recorder.step += 1
    print(f"recorded {len(recorder.records)} layers x {len(next(iter(recorder.records.values())))} steps "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    shape = runner.shape
    gates = {}
    for layer, records in sorted(recorder.records.items()):
        gate, before, after = train_layer(records, shape.kv_heads, shape.heads // shape.kv_heads,
                                          shape.head_dim, args.rank, args.steps, layer)
        gates[layer] = (gate.wq, gate.wk)
        print(f"layer {layer:2d}: KL {before:.3f} -> {after:.3f}", flush=True)
    torch.save({"group_pages": args.group_pages, "rank": args.rank, "layers": gates}, args.out)
    print(f"saved {args.out}")


def evaluate(argv: list[str]) -> None:
    """bench/sparse_quality.py with the rule "gate" scoring by the saved gates."""
    from bench import sparse_quality
    gates, group_pages = load_gates(argv[0])
    sparse_quality.EXTRA_RULES["gate"] = lambda cache_layers: gate_selector(gates, group_pages, cache_layers)
    sys.argv = ["bench/sparse_quality.py"] + argv[1:]
    sparse_quality.main()


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in ("train", "eval"):
        raise SystemExit(__doc__)
    (train if sys.argv[1] == "train" else evaluate)(sys.argv[2:])


if __name__ == "__main__":
    main()
