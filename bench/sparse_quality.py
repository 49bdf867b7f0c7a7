"""Quest sparse decode vs dense on the embedded model, in one run: quality, passkey, decode speed.

    python bench/sparse_quality.py                          # everything on this CPU
    python bench/sparse_quality.py --device cuda            # quality on the GPU, timing on the CPU
    python bench/sparse_quality.py --quick                  # small smoke run of every code path
    python bench/sparse_quality.py --device cuda --texts 3 --context 32000 --positions 760 \
        --context-length 32768 --rope ntk:8 --passkey-lengths 16000 24000 32000   # at 32k (below)

1. Teacher-forced: --texts contexts of --context tokens of real English text shipped with Python
   (the language reference, pydoc_data.topics, plus the standard library's module docstrings).
   Each is prefilled densely up to `context - positions` (prefill is always dense), then every
   config (dense and each budget) decodes the remaining tokens one per step, fed the true token:
   the sparse path sees its own K/V, as in serving. Per config: top-1 agreement with dense, mean
   KL(dense || sparse) of the next-token distributions, perplexity of the true next tokens, and
   the sparsity ratio (KV pages skipped / pages dense would read, over the sparse-eligible layers).
2. Passkey: a 5-digit number hidden at depths 10%..90% of a 4k..7k-token filler. The prompt is
   prefilled densely except its last ~20 tokens (the question), which every config decodes one
   per step before answering greedily, so retrieval happens through the decode path under test.
3. Decode ms/token at --timing-context tokens, dense vs each budget, on the CPU with each of
   --timing-threads thread counts (median of --timing-steps steps after 2 warm-ups, the configs
   interleaved step by step so that drift in the machine's speed hits them alike).

The embedded model was trained to 8k tokens; past that its rope must be scaled (--rope ntk:F
raises the rope base, --rope linear:F interpolates positions) for the dense baseline to stay
coherent: at 32k, ntk:8 keeps dense perplexity near 16 and the passkey at 25 of 27 (docs/sparse.md).

Every config runs through TorchRunner.forward (swapping the runner's sparse settings between forwards),
so the numbers are those of the serving code path. The runners are built with sparse attention on,
so their caches keep key summaries (written in every config); the timed dense steps run without
them, as a server with sparse attention off does. Settings: page 16, sink 16, recent 64,
dense_layers 2, summary_tokens 4 (the config defaults); budgets in tokens. --sweep adds configs at
every budget with other settings or another page-scoring rule (see RULES below), e.g.

    python bench/sparse_quality.py --device cuda --sweep rule=sum,recent=256 rule=sub2-lse-max

--selector centroids runs every sparse config with the engine's centroid selector instead of Quest's
(sparse_attention.selector: the runner keeps centroid summaries and writes them after each step).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import itertools
import math
import platform
import re
import statistics
import sys
import time
import weakref
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from backends.base import ForwardBatch, RunnerSettings, SampleSpec, SequenceChunk, SparseSettings  # noqa: E402
from backends.cuda.attention import sparse as sa  # noqa: E402
from backends.cuda.runner import TorchRunner  # noqa: E402
from backends.head_budgets import read_weights  # noqa: E402
from backends.sampling_params import SamplingParams  # noqa: E402
from backends.source import resolve_source  # noqa: E402

LINES: list[str] = []


def say(line: str = "") -> None:
    print(line, flush=True)
    LINES.append(line)


def flush_report(args) -> None:
    """Write the report so far to --out (a run cut short keeps what it measured)."""
    if args.out:
        Path(args.out).write_text("\n".join(LINES) + "\n")


# ---- text ------------------------------------------------------------------------------------

# --text-file: the text every part of the bench reads instead of this Python's own docs
TEXT_FILE: str | None = None


def english_text() -> str:
    """The Python language reference topics, then stdlib module docstrings (all ship with Python;
    they differ between Python versions, so two machines read different samples unless one
    carries the other's text: --save-text, then --text-file)."""
    if TEXT_FILE:
        return Path(TEXT_FILE).read_text(encoding="utf-8")
    import importlib
    import pydoc_data.topics as topics
    parts = [topics.topics[key] for key in sorted(topics.topics)]
    for name in ("argparse", "collections", "contextlib", "csv", "dataclasses", "decimal", "email",
                 "functools", "heapq", "inspect", "logging", "pathlib", "pickle", "re", "shutil",
                 "string", "subprocess", "textwrap", "threading", "typing", "unittest", "zipfile"):
        doc = importlib.import_module(name).__doc__
        if doc:
            parts.append(doc)
    return "\n\n".join(parts)


class Tokenizer:
    def __init__(self, path: str | None, source):
        if path:
            from tokenizers import Tokenizer as RustTokenizer
            self.backend = RustTokenizer.from_file(path)
        else:
            from gateway.templating import load_tokenizer
            self.backend = load_tokenizer(source).hf.backend_tokenizer

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=True)


# ---- running configs ---------------------------------------------------------------------------

