"""The approximate prefix trees and the routing policies, against plain references."""
from __future__ import annotations

import random

from gateway.config import RoutingConfig
from gateway.services.prefix_router import CacheAware, PrefixTree, Replica, chat_key, text_key


def _longest_common(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _tree_chars(tree: PrefixTree) -> int:
    return sum(len(node.edge) for node in tree._nodes())


def test_match_agrees_with_a_plain_scan():
    rng = random.Random(7)
    tree, sent = PrefixTree(1 << 20), []
    for _ in range(300):
        base = rng.choice(sent) if sent and rng.random() < 0.7 else ""
        text = base[:rng.randint(0, len(base))] + "".join(rng.choice("abc") for _ in range(rng.randint(1, 12)))
        matched, whole = tree.match(text)
        assert matched == max((_longest_common(text, s) for s in sent), default=0)
        assert whole == max((len(s) for s in sent if text.startswith(s)), default=0)
        tree.insert(text)
        sent.append(text)
        assert tree.chars == _tree_chars(tree)


def test_eviction_keeps_the_bound_and_drops_the_oldest():
    tree = PrefixTree(100)
    for i in range(20):
        tree.insert(f"conversation {i:02d} " + "x" * 20)
    assert tree.chars <= 100 and tree.chars == _tree_chars(tree)
    assert tree.match("conversation 19 " + "x" * 20)[1] > 0          # the newest stays
    assert tree.match("conversation 00 " + "x" * 20)[1] == 0         # the oldest went


def _replicas(n: int) -> list[Replica]:
    return [Replica(f"w{i}", None, PrefixTree(1 << 20)) for i in range(n)]


def test_cache_aware_follows_the_conversation_unless_overloaded():
    cfg = RoutingConfig(balance_abs_threshold=4, balance_rel_threshold=1.5)
    policy, replicas = CacheAware(cfg), _replicas(2)
    messages = [{"role": "user", "content": "q1"}]
    first = policy.choose(chat_key(messages, []), replicas)
    first.tree.insert(chat_key(messages, []))
    messages += [{"role": "assistant", "content": "a very long answer " * 20}, {"role": "user", "content": "q2"}]
    key = chat_key(messages, [])
    assert policy.choose(key, replicas) is first           # a whole earlier prompt leads: the same replica
    other = next(r for r in replicas if r is not first)
    fresh = chat_key([{"role": "user", "content": "a new conversation about something else"}], [])
    assert policy.choose(fresh, replicas) is other          # no useful match: the emptier tree
    first.in_flight = 10                                    # 10 - 0 > 4 and 10 > 1.5 * 0: overloaded
    assert policy.choose(key, replicas) is other


def test_cache_aware_places_a_new_conversation_by_tree_size_unless_overloaded():
    """No useful match: the replica holding the least (SGLang's rule), even when it is the busier one
    within the thresholds; past them, the least loaded."""
    cfg = RoutingConfig(balance_abs_threshold=4, balance_rel_threshold=1.5)
    policy, (full, empty) = CacheAware(cfg), _replicas(2)
    full.tree.insert(chat_key([{"role": "user", "content": "an earlier conversation " * 10}], []))
    fresh = chat_key([{"role": "user", "content": "a new conversation about something else"}], [])
    empty.in_flight = 3                                     # busier, within 4 of the other
    assert policy.choose(fresh, [full, empty]) is empty
    empty.in_flight = 6                                     # 6 - 0 > 4 and 6 > 1.5 * 0: overloaded
    assert policy.choose(fresh, [full, empty]) is full


def test_keys():
    assert text_key([1, 2, 3]) == "\x01\x02\x03" and text_key(["ab", "cd"]) == "ab"
    a = chat_key([{"role": "user", "content": "hi"}], [])
    b = chat_key([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], [])
    assert b.startswith(a) and chat_key([{"role": "user", "content": "hi"}], ["f"]) != a
