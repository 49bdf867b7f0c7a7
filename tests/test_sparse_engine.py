"""Sparse decode inside the engine (Quest, and the centroid selector).

1. A property test: the real scheduler, page pool and radix cache drive a tiny random Llama with
   sparse decode on, through shared prefixes, eviction, preemption and page recycling. After every
   step the min/max summaries of every live page (radix tree pages and the requests' own pages,
   partial last pages and partial blocks included) are exactly the min/max of the keys its owner
   wrote in each block, and 0 for the blocks it has not written yet; the keys of
   the layers that do not depend on sparse attention are those a fresh dense prefill of the same
   tokens gives: no page carries a summary (or keys) of an earlier owner. With the centroid
   selector, every group a live sequence has completed carries the summary of its own keys. The
   attention stats of every forward equal what the page counts say.
2. The embedded model: greedy decoding at or below the budget is identical to dense (logits too);
   above it pages (or whole groups) are skipped as counted. Sparse decode is a start-up setting:
   one runner each.
3. A live server with sparse_attention enabled answers the openai SDK; /health and /metrics show
   the pages read and skipped, exactly as the token counts predict.
"""
from __future__ import annotations

import dataclasses
import itertools

import httpx
import numpy as np
import openai
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends.base import ForwardBatch, RunnerSettings, SampleSpec, SequenceChunk, SparseSettings
from backends.cuda.attention.sparse import page_counts
from backends.cuda.runner import TorchRunner
from backends.sampling_params import SamplingParams
from backends.source import resolve_source
from gateway.engine.page_pool import PagePool
from gateway.engine.radix_cache import RadixCache
from gateway.engine.request import Request
from gateway.engine.scheduler import Scheduler
from kernels import centroid_reference as cref
from kernels import reference
from tests.conftest import MODEL, model_config, start_server, tiny_llama_folder

PAGE = 4
VOCAB = 96
# A shortlist of 8 pages: sequences past 32 tokens are scored coarse to fine (the default's two stages
# at tiny sizes; shorter ones past the budget in one stage).
TINY_SPARSE = SparseSettings(enabled=True, token_budget=16, dense_layers=1, sink_tokens=4, recent_tokens=4,
                             summary_tokens=2, shortlist_tokens=32)
GREEDY = SampleSpec(SamplingParams(temperature=0), 0.5)
EPOCHS = itertools.count(1)       # the oracle's table_epoch: a new one for every fresh prefill


# ---- 1. property test on a tiny model --------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> str:
    return tiny_llama_folder(tmp_path_factory.mktemp("tiny-llama-sparse"), hidden_size=48, intermediate_size=96,
                             num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2, vocab_size=VOCAB,
                             max_position_embeddings=256)


@pytest.fixture(scope="module")
def tiny_runners(tiny_folder):
    def make(sparse: SparseSettings) -> TorchRunner:
        return TorchRunner(RunnerSettings("hf", tiny_folder, "tiny", page_size=PAGE, num_pages=24, threads=1,
                                          sparse=sparse, validate_batches=True))
    return make(TINY_SPARSE), make(SparseSettings())


def forget_slots(runner: TorchRunner) -> None:
    """A new Scheduler numbers its table epochs from 1 again: make the runner's page-table store
    (shared by the tests of this module) forget the rows an earlier scheduler left behind."""
    for slot in range(runner.max_sequences):
        runner.tables.forget(slot)


class StubDetokenizer:
    stopped = False

    def add_token(self, token_id: int) -> str:
        return ""

    def finish(self) -> str:
        return ""