class Pages:
    """Hands out page ids (page 0 is the padding page); release(mark) hands back those taken since."""

    def __init__(self, page_size: int):
        self.page_size, self.next = page_size, 1

    def take(self, tokens: int) -> list[int]:
        n = -(-tokens // self.page_size)
        out = list(range(self.next, self.next + n))
        self.next += n
        return out

    def release(self, mark: int) -> None:
        self.next = mark


@dataclasses.dataclass
class Config:
    name: str
    sparse: SparseSettings
    rule: str = "engine"        # how pages are scored: the engine's own, or a RULES candidate
    timed: bool = True


# ---- RULES: candidate page-scoring rules (--sweep rule=...) --------------------------------------
# The engine's rule is "engine" (the same as "lse-max", coarse to fine past the shortlist). The
# candidates below are page selectors (the attention backend's `page_selector` interface,
# attention/sparse.choose_pages's signature): they replace the page scores through the same
# selection (sa.select_pages) and the engine's own attention over the chosen pages, so that a sweep
# compares rules on equal terms. They run on the torch attention backends (the runners are built
# with `attention: torch` when a sweep names a rule). Each head's page bound comes from the cache's summaries
# (the best of the page's written blocks of --summary-tokens tokens); then "sum" (raw bounds summed
# over the GQA group, the engine's earlier rule), "max" (raw bounds, max over the group), "lse-max"
# (log-softmax over the pages per head, max over the group) or "softmax-sum" (softmax per head,
# summed). "subN-" rules take each page's bound from N-token sub-blocks computed here from the keys
# themselves: they show what other summary sizes would buy without another cache, and are not timed.
# "fp8-" rules round the cache's summaries outward to float8 e4m3 first (kmin down, kmax up to the
# nearest e4m3 value, so they are still bounds): the quality of 8-bit summaries, not their speed.
# "fp8-engine" is the engine's own selection, coarse to fine included, over summaries so rounded.
# "oracle" and "oracleN" choose by the true attention mass (pages, or runs of N pages): the ceiling.
# "gauss" and "gaussN" estimate that mass from each run's key mean and variance per channel.

def head_bounds(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Quest bound of every q head: q [B, H, d], kmin/kmax [B, P, kvh, d] -> [B, kvh, group, P]."""
    batch, heads, head_dim = q.shape
    kv_heads = kmin.shape[2]
    qg = q.float().view(batch, kv_heads, heads // kv_heads, head_dim)
    hi, lo = kmax.float().permute(0, 2, 3, 1), kmin.float().permute(0, 2, 3, 1)
    return qg.clamp(min=0) @ hi + qg.clamp(max=0) @ lo


def sub_block_bounds(q: torch.Tensor, k_layer: torch.Tensor, plan, sub: int) -> torch.Tensor:
    """Per head, each page's best bound over its `sub`-token blocks of written keys -> [B, kvh, g, P]."""
    pages = plan.sparse_pages
    batch, width = pages.shape
    page_size, kv_heads, head_dim = k_layer.shape[1:]
    blocks = page_size // sub
    keys = k_layer.index_select(0, pages.flatten()).float().view(batch, width, blocks, sub, kv_heads, head_dim)
    position = (torch.arange(width, device=pages.device).view(width, 1) * page_size
                + plan.slot).view(1, width, blocks, sub, 1, 1)
    written = position < plan.sparse_lengths.view(batch, 1, 1, 1, 1, 1)
    empty = ~written.any(dim=3)                                                   # [B, P, blocks, 1, 1]
    lo = keys.masked_fill(~written, float("inf")).amin(dim=3).masked_fill(empty, 0.0)
    hi = keys.masked_fill(~written, float("-inf")).amax(dim=3).masked_fill(empty, 0.0)
    bound = head_bounds(q, lo.flatten(1, 2), hi.flatten(1, 2))                   # [B, kvh, g, P * blocks]
    bound = bound.view(batch, kv_heads, -1, width, blocks)
    return bound.masked_fill(empty.view(batch, 1, 1, width, blocks), float("-inf")).amax(dim=-1)


def combine(bound: torch.Tensor, valid: torch.Tensor, how: str, scale: float) -> torch.Tensor:
    """Per-head bounds [B, kvh, g, P] -> page scores [B, kvh, P]; valid: [B, 1, 1, P]."""
    if how == "sum":
        return bound.sum(dim=2)
    if how == "max":
        return bound.amax(dim=2)
    logits = (bound * scale).masked_fill(~valid, float("-inf"))
    if how == "lse-max":        # max over heads of log softmax over pages (each head normalised)
        return (logits - logits.logsumexp(dim=-1, keepdim=True)).amax(dim=2)
    if how == "softmax-sum":    # estimated attention mass of the page, summed over heads
        return logits.softmax(dim=-1).sum(dim=2)
    raise ValueError(f"unknown combination {how!r}")


def fp8_up(x: torch.Tensor) -> torch.Tensor:
    """The smallest float8 e4m3 value >= x (x within its range), as float32."""
    x = x.float()
    y = x.to(torch.float8_e4m3fn)
    bits = y.view(torch.uint8).to(torch.int16)
    negative = (bits & 0x80) != 0
    up = torch.where(negative, bits - 1, bits + 1)                  # one step toward +inf
    up = torch.where(negative & ((bits & 0x7F) == 0), torch.ones_like(bits), up)    # -0 -> +smallest
    bits = torch.where(y.float() < x, up, bits)
    out = bits.to(torch.uint8).view(torch.float8_e4m3fn).float()
    assert bool((out >= x).all()), "fp8_up must not round down"
    return out


def fp8_engine_selector(q, kmin_layer, kmax_layer, pmin_layer, pmax_layer, plan, scale, fused):
    """The engine's own selection (coarse to fine past the shortlist) over every summary rounded
    outward to float8 e4m3: what 8-bit block and page summaries would select. Only the pages of
    the rows' tables are rounded (a compact copy, the tables renumbered into it)."""
    used, inverse = plan.sparse_pages.unique(return_inverse=True)

    def down(x):
        return None if x is None else -fp8_up(-x.index_select(0, used))

    def up(x):
        return None if x is None else fp8_up(x.index_select(0, used))

    compact = dataclasses.replace(plan, sparse_pages=inverse.view_as(plan.sparse_pages))
    return sa.choose_pages(q, down(kmin_layer), up(kmax_layer), down(pmin_layer), up(pmax_layer), compact, scale,
                           False)


def grouped_keys(k_layer: torch.Tensor, plan, group_pages: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The sparse rows' keys in runs of `group_pages` pages (the tables padded with page 0), as
    float32 [B, G, group_pages * page_size, kvh, d], and which of them are written [B, G, span, 1, 1]."""
    pages = plan.sparse_pages
    batch, width = pages.shape
    page_size, kv_heads, head_dim = k_layer.shape[1:]
    groups = -(-width // group_pages)
    span = group_pages * page_size
    padded = torch.nn.functional.pad(pages, (0, groups * group_pages - width))
    keys = k_layer.index_select(0, padded.flatten()).float().view(batch, groups, span, kv_heads, head_dim)
    position = torch.arange(groups * span, device=pages.device).view(1, groups, span, 1, 1)
    return keys, position < plan.sparse_lengths.view(batch, 1, 1, 1, 1)


def oracle_selector(group_pages: int, k_cache_of):
    """Pages chosen by the true attention mass, the ceiling of any selector at this granularity:
    each q head's softmax over the row's whole context, summed over each run of `group_pages`
    consecutive pages (1: every page alone; 4: 64-token groups at page 16), max over the GQA
    group; the best groups fill the budget beside the forced pages. Reads every key: not a design."""

    def select(q, kmin_layer, kmax_layer, pmin_layer, pmax_layer, plan, scale, fused):
        keys, written = grouped_keys(k_cache_of(kmin_layer), plan, 1)                # [B, P, page, kvh, d]
        batch, width, page_size, kv_heads, head_dim = keys.shape
        qg = q.float().view(batch, kv_heads, -1, head_dim)
        logits = torch.einsum("bhgd,bthd->bhgt", qg, keys.flatten(1, 2)) * scale    # [B, kvh, g, T]
        logits = logits.masked_fill(~written.view(batch, 1, 1, -1), float("-inf"))
        mass = logits.softmax(dim=-1).view(batch, kv_heads, -1, width, page_size).sum(dim=-1)
        groups = -(-width // group_pages)
        mass = torch.nn.functional.pad(mass, (0, groups * group_pages - width))
        group_mass = mass.view(batch, kv_heads, -1, groups, group_pages).sum(dim=-1).amax(dim=2)   # [B, kvh, G]
        # every page scores its group's mass, so groups are taken whole (but at the budget's edge);
        # forced pages stay forced and padding stays out through the plan's bias
        scores = group_mass.repeat_interleave(group_pages, dim=-1)[..., :width]
        return sa.select_pages(scores, plan.bias, plan.budget_pages)

    return select


def gauss_selector(group_pages: int, k_cache_of):
    """Pages chosen by an estimate of each run of `group_pages` pages' attention mass from two
    statistics per channel, the mean and the variance of its keys (as many bytes as one min/max
    pair per run): if q.k over the run's keys were Gaussian, its log-sum-exp would be
    log n + q.mean + q^2.var / 2 (q scaled). Log-softmax over the runs per head, max over the
    group, and the best runs fill the budget beside the forced pages. The statistics are computed
    here from the keys (not a cache format): what such a summary would select."""

    def select(q, kmin_layer, kmax_layer, pmin_layer, pmax_layer, plan, scale, fused):
        keys, written = grouped_keys(k_cache_of(kmin_layer), plan, group_pages)
        batch, groups, _, kv_heads, head_dim = keys.shape
        width = plan.sparse_pages.shape[1]
        written = written.float()
        count = written.sum(dim=2)                                                   # [B, G, 1, 1]
        mean = (keys * written).sum(dim=2) / count.clamp(min=1)                      # [B, G, kvh, d]
        var = (((keys - mean.unsqueeze(2)) ** 2) * written).sum(dim=2) / count.clamp(min=1)
        qg = q.float().view(batch, kv_heads, -1, head_dim) * scale
        log_mass = (torch.einsum("bhgd,bnhd->bhgn", qg, mean)
                    + 0.5 * torch.einsum("bhgd,bnhd->bhgn", qg * qg, var)
                    + count.view(batch, 1, 1, groups).clamp(min=1).log())
        log_mass = log_mass.masked_fill(count.view(batch, 1, 1, groups) == 0, float("-inf"))
        scores = (log_mass - log_mass.logsumexp(dim=-1, keepdim=True)).amax(dim=2)    # [B, kvh, G]
        scores = scores.repeat_interleave(group_pages, dim=-1)[..., :width]
        return sa.select_pages(scores, plan.bias, plan.budget_pages)

    return select


def rule_selector(rule: str, k_cache_of):
    """A page selector that scores pages by `rule` ("fp8-engine" or
    "[fp8-|subN-]sum|max|lse-max|softmax-sum"); k_cache_of(kmin_layer) gives the layer's keys for
    the subN rules."""
    if rule in EXTRA_RULES:
        return EXTRA_RULES[rule](k_cache_of)
    if rule == "fp8-engine":
        return fp8_engine_selector
    if rule.startswith("gauss"):
        group = rule.removeprefix("gauss") or "1"
        if not group.isdigit():
            raise SystemExit(f"unknown rule {rule!r}: gauss or gaussN (N pages per group)")
        return gauss_selector(int(group), k_cache_of)
    if rule.startswith("oracle"):
        group = rule.removeprefix("oracle") or "1"
        if not group.isdigit():
            raise SystemExit(f"unknown rule {rule!r}: oracle or oracleN (N pages per group)")
        return oracle_selector(int(group), k_cache_of)
    fp8 = rule.startswith("fp8-")
    base = rule.removeprefix("fp8-")
    sub, _, how = base.partition("-") if base.startswith("sub") else ("", "", base)
    if how not in ("sum", "max", "lse-max", "softmax-sum") or (sub and not sub[3:].isdigit()) or (fp8 and sub):
        raise SystemExit(f"unknown rule {rule!r}: fp8-engine, oracle[N], gauss[N] or "
                         "[fp8-|subN-]sum|max|lse-max|softmax-sum")

    def select(q, kmin_layer, kmax_layer, pmin_layer, pmax_layer, plan, scale, fused):
        if sub:
            bound = sub_block_bounds(q, k_cache_of(kmin_layer), plan, int(sub[3:]))
        else:
            kmin, kmax = sa.gather_summaries(kmin_layer, kmax_layer, plan.sparse_pages)
            if fp8:
                kmin, kmax = -fp8_up(-kmin), fp8_up(kmax)
            bound = sa.head_page_logits(q, kmin, kmax, plan.unwritten, 1.0)      # raw bounds
        scores = combine(bound, (plan.bias > float("-inf")).unsqueeze(1), how, scale)
        return sa.select_pages(scores, plan.bias, plan.budget_pages)

    return select


class CacheLayers:
    """The runner's cache seen from a page selector, which is handed a layer's summaries:
    index(kmin_layer) is that layer's number, and calling it with kmin_layer gives the layer's
    K pages (the subN, oracle and gauss rules compute from the keys themselves)."""

    def __init__(self, runner: TorchRunner):
        self.cache = runner.cache
        self.model = runner.model

    def index(self, kmin_layer: torch.Tensor) -> int:
        kmin = self.cache.kmin
        return next(i for i in range(kmin.shape[0]) if kmin[i].data_ptr() == kmin_layer.data_ptr())

    def __call__(self, kmin_layer: torch.Tensor) -> torch.Tensor:
        return self.cache.k[self.index(kmin_layer)]


# Selectors that other bench programs add by name (bench/sparse_gate.py: "gate"): name -> a
# function of a CacheLayers giving a page selector.
EXTRA_RULES: dict = {}
# Centroid-selector rules that other bench programs add by name (bench/sparse_estimators.py:
# "shared-budget"): name -> a function giving a sparse layer's decode, the torch backend's
# sparse_decode (centroids.centroid_decode_attention's signature), set on the runner's backend.
EXTRA_DECODES: dict = {}
# an attention backend -> its own sparse_decode, put back for the configs of other rules
ENGINE_DECODES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def use_decode(attention, rule: str) -> None:
    """The backend decodes a sparse layer with the rule's function, or its own for other rules."""
    own = ENGINE_DECODES.setdefault(attention, attention.sparse_decode)
    attention.sparse_decode = EXTRA_DECODES[rule]() if rule in EXTRA_DECODES else own


def configs(budgets: list[int], args) -> list[Config]:
    """dense, then each budget with the defaults, then each budget with every --sweep entry."""
    out = [Config("dense", SparseSettings())]
    base = dict(rule="engine", sink=args.sink, recent=args.recent, dense=args.dense_layers,
                shortlist=args.shortlist_tokens, heads=int(args.head_budgets is not None))
    for spec in [""] + list(args.sweep or []):
        opts = dict(base)
        for item in filter(None, spec.split(",")):
            key, _, value = item.partition("=")
            if key not in opts:
                raise SystemExit(f"--sweep {spec!r}: unknown key {key!r} (rule, sink, recent, dense, shortlist, "
                                 "heads)")
            opts[key] = value if key == "rule" else int(value)
        if opts["rule"] in EXTRA_DECODES:
            if args.selector != "centroids":
                raise SystemExit(f"--sweep rule={opts['rule']} decodes with centroids: run it with --selector "
                                 "centroids")
        elif opts["rule"] != "engine":
            rule_selector(opts["rule"], None)       # fail early on a bad name
            if args.selector != "quest":
                raise SystemExit("--sweep rule=... replaces Quest's page selector: run it with --selector quest")
        for budget in budgets:
            sparse = dataclasses.replace(runner_sparse(args), token_budget=budget, dense_layers=opts["dense"],
                                         sink_tokens=opts["sink"], recent_tokens=opts["recent"],
                                         shortlist_tokens=opts["shortlist"],
                                         head_budget_weights=runner_sparse(args).head_budget_weights
                                         if opts["heads"] else ())
            out.append(Config(f"sparse {budget}" + (f" [{spec}]" if spec else ""), sparse, opts["rule"],
                              timed=opts["rule"] not in EXTRA_RULES and opts["rule"] not in EXTRA_DECODES
                              and not opts["rule"].startswith(("sub", "oracle", "gauss"))))
    return out


EPOCHS = itertools.count(1)
GREEDY = SampleSpec(SamplingParams(temperature=0), 0.5)


def forward(runner: TorchRunner, cfg: Config | SparseSettings, chunks: list[SequenceChunk], logits: bool = True):
    """One forward of these chunks: each sequence in the seq slot of its batch row, its page table
    sent whole (a new epoch: the tables here are rebuilt between configs), and its logits returned
    (a greedy draw on every chunk) unless logits is False (prefill)."""
    if isinstance(cfg, SparseSettings):
        cfg = Config("", cfg)
    if hasattr(runner.attention, "sparse_decode"):
        use_decode(runner.attention, cfg.rule)
    if cfg.rule == "engine" or cfg.rule in EXTRA_DECODES:
        runner.attention.__dict__.pop("page_selector", None)        # the class's: the engine's rule
    else:
        assert hasattr(runner.attention, "page_selector"), "rule sweeps run on the torch attention backends"
        runner.attention.page_selector = rule_selector(cfg.rule, CacheLayers(runner))
    # The runner and its attention backend keep the sparse settings they were built with; a config
    # swaps them in for this forward (None: dense), as a server built with them would run.
    runner.sparse = runner.attention.sparse = cfg.sparse if cfg.sparse.enabled else None
    chunks = [dataclasses.replace(c, seq_slot=i, table_epoch=next(EPOCHS), sample=GREEDY if logits else None)
              for i, c in enumerate(chunks)]
    return runner.forward(ForwardBatch(chunks, return_logits=logits))


def stretch_positions(runner: TorchRunner, rope: str) -> None:
    """Rope scaling for contexts past the embedded model's 8k, without training: "linear:F"
    (position interpolation: every frequency divided by F) or "ntk:F" (NTK-aware: the rope base
    raised so that the highest frequency stays and the lowest is divided by F). The rotary tables
    are rewritten in place (graphs captured later read the same tensors). "none" changes nothing."""
    if rope == "none":
        return
    kind, _, value = rope.partition(":")
    factor = float(value)
    model, attention = runner.model, runner.attention
    half = model.inv_freq.shape[0]
    if kind == "linear":
        model.inv_freq = model.inv_freq / factor
    elif kind == "ntk":
        i = torch.arange(half, device=model.inv_freq.device, dtype=torch.float32)
        model.inv_freq = model.inv_freq * factor ** (-i / (half - 1))
    else:
        raise SystemExit(f"--rope {rope!r}: none, linear:F or ntk:F")
    cos, sin = model.rotary_tables(attention.cos.shape[0])
    assert cos.shape == attention.cos.shape and sin.shape == attention.sin.shape
    attention.cos.copy_(cos)
    attention.sin.copy_(sin)


def runner_sparse(args) -> SparseSettings:
    """Settings that the runners are built with: sparse on, so that their caches keep summaries
    (--selector's: Quest's bounds, or centroids written by the runner after each step)."""
    weights = read_weights(args.head_budgets) if args.head_budgets is not None else ()
    return SparseSettings(True, max(args.budgets), args.dense_layers, args.sink, args.recent, args.summary_tokens,
                          args.shortlist_tokens, args.selector, args.centroids, args.group_tokens, args.run_tokens,
                          weights)


@contextlib.contextmanager
def no_summaries(runner: TorchRunner, off: bool):
    """With off, the cache has no summaries for the duration: nothing writes them, as in a server
    with sparse attention off (the dense baseline of the timing)."""
    cache = runner.cache
    saved = cache.kmin, cache.kmax, cache.pmin, cache.pmax, runner.group_pages
    if off:
        cache.kmin = cache.kmax = cache.pmin = cache.pmax = runner.group_pages = None
    try:
        yield
    finally:
        cache.kmin, cache.kmax, cache.pmin, cache.pmax, runner.group_pages = saved


def prefill(runner: TorchRunner, seqs: list[tuple[list[int], list[int]]], chunk: int) -> None:
    """Dense prefill of every (tokens, pages), `chunk` tokens per sequence per forward."""
    longest = max(len(t) for t, _ in seqs)
    for start in range(0, longest, chunk):
        batch = [SequenceChunk(t[start:start + chunk], start, p) for t, p in seqs if start < len(t)]
        forward(runner, SparseSettings(), batch, logits=False)


def fork(prefix_pages: list[int], prefix_len: int, total: int, pages: Pages) -> list[int]:
    """A page table sharing the full pages of a prefix (prefix_len is page aligned)."""
    assert prefix_len % pages.page_size == 0
    return prefix_pages[:prefix_len // pages.page_size] + pages.take(total - prefix_len)


# ---- 1. teacher-forced -------------------------------------------------------------------------

def teacher_forced(runner, tok, cfgs, args) -> dict[str, dict]:
    """Config by config (dense first): each decodes every position on its own K/V past the shared
    dense prefill; its pages are handed back before the next config, which rewrites them."""
    ids = tok.encode(english_text())
    need = args.texts * args.context
    if len(ids) < need:
        raise SystemExit(f"only {len(ids)} tokens of text, {need} needed")
    texts = [ids[i * args.context:(i + 1) * args.context] for i in range(args.texts)]
    start = (args.context - args.positions) // runner.page_size * runner.page_size
    positions = args.context - 1 - start          # decode inputs start..context-2 predict start+1..
    pages = Pages(runner.page_size)
    shared = [pages.take(start) for _ in texts]
    t0 = time.perf_counter()
    prefill(runner, [(t[:start], p) for t, p in zip(texts, shared, strict=True)], args.prefill_chunk)
    say(f"teacher-forced: {len(texts)} texts of {args.context} tokens, prefill {start} each "
        f"({time.perf_counter() - t0:.1f} s), {positions} decode positions each "
        f"({positions * len(texts)} in all, contexts {start + 1}..{args.context - 1})")
    targets = torch.tensor([[t[pos + 1] for t in texts] for pos in range(start, args.context - 1)])
    dense_lp: list[torch.Tensor] = []             # [texts, vocab] per position
    stats = {}
    for cfg in cfgs:
        t0 = time.perf_counter()
        mark = pages.next
        tables = [fork(s, start, args.context, pages) for s in shared]
        s = stats[cfg.name] = {"agree": 0, "kl": 0.0, "nll": 0.0, "read": 0, "skipped": 0}
        for step, pos in enumerate(range(start, args.context - 1)):
            chunks = [SequenceChunk([t[pos]], pos, table) for t, table in zip(texts, tables, strict=True)]
            result = forward(runner, cfg, chunks)
            lp = torch.from_numpy(result.logits).double().log_softmax(dim=-1)
            s["read"] += result.attention.pages_read
            s["skipped"] += result.attention.pages_skipped
            if cfg.name == "dense":
                dense_lp.append(lp)
            dense = dense_lp[step]
            s["agree"] += int((lp.argmax(dim=-1) == dense.argmax(dim=-1)).sum())
            s["kl"] += float((dense.exp() * (dense - lp)).sum())
            s["nll"] -= float(lp.gather(1, targets[step].unsqueeze(1)).sum())
        pages.release(mark)
        count = positions * len(texts)
        s.update(agree=s["agree"] / count, kl=s["kl"] / count, ppl=math.exp(s["nll"] / count),
                 ratio=s["skipped"] / max(1, s["read"] + s["skipped"]), positions=count)
        d = stats["dense"]
        if s["skipped"] and s["kl"] == 0.0 and s["nll"] == d["nll"]:
            raise SystemExit(f"{cfg.name}: pages were skipped, yet every logit equals dense's: the config's "
                             f"settings did not reach the attention (a replayed graph?)")
        say(f"  tf {cfg.name:40s} top-1 {s['agree'] * 100:6.2f}%  KL {s['kl']:.4f}  ppl {s['ppl']:.3f} "
            f"({(s['ppl'] / d['ppl'] - 1) * 100:+.2f}%)  sparsity {s['ratio']:.3f}  "
            f"({time.perf_counter() - t0:.0f} s)")
        flush_report(args)
    return stats


# ---- 2. passkey --------------------------------------------------------------------------------

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "\nWhat is the pass key? The pass key is"


def passkey_prompt(tok, length: int, depth: float, key: int) -> list[int]:
    intro, unit, question = tok.encode(INTRO), tok.encode(FILLER), tok.encode(QUESTION)
    needle = tok.encode(f"The pass key is {key}. Remember it. {key} is the pass key. ")
    units = max(2, (length - len(intro) - len(needle) - len(question)) // len(unit))
    before = round(units * depth)
    return intro + unit * before + needle + unit * (units - before) + question


def passkey(runner, tok, cfgs, args) -> tuple[dict[str, float], list[tuple]]:
    rng = np.random.default_rng(args.seed)
    trials = []
    for length in args.passkey_lengths:
        for depth in args.passkey_depths:
            key = int(rng.integers(10000, 100000))
            trials.append((length, depth, key, passkey_prompt(tok, length, depth, key)))
    pages = Pages(runner.page_size)
    gen = args.passkey_tokens
    prefixes = []
    for _, _, _, ids in trials:
        split = (len(ids) - 16) // runner.page_size * runner.page_size        # >= 16 tokens decoded
        prefixes.append((split, pages.take(split)))
    t0 = time.perf_counter()
    prefill(runner, [(ids[:split], p) for (_, _, _, ids), (split, p) in zip(trials, prefixes, strict=True)],
            args.prefill_chunk)
    say(f"passkey: {len(trials)} prompts of {min(len(t[3]) for t in trials)}..{max(len(t[3]) for t in trials)} "
        f"tokens, depths {args.passkey_depths}, prefill {time.perf_counter() - t0:.1f} s")
    answers: dict[str, list[str]] = {}
    accuracy, rows = {}, []
    for cfg in cfgs:
        mark = pages.next
        tables = [fork(p, split, len(ids) + gen, pages) for (_, _, _, ids), (split, p)
                  in zip(trials, prefixes, strict=True)]
        fed = [list(ids) for _, _, _, ids in trials]
        pos = [split for split, _ in prefixes]
        out = [[] for _ in trials]
        while True:
            active = [i for i in range(len(trials)) if len(out[i]) < gen]
            if not active:
                break
            chunks = [SequenceChunk([fed[i][pos[i]]], pos[i], tables[i]) for i in active]
            logits = forward(runner, cfg, chunks).logits
            for row, i in enumerate(active):
                pos[i] += 1
                if pos[i] >= len(fed[i]):                    # past the prompt: greedy answer
                    token = int(logits[row].argmax())
                    fed[i].append(token)
                    out[i].append(token)
        pages.release(mark)
        answers[cfg.name] = [tok.decode(o) for o in out]
        hits = []
        for (_, depth, key, ids), text in zip(trials, answers[cfg.name], strict=True):
            found = re.search(r"\d+", text)
            hits.append(found is not None and found.group() == str(key))
            rows.append((cfg.name, len(ids), depth, key, text.strip()[:24], hits[-1]))
        accuracy[cfg.name] = sum(hits) / len(hits)
        missed = [f"{len(ids)}/{depth}" for (_, depth, _, ids), hit in zip(trials, hits, strict=True) if not hit]
        say(f"  passkey {cfg.name:40s} {sum(hits)}/{len(hits)}" + (f"  missed {' '.join(missed)}" if missed else ""))
        flush_report(args)
    return accuracy, rows


# ---- 3. decode speed -----------------------------------------------------------------------------

def decode_speed(source, tok, cfgs, args) -> list[tuple]:
    runner = TorchRunner(RunnerSettings(source.kind, source.path, "bench", dtype="float32", device="cpu",
                                        page_size=args.page_size, num_pages=args.timing_context // args.page_size + 8,
                                        context_length=args.context_length, sparse=runner_sparse(args)))
    stretch_positions(runner, args.rope)
    ids = tok.encode(english_text())[:args.timing_context]
    pages = Pages(runner.page_size)
    table = pages.take(len(ids) + 1)
    t0 = time.perf_counter()
    torch.set_num_threads(max(args.timing_threads))
    prefill(runner, [(ids, table)], args.prefill_chunk)
    say(f"decode timing: context {len(ids)} on {platform.processor() or platform.machine()}, "
        f"prefill {time.perf_counter() - t0:.1f} s")
    rows = []
    for threads in args.timing_threads:
        torch.set_num_threads(threads)
        timed = [cfg for cfg in cfgs if cfg.timed]
        times: dict[str, list[float]] = {cfg.name: [] for cfg in timed}
        ratio = {}
        for step in range(args.timing_steps + 2):        # configs interleaved: drift hits all alike
            for cfg in timed:
                with no_summaries(runner, off=not cfg.sparse.enabled):
                    t0 = time.perf_counter()
                    result = forward(runner, cfg, [SequenceChunk([ids[-1]], len(ids), table)])
                    if step >= 2:
                        times[cfg.name].append(time.perf_counter() - t0)
                a = result.attention
                ratio[cfg.name] = a.pages_skipped / max(1, a.pages_read + a.pages_skipped)
        rows += [(threads, cfg.name, statistics.median(times[cfg.name]) * 1e3, ratio[cfg.name]) for cfg in timed]
        say(f"  timing at {threads} threads: " + ", ".join(f"{r[1]} {r[2]:.1f} ms" for r in rows if r[0] == threads))
        flush_report(args)
    return rows


# ---- main ----------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="packaged:smollm2-135m-instruct", help="model source")
    parser.add_argument("--tokenizer-json", default=None, help="tokenizer.json (default: the model's)")
    parser.add_argument("--device", default="cpu", help="device for the quality runs (cpu | cuda)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for the quality runs")
    parser.add_argument("--budgets", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--sink", type=int, default=16)
    parser.add_argument("--recent", type=int, default=64)
    parser.add_argument("--dense-layers", type=int, default=2)
    parser.add_argument("--summary-tokens", type=int, default=4, help="tokens per key min/max summary")
    parser.add_argument("--shortlist-tokens", type=int, default=8192,
                        help="coarse to fine past this many tokens (0: off); the engine's default")
    parser.add_argument("--context-length", type=int, default=8192, help="the runners' context length")
    parser.add_argument("--rope", default="none",
                        help="rope scaling for contexts past the model's 8k: none | linear:F | ntk:F")
    parser.add_argument("--texts", type=int, default=4)
    parser.add_argument("--context", type=int, default=7000, help="tokens per teacher-forced text")
    parser.add_argument("--positions", type=int, default=560, help="decoded positions per text")
    parser.add_argument("--passkey-lengths", type=int, nargs="+", default=[4000, 5500, 7000])
    parser.add_argument("--passkey-depths", type=float, nargs="+",
                        default=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    parser.add_argument("--passkey-tokens", type=int, default=8, help="answer tokens generated")
    parser.add_argument("--timing-context", type=int, default=7000)
    parser.add_argument("--timing-threads", type=int, nargs="+", default=[2])
    parser.add_argument("--timing-steps", type=int, default=15)
    parser.add_argument("--prefill-chunk", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", nargs="*", default=[], choices=["quality", "passkey", "timing"])
    parser.add_argument("--selector", default=SparseSettings.selector, choices=["quest", "centroids"],
                        help="the engine's page selector every sparse config runs (sparse_attention.selector)")
    parser.add_argument("--centroids", type=int, default=SparseSettings.centroids,
                        help="--selector centroids: centroids per group")
    parser.add_argument("--group-tokens", type=int, default=SparseSettings.group_tokens,
                        help="--selector centroids: tokens per group")
    parser.add_argument("--head-budgets", default=None,
                        help="centroids: a budget per (layer, KV head) from this table (a shipped table's name or "
                             "a file: sparse_attention.head_budgets), --budgets then the mean per head; "
                             "--sweep heads=0 adds the uniform budget beside it")
    parser.add_argument("--run-tokens", type=int, default=SparseSettings.run_tokens,
                        help="--selector centroids: tokens per run of the coarse stage (the runners keep one "
                             "run size, so one run of the bench measures one)")
    parser.add_argument("--sweep", nargs="*", default=[], metavar="SPEC",
                        help="extra configs at every budget, e.g. rule=lse-max,recent=64 (keys: rule, sink, "
                             "recent, dense, shortlist; rules: [fp8-|subN-]sum|max|lse-max|softmax-sum)")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run of every path")
    parser.add_argument("--out", default=None, help="also write the report to this file")
    parser.add_argument("--text-file", default=None, help="read the bench's text from this file (written by "
                                                          "--save-text) instead of this Python's docs")
    parser.add_argument("--save-text", default=None, help="write the text this Python's docs give to this file "
                                                          "and stop")
    args = parser.parse_args()
    if args.save_text:
        Path(args.save_text).write_text(english_text(), encoding="utf-8")
        return
    global TEXT_FILE
    TEXT_FILE = args.text_file
    if args.quick:
        args.budgets, args.recent, args.texts, args.context, args.positions = [64, 128], 32, 2, 400, 40
        args.passkey_lengths, args.passkey_depths, args.timing_context = [300, 500], [0.2, 0.8], 600
        args.timing_steps = 3

    source = resolve_source(args.model)
    tok = Tokenizer(args.tokenizer_json, source)
    cfgs = configs(args.budgets, args)
    started = time.perf_counter()
    say(f"# bench/sparse_quality.py  {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    say(f"command: python {' '.join(sys.argv)}")
    say(f"python {platform.python_version()}, torch {torch.__version__}, model {source.path.rsplit('/', 1)[-1]}, "
        f"float32, page {args.page_size}, sink {args.sink}, recent {args.recent}, dense_layers {args.dense_layers}, "
        f"summary_tokens {args.summary_tokens}, shortlist_tokens {args.shortlist_tokens}, "
        f"selector {args.selector}" + (f" ({args.centroids} per {args.group_tokens} tokens, "
                                          f"runs of {args.run_tokens})" if args.selector == "centroids" else "")
        + f", context_length {args.context_length}, rope scaling {args.rope}")
    quality = keys = timing = None
    if not {"quality", "passkey"} <= set(args.skip):
        # One config's pages at a time (each hands its pages back before the next).
        needed = max(args.texts * (args.context + args.positions + 2 * args.page_size),
                     len(args.passkey_lengths) * len(args.passkey_depths)
                     * (max(args.passkey_lengths) + 64 + 16 + args.passkey_tokens + 48))
        runner = TorchRunner(RunnerSettings(
            source.kind, source.path, "bench", dtype="float32", device=args.device, page_size=args.page_size,
            num_pages=needed // args.page_size + 16, context_length=args.context_length, threads=args.threads,
            sparse=runner_sparse(args),
            # rule sweeps swap the page selector of the torch backends (the Triton kernels have one rule)
            attention="torch" if any(cfg.rule != "engine" for cfg in cfgs) else "auto",
            # a captured decode graph would replay the settings of the config it was captured under:
            # configs swap them between forwards, so every forward runs eagerly
            cuda_graphs=False))
        stretch_positions(runner, args.rope)
        say(f"quality runs on {runner.info.device}")
        if "passkey" not in args.skip:
            keys, rows = passkey(runner, tok, cfgs, args)
            for name, length, depth, key, text, hit in rows:
                mark = "ok" if hit else "MISS"
                print(f"  {name:12s} {length:5d} tokens depth {depth:.1f} key {key}: {text!r} {mark}")
        if "quality" not in args.skip:
            quality = teacher_forced(runner, tok, cfgs, args)
        del runner
        if args.device == "cuda":
            torch.cuda.empty_cache()
    if "timing" not in args.skip:
        timing = decode_speed(source, tok, cfgs, args)

    say("")
    say(f"| config | top-1 agree | mean KL | perplexity | ppl vs dense | sparsity | passkey | "
        f"decode ms/token @{args.timing_context} ({'/'.join(f'{t} thr' for t in args.timing_threads)}) "
        f"| speed-up |")
    say("|---|---|---|---|---|---|---|---|---|")
    for name in [cfg.name for cfg in cfgs]:
        cells = [name]
        if quality:
            q, d = quality[name], quality["dense"]
            cells += [f"{q['agree'] * 100:.2f}%", f"{q['kl']:.4f}", f"{q['ppl']:.3f}",
                      f"{(q['ppl'] / d['ppl'] - 1) * 100:+.2f}%", f"{q['ratio']:.3f}"]
        else:
            cells += ["-"] * 5
        cells.append(f"{keys[name] * 100:.0f}%" if keys else "-")
        if timing:
            mine = [r for r in timing if r[1] == name]
            dense = {r[0]: r[2] for r in timing if r[1] == "dense"}
            cells.append(" / ".join(f"{r[2]:.1f}" for r in mine) or "-")
            cells.append(" / ".join(f"{dense[r[0]] / r[2]:.2f}x" for r in mine) or "-")
        else:
            cells += ["-", "-"]
        say("| " + " | ".join(cells) + " |")
    if quality:
        say(f"teacher-forced positions per config: {quality['dense']['positions']}; sparsity = pages skipped / "
            f"pages dense would read, sparse-eligible layers")
    if timing:
        say("timing sparsity at the timed step: " + ", ".join(f"{r[1]} {r[3]:.3f}" for r in timing
                                                               if r[0] == args.timing_threads[0]))
    say(f"total {time.perf_counter() - started:.0f} s")
    flush_report(args)


if __name__ == "__main__":
    main()
