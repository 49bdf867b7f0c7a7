"""What a budget per KV head costs the sparse attention: the split-K decode over each (sequence,
KV head)'s chosen keys when a layer's heads keep different numbers of them, against every head
keeping the uniform budget. Llama-3-8B attention shapes (32 q heads, 8 KV heads, d 128, bf16,
16-token pages), CUDA graphs, chosen pages drawn at random from a pool larger than the L2 cache.

    python bench/head_budget_attention.py --budgets h2048.json [--batches 1 16 64] [--mean 1600]

--budgets: a table from `bench/sparse_layer_budgets.py calibrate --per-head` (groups per (layer,
KV head) as fractions of the budget). Each of its layers is one pattern: its heads' fractions
repeated over the 8 KV heads and scaled to mean 1, so every pattern attends the same keys in all
as the uniform budget. The time of a model's step is the sum over its layers, so the table
reports the mean over the patterns.

Per batch: `uniform` is the engine's tuning over 2048 keys a head (centroids.attend_tuning);
`per-head, as uniform` the same tuning (as many splits a row) with the table as wide as the
layer's largest head (at b16 one program a row: the largest head sets the time); `per-head, split S`
splits of S keys from key 0 (split_k_decode's split_keys), a split past its head's end empty, so
every program attends at most S keys whatever its head and the programs balance over the SMs, at
the cost of a merge launch.
Correctness first: every variant's output against plain softmax attention on sampled rows.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.gemv import graph_us  # noqa: E402
from kernels.triton.centroids import attend_tuning  # noqa: E402
from kernels.triton.decode import split_k_decode  # noqa: E402

HQ, HKV, D, PAGE = 32, 8, 128, 16
GROUP_TOKENS = 64
POOL_PAGES = 8192           # 268 MB of K and V: past the H200's 50 MB L2
COPIES = 8                  # table sets rotated between graph calls


def patterns(path: str, budget: int) -> list[list[int]]:
    """Keys per KV head for each layer of the table: its heads' fractions over 8 heads, mean 1."""
    weights = json.loads(Path(path).read_text(encoding="utf-8"))["weights"]
    uniform_groups = budget // GROUP_TOKENS
    out = []
    for fractions in weights.values():
        assert isinstance(fractions, list), "the table must be per (layer, KV head): calibrate --per-head"
        tiled = [fractions[h % len(fractions)] for h in range(HKV)]
        mean = sum(tiled) / HKV
        groups = [max(1, round(f / mean * uniform_groups)) for f in tiled]
        out.append([g * GROUP_TOKENS for g in groups])
    return out


def make_tables(batch: int, lengths: list[int], gen: torch.Generator, dev) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(lengths) // PAGE
    tables = torch.randint(0, POOL_PAGES, (COPIES, batch, HKV, width), generator=gen, dtype=torch.int32)
    lens = torch.tensor(lengths, dtype=torch.int32).expand(batch, HKV).contiguous()
    return tables.to(dev), lens.to(dev)


def reference(q, k, v, table, lens, scale, b, h) -> torch.Tensor:
    n = int(lens[b, h])
    pages = table[b, h].long()
    keys = k[pages, :, h].flatten(0, 1)[:n].float()
    values = v[pages, :, h].flatten(0, 1)[:n].float()
    heads = q[b, h * (HQ // HKV):(h + 1) * (HQ // HKV)].float()
    return torch.softmax(heads @ keys.T * scale, dim=-1) @ values


def run_variant(q, k, v, tables, lens, scale, out, choice: dict, timed) -> float:
    """Check one tuning's output on sampled rows, then its us a call (graph calls rotate the copies)."""
    batch = q.shape[1]
    calls = [lambda i=i: split_k_decode(q[i], k, v, tables[i], lens, scale, out=out, **choice)
             for i in range(COPIES)]
    calls[0]()
    for b, h in ((0, 0), (batch - 1, HKV - 1), (batch // 2, 3)):
        torch.testing.assert_close(out[b, h * 4:(h + 1) * 4].float(),
                                   reference(q[0], k, v, tables[0], lens, scale, b, h), rtol=2e-2, atol=2e-2)
    at = iter(range(1 << 30))
    return timed(lambda: calls[next(at) % COPIES]())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--budgets", required=True)
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--mean", type=int, default=None,
                        help="keys a head on average in the per-head patterns (default: --budget)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--splits", type=int, nargs="+", default=[128, 256, 512, 1024],
                        help="keys a split (per-head rows)")
    parser.add_argument("--dry", action="store_true",
                        help="check the program on the CPU under the Triton interpreter (small pool, no timing)")
    args = parser.parse_args()
    global POOL_PAGES
    if args.dry:
        POOL_PAGES = 256
    dev = torch.device("cpu" if args.dry else "cuda")
    timed = (lambda fn: (fn(), 0.0)[1]) if args.dry else graph_us
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(POOL_PAGES, PAGE, HKV, D, generator=gen, dtype=torch.bfloat16).to(dev)
    v = torch.randn(POOL_PAGES, PAGE, HKV, D, generator=gen, dtype=torch.bfloat16).to(dev)
    scale = D ** -0.5
    mean_keys = args.mean or args.budget
    layers = patterns(args.budgets, mean_keys)[:2 if args.dry else None]
    print(f"{len(layers)} layer patterns; keys a head: {min(min(p) for p in layers)}-{max(max(p) for p in layers)}, "
          f"mean {mean_keys}, mean of the largest head {sum(max(p) for p in layers) / len(layers):.0f} "
          f"(uniform {args.budget})")
    rows = []
    for batch in args.batches:
        q = torch.randn(COPIES, batch, HQ, D, generator=gen, dtype=torch.bfloat16).to(dev)
        out = torch.empty(batch, HQ, D, device=dev, dtype=torch.bfloat16)
        base = attend_tuning(batch * HKV, args.budget, dev)
        variants = {"uniform": None, "per-head, as uniform": dict(base)}
        variants.update({f"per-head, split {s}": dict(base, split_keys=s) for s in args.splits})
        times: dict[str, list[float]] = {}
        for name, tuning in variants.items():
            for lengths in ([[args.budget] * HKV] if tuning is None else layers):
                tables, lens = make_tables(batch, lengths, gen, dev)
                choice = dict(base if tuning is None else tuning)
                if "split_keys" in choice:      # splits of S keys from key 0, empty past a head's end
                    choice = {n: c for n, c in choice.items() if n not in ("num_splits", "fixed_splits")}
                times.setdefault(name, []).append(run_variant(q, k, v, tables, lens, scale, out, choice, timed))
        uniform = times["uniform"][0]
        for name, ts in times.items():
            mean = sum(ts) / len(ts)
            rows.append((batch, name, mean, max(ts), uniform / mean if mean else 0.0))
    print(f"\n| batch | attention ({mean_keys} keys a head on average; uniform {args.budget}) | "
          "us (mean over layers) | worst layer | uniform / this |")
    print("| --- | --- | --- | --- | --- |")
    for batch, name, mean, worst, ratio in rows:
        print(f"| {batch} | {name} | {mean:.1f} | {worst:.1f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
