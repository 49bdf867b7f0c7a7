"""Budgets per (layer, KV head) for the centroid selector (sparse_attention.head_budgets).

Every sparse layer and KV head keeps token_budget tokens by default. Heads differ in how much of
their attention output a fixed budget loses, and that is a property of the head, not of the text
(docs/sparse.md, "Budgets per layer and per KV head"), so a table calibrated once per model moves
budget from the heads that need little to those that need much: weights per (sparse layer, KV
head) with mean 1 over the table, written by `bench/sparse_layer_budgets.py calibrate --metric
output --per-head`. A head then keeps round(weight x token_budget / group_tokens) groups (at least
its sink and recent groups and one more), so token_budget is the mean per head, and a layer's
launch is as long as its largest head (the kernels pad each layer's rows to it).

Read once at start-up: the config reads the file (read_weights) and the backend turns the weights
into counts for its model (head_groups), raising ValueError naming the setting when they do not
fit the model.
"""
from __future__ import annotations

import functools
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from backends.base import SparseSettings, sparse_unit_counts

SHIPPED = Path(__file__).resolve().parent / "head_budget_tables"      # tables calibrated for packaged models


def table_path(name: str) -> Path:
    """A shipped table by its model's name (head_budget_tables/NAME.json) or a file path."""
    shipped = SHIPPED / f"{name}.json"
    return shipped if "/" not in name and not name.endswith(".json") else Path(name)


def read_weights(name: str) -> tuple[tuple[int, tuple[float, ...]], ...]:
    """((layer, weights per KV head), ...) of a per-head table, checked for shape: every weight
    positive, every layer the same number of KV heads, mean 1. Raises ValueError."""
    path = table_path(name)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        weights = {int(layer): tuple(float(w) for w in heads) for layer, heads in report["weights"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"sparse_attention.head_budgets: cannot read a per-head table from {path}: {exc}") from exc
    if not report.get("per_head") or not weights:
        raise ValueError(f"sparse_attention.head_budgets: {path} is not a per-(layer, KV head) table "
                         "(bench/sparse_layer_budgets.py calibrate --per-head writes one)")
    widths = {len(heads) for heads in weights.values()}
    values = [w for heads in weights.values() for w in heads]
    if len(widths) != 1 or min(values) <= 0:
        raise ValueError(f"sparse_attention.head_budgets: {path} needs positive weights for the same KV heads in "
                         "every layer")
    if abs(sum(values) / len(values) - 1.0) > 1e-3:
        raise ValueError(f"sparse_attention.head_budgets: {path}'s weights average {sum(values) / len(values):.4f}, "
                         "not 1 (token_budget is the mean per head)")
    return tuple(sorted(weights.items()))


@dataclass(frozen=True)
class HeadGroups:
    """Groups kept per KV head in each sparse layer, and what the launches are sized by."""

    per_layer: dict[int, tuple[int, ...]]

    def largest(self, layer: int) -> int:
        return max(self.per_layer[layer])

    @functools.cached_property
    def count_frequencies(self) -> dict[int, int]:
        """How many (layer, KV head) pairs keep each count (the page accounting sums by count, every
        step: made once)."""
        return dict(Counter(count for heads in self.per_layer.values() for count in heads))

    @property
    def fewest(self) -> int:
        """The smallest count anywhere: rows of at most this many groups are dense in every layer."""
        return min(min(heads) for heads in self.per_layer.values())


@functools.lru_cache(maxsize=8)
def head_groups(sparse: SparseSettings, layers: int, kv_heads: int) -> HeadGroups | None:
    """The counts of groups per (sparse layer, KV head) for a model of `layers` layers and
    `kv_heads` KV heads, or None without a table. Raises ValueError when the table does not fit
    (the attention backends call it at start-up; later calls are the cached answer)."""
    if not sparse.head_budget_weights:
        return None
    if sparse.selector != "centroids":
        raise ValueError("sparse_attention.head_budgets needs selector: centroids")
    weights = dict(sparse.head_budget_weights)
    sparse_layers = range(min(sparse.dense_layers, layers), layers)
    if set(weights) != set(sparse_layers) or any(len(heads) != kv_heads for heads in weights.values()):
        raise ValueError(f"sparse_attention.head_budgets: the table has layers {min(weights)}-{max(weights)} of "
                         f"{len(next(iter(weights.values())))} KV heads; the model's sparse layers are "
                         f"{sparse_layers.start}-{layers - 1} of {kv_heads} KV heads")
    budget, sink, recent = sparse_unit_counts(sparse.group_tokens, sparse.token_budget, sparse.sink_tokens,
                                              sparse.recent_tokens)
    floor = sink + recent + 1
    groups = HeadGroups({layer: tuple(max(floor, round(w * budget)) for w in weights[layer])
                         for layer in sparse_layers})
    largest = max(groups.largest(layer) for layer in sparse_layers)
    per_run = sparse.run_tokens // sparse.group_tokens
    if sparse.shortlist_tokens and sparse.shortlist_tokens // sparse.run_tokens < -(-2 * largest // per_run):
        # (then every layer's shortlist is shortlist_tokens long whatever its heads keep, as the
        # kernels and centroid_reference size it from the layer's largest head)
        raise ValueError(f"sparse_attention.shortlist_tokens {sparse.shortlist_tokens} must hold twice the largest "
                         f"head budget of the table ({largest} groups of {sparse.group_tokens} tokens)")
    return groups
