"""Per-layer budgets for the centroid selector: layers whose attention is spread get more of the
step's tokens, layers whose attention is peaked fewer, the mean over the sparse layers kept at the
configured budget.

    python bench/sparse_layer_budgets.py calibrate --out budgets.json [sparse_quality.py args]
    python bench/sparse_layer_budgets.py eval budgets.json [sparse_quality.py args] --sweep rule=layer-budget
    python bench/sparse_layer_budgets.py layer-max budgets.json --out layers.json

Why: every layer of the engine attends the same token budget, but the quality bench's misses are
the attention mass a layer's choice leaves out, and layers differ in how much they leave out at a
given budget. A layer is its own kernel launch, so unlike a budget shared by a layer's KV heads
(bench/sparse_estimators.py `shared-budget`) a per-layer budget costs no load balance: every row
of one launch still attends the same number of tokens, and the step's bytes are the same.

calibrate: on text past the quality bench's first 28k tokens (the bench never reads it), a
teacher-forced run with the engine's centroid selection records, per sparse layer, a curve over k
of what the best k groups in the selector's own order keep (averaged over rows, KV heads and
steps): with --metric mass the attention mass they capture, with --metric output minus the
relative error of the attention output over them (LayerCurves). Groups are then handed out one at
a time to the layer whose curve gains most from one more, from a floor of --min-groups a layer,
until the sparse layers hold as many groups as the uniform budget gives them (greedy on the
curves' sum; they are close to concave). The weights written are each layer's groups over the
uniform count.

eval: registers the decodes `layer-budget` (the engine's centroid decode, each layer keeping
round(weight x budget) groups a KV head) and `layer-budget-shared-capX` (that layer budget shared
by the layer's KV heads, each at most X of its own: se.shared_budget_decode) beside
bench/sparse_estimators.py's centroid decodes, and runs bench/sparse_quality.py.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from backends.source import resolve_source  # noqa: E402
from bench import sparse_estimators as se  # noqa: E402
from bench import sparse_quality as sq  # noqa: E402

CURVE_LENGTH = 512          # groups a curve covers (32k of 64-token groups); padded with its last value


class LayerCurves:
    """Per layer: the sum over rows and KV heads of a curve over k (the best k groups in the
    selector's order kept), and how many were summed. metric "mass": the attention mass the k
    groups capture (each q head's exact softmax summed per group, the GQA group's mean). metric
    "output": minus the relative error of the attention output over the k groups (each q head's
    ||o_k - o|| / ||o||, the GQA group's mean; o_0 = 0), which weighs a missed group by how far
    its values lie from the rest, not only by its mass. Both curves grow with k. per_head: one
    curve per (layer, KV head) instead of per layer."""

    def __init__(self, metric: str, per_head: bool = False):
        assert metric in ("mass", "output")
        self.metric, self.per_head = metric, per_head
        self.sums: dict[int, torch.Tensor] = {}
        self.counts: dict[int, int] = {}

    def __call__(self, layer, q, k, v, scores, plan, scale) -> None:
        batch, kv_heads, tokens, head_dim = k.shape
        groups = scores.shape[-1]
        span = plan.group_pages * (tokens // plan.sparse_pages.shape[1])        # pages x page size
        assert groups * span >= tokens
        qg = q.float().view(batch, kv_heads, -1, head_dim)
        logits = torch.einsum("bhgd,bhtd->bhgt", qg, k.float()) * scale
        valid = torch.arange(tokens, device=k.device) < plan.sparse_lengths.view(-1, 1, 1, 1)
        probs = logits.masked_fill(~valid, float("-inf")).softmax(dim=-1)                   # [Bs, kvh, g, T]
        padded = torch.nn.functional.pad(probs, (0, groups * span - tokens))
        order = scores.argsort(dim=-1, descending=True)                                     # [Bs, kvh, G]
        if self.metric == "mass":
            mass = padded.view(batch, kv_heads, -1, groups, span).sum(-1).mean(2)           # [Bs, kvh, G]
            curve = mass.gather(-1, order).cumsum(-1)
        else:
            values = torch.nn.functional.pad(v.float(), (0, 0, 0, groups * span - tokens))
            weighted = torch.einsum("bhgnt,bhntd->bhgnd", padded.view(batch, kv_heads, -1, groups, span),
                                    values.view(batch, kv_heads, groups, span, head_dim))   # [Bs, kvh, g, G, d]
            mass = padded.view(batch, kv_heads, -1, groups, span).sum(-1)                   # [Bs, kvh, g, G]
            heads = weighted.shape[2]
            idx = order.unsqueeze(2).expand(-1, -1, heads, -1)
            cum_w = weighted.gather(3, idx.unsqueeze(-1).expand(-1, -1, -1, -1, head_dim)).cumsum(3)
            cum_m = mass.gather(3, idx).cumsum(3).clamp_min(1e-30)
            full = cum_w[:, :, :, -1:]                                                      # o itself
            err = (cum_w / cum_m.unsqueeze(-1) - full).norm(dim=-1) / full.norm(dim=-1).clamp_min(1e-30)
            curve = -err.mean(2)                                                            # [Bs, kvh, G]
        start = torch.zeros_like(curve[..., :1]) if self.metric == "mass" else -torch.ones_like(curve[..., :1])
        curve = torch.cat((start, curve), -1)[..., :CURVE_LENGTH + 1]                         # [Bs, kvh, G+1]
        curve = torch.cat((curve, curve[..., -1:].expand(*curve.shape[:2], CURVE_LENGTH + 1 - curve.shape[-1])), -1)
        summed = curve.double().sum(dim=0).cpu()                                            # [kvh, G+1]
        units = [((layer, h), summed[h], batch) for h in range(kv_heads)] if self.per_head else \
            [(layer, summed.sum(0), batch * kv_heads)]
        for unit, total, count in units:
            self.sums[unit] = self.sums.get(unit, 0) + total
            self.counts[unit] = self.counts.get(unit, 0) + count

    def curves(self) -> dict:
        return {layer: total / self.counts[layer] for layer, total in sorted(self.sums.items())}


def allocate(curves: dict, uniform: int, floor: int) -> dict:
    """Groups per unit (a layer, or a layer's KV head): from `floor` each, one group at a time to
    the unit whose curve grows most, until the units hold uniform x units groups."""
    assert floor <= uniform
    keep = dict.fromkeys(curves, floor)
    for _ in range((uniform - floor) * len(curves)):
        gain = {layer: float(c[keep[layer] + 1] - c[keep[layer]]) if keep[layer] + 1 < len(c) else -1.0
                for layer, c in curves.items()}
        best = max(gain, key=gain.get)
        keep[best] += 1
    assert sum(keep.values()) == uniform * len(curves)
    return keep


def layer_keep(weights: dict[int, float | list[float]]):
    """keep_of for se.shared_budget_decode: a layer's groups, or a list of its KV heads' groups."""
    def keep_of(budget_groups: int, layer: int) -> int | list[int]:
        weight = weights.get(layer, 1.0)
        if isinstance(weight, list):
            return [max(1, round(w * budget_groups)) for w in weight]
        return max(1, round(weight * budget_groups))
    return keep_of


def calibrate(args, rest: list[str]) -> None:
    source = resolve_source(args.model)
    tok = sq.Tokenizer(args.tokenizer_json, source)
    text = Path(args.source_text).read_text(encoding="utf-8") if args.source_text else sq.english_text()
    ids = tok.encode(text)[args.skip_tokens:]
    text_file = Path(args.out).with_suffix(".text")
    text_file.write_text(tok.decode(ids), encoding="utf-8")
    recorder = LayerCurves(args.metric, args.per_head)
    sq.EXTRA_DECODES["layer-calibrate"] = lambda: se.shared_budget_decode(1.0, observe=recorder)
    run_bench(args, rest + ["--text-file", str(text_file), "--sweep", "rule=layer-calibrate"])
    curves = recorder.curves()
    uniform = args.budget // args.group_tokens
    keep = allocate(curves, uniform, args.min_groups)
    layers = sorted({unit[0] if args.per_head else unit for unit in keep})

    def per_layer(value):           # a layer's number, or its heads' in a list
        return {str(layer): [value(unit) for unit in keep if unit[0] == layer] if args.per_head else value(layer)
                for layer in layers}
    report = {"budget": args.budget, "group_tokens": args.group_tokens, "min_groups": args.min_groups,
              "metric": args.metric, "per_head": args.per_head,
              "weights": per_layer(lambda unit: keep[unit] / uniform),
              "curve_uniform": per_layer(lambda unit: float(curves[unit][uniform])),
              "curve_allocated": per_layer(lambda unit: float(curves[unit][keep[unit]]))}
    Path(args.out).write_text(json.dumps(report, indent=1), encoding="utf-8")
    sq.say(f"layer budgets ({args.budget} tokens, floor {args.min_groups} groups): mean {args.metric} curve "
           f"{sum(float(c[uniform]) for c in curves.values()) / len(curves):.4f} uniform, "
           f"{sum(float(curves[unit][keep[unit]]) for unit in keep) / len(curves):.4f} allocated")
    for unit in keep:
        sq.say(f"  {unit}: {keep[unit]:3d} groups, curve {float(curves[unit][uniform]):.4f} -> "
               f"{float(curves[unit][keep[unit]]):.4f}")


def evaluate(args, rest: list[str]) -> None:
    report = json.loads(Path(args.budgets_file).read_text(encoding="utf-8"))
    weights = {int(layer): w for layer, w in report["weights"].items()}
    se.register_decodes()           # the uniform-budget centroid rules too, to compare in one run
    sq.EXTRA_DECODES["layer-budget"] = lambda: se.shared_budget_decode(1.0, keep_of=layer_keep(weights))
    for cap in ("1.25", "1.5"):     # and the layer's budget shared by its KV heads, each at most cap x its own
        sq.EXTRA_DECODES[f"layer-budget-shared-cap{cap}"] = (
            lambda c=float(cap): se.shared_budget_decode(c, keep_of=layer_keep(weights)))
    run_bench(args, rest)


def run_bench(args, rest: list[str]) -> None:
    passed = ["--model", args.model, "--selector", "centroids"]
    if args.tokenizer_json:
        passed += ["--tokenizer-json", args.tokenizer_json]
    sys.argv = ["bench/sparse_quality.py"] + passed + rest
    sq.main()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--model", default="packaged:smollm2-135m-instruct")
    parser.add_argument("--tokenizer-json", default=None)
    sub = parser.add_subparsers(dest="command", required=True)
    cal = sub.add_parser("calibrate", allow_abbrev=False)
    cal.add_argument("--out", required=True, help="the budgets' JSON (the calibration text goes beside it)")
    cal.add_argument("--budget", type=int, default=2048, help="the uniform budget the allocation keeps on average")
    cal.add_argument("--group-tokens", type=int, default=64)
    cal.add_argument("--min-groups", type=int, default=8, help="the fewest groups a layer keeps")
    cal.add_argument("--metric", choices=("mass", "output"), default="mass",
                     help="what the allocation maximises: captured mass, or minus the output's relative error")
    cal.add_argument("--per-head", action="store_true", help="a budget per (layer, KV head), not per layer")
    cal.add_argument("--source-text", default=None,
                     help="calibrate on this text (a sparse_quality --save-text file) instead of this Python's docs")
    cal.add_argument("--skip-tokens", type=int, default=28000, help="text the quality bench uses, skipped")
    ev = sub.add_parser("eval", allow_abbrev=False)
    ev.add_argument("budgets_file")
    lm = sub.add_parser("layer-max", allow_abbrev=False,
                        help="a per-head table's layers each at their largest head's weight, mean 1 again")
    lm.add_argument("budgets_file")
    lm.add_argument("--out", required=True)
    args, rest = parser.parse_known_args()
    if args.command == "calibrate":
        calibrate(args, rest)
    elif args.command == "layer-max":
        layer_max(args.budgets_file, args.out)
    else:
        evaluate(args, rest)


def layer_max(path: str, out: str) -> None:
    """Every KV head of a layer at the layer's largest weight of a per-head table, rescaled to mean 1.
    A layer's launch lasts as long as its largest head at batch 1 and 16 (one program per row and
    head, or splits sized by the largest), so the per-head table's time is already paid for the
    smaller heads' keys: this table gives them to them, and at the same mean its step reads what the
    uniform budget reads (sum over the layers unchanged)."""
    report = json.loads(Path(path).read_text(encoding="utf-8"))
    assert report.get("per_head"), "layer-max takes a per-(layer, KV head) table (calibrate --per-head)"
    largest = {layer: max(heads) for layer, heads in report["weights"].items()}
    mean = sum(largest.values()) / len(largest)
    report["weights"] = {layer: [round(w / mean, 6)] * len(report["weights"][layer]) for layer, w in largest.items()}
    report["derived"] = f"layer-max of {Path(path).name}: each layer's heads at its largest, rescaled by 1/{mean:.4f}"
    Path(out).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    sq.say(f"layer-max: {len(largest)} layers, largest weights {min(largest.values()):.3f}-{max(largest.values()):.3f} "
           f"(mean {mean:.4f}) -> mean 1")


if __name__ == "__main__":
    main()