class CountingRunner:
    """The runner as the scheduler's backend: checks each step's attention stats against the page
    counts of its decode rows, and keeps whatever a step raised (a stats mismatch included: the
    scheduler turns it into an error finish and carries on, so the tests assert `errors` is empty)."""

    def __init__(self, runner: TorchRunner):
        self.runner = runner
        self.page_size, self.num_pages, self.info = runner.page_size, runner.num_pages, runner.info
        self.max_sequences, self.overlap = runner.max_sequences, runner.overlap
        self.skipped = 0
        self.longest_decode = 0     # tokens of the longest decode row (does the shortlist engage?)
        self.errors: list[BaseException] = []

    def launch(self, batch: ForwardBatch) -> CountedStep:
        try:
            return CountedStep(self, batch, self.runner.launch(batch))
        except BaseException as error:
            self.errors.append(error)
            raise

    def forward(self, batch: ForwardBatch):
        return self.launch(batch).result()

    def count(self, batch: ForwardBatch, result) -> None:
        sparse, kv_heads = self.runner.settings.sparse, self.runner.config.num_kv_heads
        group_pages, budget = 1, page_counts(sparse, PAGE)[0]
        if sparse.selector == "centroids":      # whole groups; a chosen last group may be partial
            group_pages, budget = sparse.group_tokens // PAGE, sparse.token_budget // sparse.group_tokens
        layers = self.runner.config.num_layers - sparse.dense_layers
        read = skipped = 0
        for seq in batch.sequences:
            if len(seq.token_ids) == 1:
                self.longest_decode = max(self.longest_decode, seq.end_position)
                pages = -(-seq.end_position // PAGE)
                dropped = max(0, -(-pages // group_pages) - budget) * group_pages
                read += (pages - dropped) * kv_heads * layers
                skipped += dropped * kv_heads * layers
        assert (result.attention.pages_read, result.attention.pages_skipped) == (read, skipped)
        self.skipped += skipped


@dataclasses.dataclass
class CountedStep:
    counter: CountingRunner
    batch: ForwardBatch
    pending: object

    def result(self):
        try:
            result = self.pending.result()
            self.counter.count(self.batch, result)
        except BaseException as error:
            self.counter.errors.append(error)
            raise
        return result


def check_pages(runner: TorchRunner, oracle: TorchRunner,
                sequences: list[tuple[list[int], list[int]]]) -> None:
    """sequences: (tokens written, their pages). Summaries are exact (every block of every page,
    0 where nothing is written yet); the keys of the layers before any sparse one match a fresh
    dense prefill (the dense oracle keeps no summaries)."""
    cache = runner.cache
    for tokens, pages in sequences:
        n = len(tokens)
        if n == 0:
            continue
        used = torch.tensor(pages[:-(-n // PAGE)])
        for layer in range(runner.config.num_layers):
            kmin, kmax = torch.full_like(cache.kmin[layer], torch.nan), torch.full_like(cache.kmax[layer], torch.nan)
            reference.update_page_summaries(kmin, kmax, cache.k[layer], used, 0, n)
            assert torch.equal(cache.kmin[layer][used], kmin[used])
            assert torch.equal(cache.kmax[layer][used], kmax[used])
        # Layers up to dense_layers only see dense attention: a fresh prefill reproduces them.
        table = list(range(len(used)))
        oracle.forward(ForwardBatch([SequenceChunk(tokens, 0, table, seq_slot=0, table_epoch=next(EPOCHS))]))
        for layer in range(TINY_SPARSE.dense_layers + 1):
            got = cache.k[layer][used].flatten(0, 1)[:n]
            want = oracle.cache.k[layer][:len(used)].flatten(0, 1)[:n]
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def tree_sequences(cache: RadixCache) -> list[tuple[list[int], list[int]]]:
    out = []
    stack = [(node, [], []) for node in cache.root.children.values()]
    while stack:
        node, tokens, pages = stack.pop()
        tokens, pages = tokens + list(node.key), pages + list(node.pages)
        out.append((tokens, pages))
        stack.extend((child, tokens, pages) for child in node.children.values())
    return out


PREFIXES = [list(range(3, 3 + 13)), [7, 8, 9, 10, 11, 12, 13, 14, 15], []]
request_spec = st.tuples(st.sampled_from([0, 1, 2]),
                         st.lists(st.integers(1, VOCAB - 1), min_size=1, max_size=14),
                         st.integers(1, 14), st.integers(0, 4))


def make_request(rid: str, prompt: list[int], max_new: int) -> Request:
    return Request(id=rid, index=0, prompt_ids=prompt, params=SamplingParams(temperature=0),
                   max_new_tokens=max_new, stop_token_ids=frozenset(), detokenizer=StubDetokenizer(),
                   emit=lambda event: None)


# The centroid selector (selector: centroids) on the same tiny model: groups of 2 pages, 3 in the budget;
# coarse to fine past 3 runs of 2 groups (48 tokens), so that long rows choose among shortlisted runs.
TINY_CENTROIDS = SparseSettings(enabled=True, token_budget=24, dense_layers=1, sink_tokens=4, recent_tokens=4,
                                shortlist_tokens=48, selector="centroids", centroids=2, group_tokens=8,
                                run_tokens=16)


@pytest.fixture(scope="module")
def centroid_runner(tiny_folder):
    return TorchRunner(RunnerSettings("hf", tiny_folder, "tiny", page_size=PAGE, num_pages=24, threads=1,
                                      sparse=TINY_CENTROIDS, validate_batches=True))


def check_groups(runner: TorchRunner, sequences: list[tuple[list[int], list[int]]]) -> None:
    """Every group (and run of the coarse stage) a live sequence has completed holds the summary of
    its own keys (as centroid_reference.centroid_group_summaries computes it from the cache), whoever owned
    its pages before."""
    cache = runner.cache
    for span, cents_all, stats_all in ((TINY_CENTROIDS.group_tokens, cache.cents, cache.cstats),
                                       (TINY_CENTROIDS.run_tokens, cache.run_cents, cache.run_cstats)):
        unit_pages = span // PAGE
        for tokens, pages in sequences:
            full = len(tokens) // span
            if not full:
                continue
            table = torch.tensor(pages[:full * unit_pages])
            lasts = table[unit_pages - 1::unit_pages]
            for layer in range(runner.config.num_layers):
                cents, stats = torch.zeros_like(cents_all[layer]), torch.zeros_like(stats_all[layer])
                cref.centroid_group_summaries(cache.k[layer], cents, stats, table, full * span, PAGE, unit_pages)
                assert torch.equal(cents_all[layer][lasts].view(torch.uint8), cents[lasts].view(torch.uint8))
                assert torch.equal(stats_all[layer][lasts], stats[lasts])


@pytest.fixture(params=["quest", "centroids"])
def sparse_case(request, tiny_runners, centroid_runner):
    """(runner, check of its summaries) for each selector: Quest's min/max summaries of every block
    (and the dense layers' keys, against the dense oracle), or every completed group's centroids."""
    if request.param == "quest":
        runner, oracle = tiny_runners
        assert runner.cache.kmin.shape == (3, runner.num_pages + 1, PAGE // 2, 2, 8) and oracle.cache.kmin is None
        return runner, lambda sequences: check_pages(runner, oracle, sequences)
    runner = centroid_runner
    assert runner.cache.kmin is None and runner.cache.cents.shape == (3, runner.num_pages + 1, 2, 2, 8)
    assert runner.cache.run_cents.shape == runner.cache.cents.shape and runner.cache.run_pages == 4
    return runner, lambda sequences: check_groups(runner, sequences)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs=st.lists(request_spec, min_size=3, max_size=7))
def test_summaries_exact_under_reuse_eviction_and_recycling(sparse_case, specs):
    runner, check = sparse_case
    forget_slots(runner)
    counting = CountingRunner(runner)
    pool = PagePool(runner.num_pages)
    cache = RadixCache(pool, PAGE)
    scheduler = Scheduler(counting, pool, cache, max_running=3, prefill_chunk_tokens=12, context_length=128)
    ids = itertools.count()
    for prefix, suffix, max_new, steps_after in specs:
        scheduler.add(make_request(f"r{next(ids)}", PREFIXES[prefix] + suffix, max_new))
        for _ in range(steps_after + 1):
            if not scheduler.has_work:
                break
            scheduler.step()
            scheduler.check_accounting()
            cache.check_invariants()
            check([(r.all_ids[:r.num_computed], r.page_table) for r in scheduler.running])
    for _ in range(200):
        if not scheduler.has_work:
            break
        scheduler.step()
        check([(r.all_ids[:r.num_computed], r.page_table) for r in scheduler.running])
    assert not scheduler.has_work and not counting.errors, counting.errors
    check(tree_sequences(cache))


def test_property_run_covers_sparse_decode_and_recycling(sparse_case):
    """A fixed run of the property test that must evict, preempt and decode sparsely."""
    runner, check = sparse_case
    forget_slots(runner)
    counting = CountingRunner(runner)
    pool = PagePool(runner.num_pages)
    cache = RadixCache(pool, PAGE)
    scheduler = Scheduler(counting, pool, cache, max_running=3, prefill_chunk_tokens=12, context_length=128)
    rng = np.random.default_rng(4)
    for i in range(6):
        prompt = PREFIXES[i % 2] + rng.integers(1, VOCAB, 6 + 3 * i).tolist()
        scheduler.add(make_request(f"f{i}", prompt, 12 + 2 * i))
    while scheduler.has_work:
        scheduler.step()
        check([(r.all_ids[:r.num_computed], r.page_table) for r in scheduler.running])
    check(tree_sequences(cache))
    assert not counting.errors, counting.errors
    assert counting.skipped > 0 and cache.evictions > 0 and scheduler.stats.preemptions > 0
    assert scheduler.stats.cached_prompt_tokens > 0
    # the centroid selector's coarse stage served rows longer than its shortlist (3 runs, 48 tokens)
    assert counting.longest_decode > TINY_CENTROIDS.shortlist_tokens


# ---- 2. the embedded model -------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm():
    """A runner per sparse setting (sparse decode is chosen at start-up; a sparse one keeps
    summaries), made on first use, and the tokenizer."""
    source = resolve_source("packaged:smollm2-135m-instruct")
    runners: dict[SparseSettings, TorchRunner] = {}

    def runner(sparse: SparseSettings) -> TorchRunner:
        if sparse not in runners:
            runners[sparse] = TorchRunner(RunnerSettings(source.kind, source.path, MODEL, page_size=16,
                                                         num_pages=64, context_length=1024, threads=1,
                                                         sparse=sparse, validate_batches=True))
        return runners[sparse]
    from gateway.templating import load_tokenizer
    return runner, load_tokenizer(source)


PASSAGE = ("The lighthouse keeper climbed the spiral stairs every evening at dusk. He trimmed the wick, "
           "polished the great lens and wrote the weather in a worn leather logbook. Ships passing the "
           "rocky headland relied on the steady beam to find the harbour entrance, and the keeper took "
           "pride in never letting the light fail, not even during the worst winter storms. ")


def greedy(runner: TorchRunner, prompt: list[int], steps: int):
    table = list(range(1, 1 + -(-(len(prompt) + steps) // runner.page_size)))
    epoch = next(EPOCHS)

    def step(token_ids: list[int], start: int):
        chunk = SequenceChunk(token_ids, start, table, seq_slot=0, table_epoch=epoch, sample=GREEDY)
        return runner.forward(ForwardBatch([chunk], return_logits=True))

    result = step(prompt, 0)
    assert result.attention.pages_read == result.attention.pages_skipped == 0     # prefill is dense
    logits, stats, tokens = [result.logits[0]], [], [result.tokens[0].token_id]
    for i in range(steps - 1):
        result = step([tokens[-1]], len(prompt) + i)
        logits.append(result.logits[0])
        stats.append((result.attention.pages_read, result.attention.pages_skipped))
        tokens.append(result.tokens[0].token_id)
    assert tokens == [int(row.argmax()) for row in logits]                         # greedy
    return tokens, np.stack(logits), stats


def test_real_model_greedy_identical_to_dense_within_budget(smollm):
    make, tokenizer = smollm
    prompt = tokenizer.encode(PASSAGE + "Where did the keeper record the weather?")
    steps = 12
    sparse = SparseSettings(True, 256, 2, 16, 32)
    assert len(prompt) + steps <= 256
    dense_tokens, dense_logits, _ = greedy(make(SparseSettings()), prompt, steps)
    runner = make(sparse)
    tokens, logits, stats = greedy(runner, prompt, steps)
    assert tokens == dense_tokens
    assert np.array_equal(logits, dense_logits)
    kv_heads, layers = runner.config.num_kv_heads, runner.config.num_layers - 2
    for i, (read, skipped) in enumerate(stats):
        assert (read, skipped) == (-(-(len(prompt) + i + 1) // 16) * kv_heads * layers, 0)


def test_real_model_above_budget_skips_pages(smollm):
    make, tokenizer = smollm
    prompt = tokenizer.encode(PASSAGE * 2 + "Where did the keeper record the weather?")
    sparse = SparseSettings(True, 64, 2, 16, 16)                 # 4 pages: sink, recent, 2 chosen
    runner = make(sparse)
    tokens, logits, stats = greedy(runner, prompt, 8)
    dense_tokens, dense_logits, _ = greedy(make(SparseSettings()), prompt, 8)
    assert np.array_equal(logits[0], dense_logits[0])            # the first token comes from prefill
    kv_heads, layers = runner.config.num_kv_heads, runner.config.num_layers - 2
    for i, (read, skipped) in enumerate(stats):
        pages = -(-(len(prompt) + i + 1) // 16)
        assert (read, skipped) == (4 * kv_heads * layers, (pages - 4) * kv_heads * layers)
    assert np.isfinite(logits).all()


def test_real_model_centroid_selector(smollm):
    """Within the budget the centroid selector is dense to the bit; past it whole groups of 64 tokens
    are skipped as counted (the chosen last group partial), and the text stays finite."""
    make, tokenizer = smollm
    short = tokenizer.encode(PASSAGE + "Where did the keeper record the weather?")
    within = SparseSettings(True, 256, 2, 16, 32, selector="centroids")
    dense_tokens, dense_logits, _ = greedy(make(SparseSettings()), short, 6)
    tokens, logits, _ = greedy(make(within), short, 6)
    assert tokens == dense_tokens and np.array_equal(logits, dense_logits)
    prompt = tokenizer.encode(PASSAGE * 3 + "Where did the keeper record the weather?")
    sparse = SparseSettings(True, 192, 2, 16, 64, selector="centroids")          # 3 groups: sink, recent, 1
    runner = make(sparse)
    assert runner.cache.kmin is None and runner.cache.cents is not None
    tokens, logits, stats = greedy(runner, prompt, 8)
    kv_heads, layers = runner.config.num_kv_heads, runner.config.num_layers - 2
    for i, (read, skipped) in enumerate(stats):
        n = len(prompt) + i + 1
        pages, groups = -(-n // 16), -(-n // 64)
        assert groups > 3
        dropped = (groups - 3) * 4
        assert (read, skipped) == ((pages - dropped) * kv_heads * layers, dropped * kv_heads * layers)
    assert np.isfinite(logits).all()


def test_real_model_centroid_head_budgets(smollm):
    """With the shipped per-(layer, KV head) table (backends/head_budget_tables) each head keeps its
    own count of groups: a prompt within the fewest count is dense to the bit, a longer one differs
    from the uniform budget and counts each (layer, KV head)'s reads and skips exactly."""
    from backends.head_budgets import head_groups, read_weights
    make, tokenizer = smollm
    heads = SparseSettings(True, 256, 2, 16, 64, selector="centroids",
                           head_budget_weights=read_weights("smollm2-135m-instruct-per-head"))
    runner = make(heads)
    table = head_groups(heads, runner.config.num_layers, runner.config.num_kv_heads)
    assert table.fewest == 3 and len(table.per_layer) == runner.config.num_layers - 2
    short = tokenizer.encode("Where did the keeper record the weather?")
    assert len(short) + 6 <= table.fewest * 64
    dense_tokens, dense_logits, _ = greedy(make(SparseSettings()), short, 6)
    tokens, logits, _ = greedy(runner, short, 6)
    assert tokens == dense_tokens and np.array_equal(logits, dense_logits)
    prompt = tokenizer.encode(PASSAGE * 3 + "Where did the keeper record the weather?")
    _, uniform_logits, _ = greedy(make(SparseSettings(True, 256, 2, 16, 64, selector="centroids")), prompt, 4)
    tokens, logits, stats = greedy(runner, prompt, 4)
    assert np.isfinite(logits).all() and not np.array_equal(logits[1:], uniform_logits[1:])
    for i, (read, skipped) in enumerate(stats):
        n = len(prompt) + i + 1
        pages, groups = -(-n // 16), -(-n // 64)
        want = [0, 0]
        for counts in table.per_layer.values():
            for count in counts:
                dropped = max(0, groups - count) * 4
                want = [want[0] + pages - dropped, want[1] + dropped]
        assert (read, skipped) == tuple(want) and skipped > 0


# ---- 3. live server ----------------------------------------------------------------------------

def test_live_server_with_sparse_attention():
    sparse = {"enabled": True, "token_budget": 64, "dense_layers": 2, "sink_tokens": 16, "recent_tokens": 16}
    server = start_server(model_config(kv_cache={"page_size": 16, "num_pages": 256}, context_length=2048,
                                       threads=1, sparse_attention=sparse))
    try:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=300)
        reply = client.chat.completions.create(
            model=MODEL, temperature=0, max_tokens=16,
            messages=[{"role": "user", "content": PASSAGE * 2 + "Where did the keeper record the weather?"}])
        text = reply.choices[0].message.content
        assert text.strip() and reply.choices[0].finish_reason in ("stop", "length")
        prompt, completion = reply.usage.prompt_tokens, reply.usage.completion_tokens
        assert prompt > 150
        server.wait_idle()
        health = httpx.get(f"{server.url}/health", timeout=30).json()
        # Decode steps run the sampled tokens but the last: sequence lengths prompt+1 .. prompt+completion-1.
        read = skipped = 0
        for length in range(prompt + 1, prompt + completion):
            pages = -(-length // 16)
            read += min(pages, 4) * 3 * 28
            skipped += max(0, pages - 4) * 3 * 28
        snap = health["models"][MODEL]
        assert (snap["attention_pages_read_total"], snap["attention_pages_skipped_total"]) == (read, skipped)
        assert health["attention_sparsity_ratio"] == pytest.approx(skipped / (read + skipped))
        assert health["attention_sparsity_ratio"] > 0.5
        metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
        values = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                  if line.startswith("radixgate_attention_")}
        assert values["radixgate_attention_pages_read_total"] == read
        assert values["radixgate_attention_pages_skipped_total"] == skipped
        assert values["radixgate_attention_sparsity_ratio"] == pytest.approx(skipped / (read + skipped))
        assert server.engine.fatal_error is None
    finally:
        server.stop()
