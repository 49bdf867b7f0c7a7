"""Cache-aware choice of a replica, as SGLang's router does it: an approximate radix tree per replica
of the prompt prefixes sent there; the longest match wins unless that replica is overloaded.

The trees hold text (characters), not token ids: a replica may be any OpenAI-compatible server with
its own tokenizer, which the gateway does not have, and a conversation's later prompts repeat its
earlier ones character for character, so a text prefix stands for the cached token prefix.
"""
from __future__ import annotations

import heapq
import itertools
import random
import time
from dataclasses import dataclass, field

from gateway.config import RoutingConfig


class _Node:
    __slots__ = ("edge", "children", "parent", "last_used", "ends_key")

    def __init__(self, edge: str, parent: _Node | None):
        self.edge, self.parent = edge, parent
        self.ends_key = False            # a whole earlier prompt ends here
        self.children: dict[str, _Node] = {}
        self.last_used = time.monotonic()


def _common_length(edge: str, text: str, at: int) -> int:
    if text.startswith(edge, at):
        return len(edge)
    lo, hi = 0, min(len(edge), len(text) - at)          # the longest k with edge[:k] == text[at:at+k]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if text.startswith(edge[:mid], at):
            lo = mid
        else:
            hi = mid - 1
    return lo


class PrefixTree:
    """The prefixes one replica has been sent (approximately what its cache holds); LRU-bounded."""

    def __init__(self, max_chars: int):
        self.root = _Node("", None)
        self.max_chars = max_chars
        self.chars = 0

    def match(self, text: str) -> tuple[int, int]:
        """(characters of `text` found in the tree, length of the longest earlier prompt that is a
        prefix of `text`: a conversation going on), touching what matched."""
        node, at, whole, now = self.root, 0, 0, time.monotonic()
        while at < len(text):
            child = node.children.get(text[at])
            if child is None:
                break
            n = _common_length(child.edge, text, at)
            at += n
            child.last_used = now
            if n < len(child.edge):
                break
            node = child
            if node.ends_key:
                whole = at
        return at, whole

    def insert(self, text: str) -> None:
        node, at, now = self.root, 0, time.monotonic()
        while at < len(text):
            child = node.children.get(text[at])
            if child is None:
                leaf = _Node(text[at:], node)
                node.children[text[at]] = leaf
                node = leaf
                self.chars += len(text) - at
                break
            n = _common_length(child.edge, text, at)
            if n < len(child.edge):                     # split the edge where the texts part
                middle = _Node(child.edge[:n], node)
                node.children[text[at]] = middle
                child.edge, child.parent = child.edge[n:], middle
                middle.children[child.edge[0]] = child
                child = middle
            child.last_used = now
            node, at = child, at + n
        node.ends_key = node is not self.root
        if self.chars > self.max_chars:
            self.evict(self.chars - self.max_chars)
        assert self.chars >= 0

    def evict(self, chars: int) -> None:
        """Drop least recently used leaves until `chars` characters are gone."""
        leaves = [(n.last_used, id(n), n) for n in self._nodes() if not n.children and n is not self.root]
        heapq.heapify(leaves)
        while chars > 0 and leaves:
            _, _, leaf = heapq.heappop(leaves)
            parent = leaf.parent
            del parent.children[leaf.edge[0]]
            self.chars -= len(leaf.edge)
            chars -= len(leaf.edge)
            if parent is not self.root and not parent.children:
                heapq.heappush(leaves, (parent.last_used, id(parent), parent))

    def clear(self) -> None:
        self.root, self.chars = _Node("", None), 0

    def _nodes(self):
        stack = [self.root]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())


@dataclass(eq=False)
class Replica:
    """One member of a replicated model as the router sees it."""

    name: str
    service: object
    tree: PrefixTree
    in_flight: int = 0
    healthy: bool = True
    cooldown_until: float = 0.0
    failures: list[float] = field(default_factory=list)

    def available(self, now: float) -> bool:
        return self.healthy and now >= self.cooldown_until


class CacheAware:
    """The replica holding the longest prefix, unless its load exceeds the least-loaded one's by the
    thresholds (then the least loaded). A prefix counts when a whole earlier prompt leads this one
    (the conversation goes on: however long the last answer, its history is there) or when it
    covers more than cache_threshold of the prompt (SGLang's rule). Without one, SGLang's choice
    for a new prefix: the replica whose tree is smallest (the most cache to spare, so new
    conversations spread by what the replicas hold, not by who happens to be idle this instant),
    under the same overload rule."""

    def __init__(self, cfg: RoutingConfig):
        self.cfg = cfg

    def choose(self, key: str, candidates: list[Replica]) -> Replica:
        idlest = min(candidates, key=lambda r: (r.in_flight, r.tree.chars))
        floor = self.cfg.cache_threshold * len(key)
        scored = []
        for replica in candidates:
            matched, whole = replica.tree.match(key)
            scored.append((matched if whole or matched > floor else 0, replica))
        matched, best = max(scored, key=lambda pair: pair[0])
        if not matched:
            best = min(candidates, key=lambda r: (r.tree.chars, r.in_flight))
        if self._overloaded(best, idlest):
            return idlest
        return best

    def _overloaded(self, replica: Replica, idlest: Replica) -> bool:
        lo, hi = idlest.in_flight, replica.in_flight
        return hi - lo > self.cfg.balance_abs_threshold and hi > self.cfg.balance_rel_threshold * lo


class RoundRobin:
    def __init__(self, cfg: RoutingConfig):
        self.counter = itertools.count()

    def choose(self, key: str, candidates: list[Replica]) -> Replica:
        return candidates[next(self.counter) % len(candidates)]


class RandomChoice:
    """LiteLLM's default (simple-shuffle) with equal weights."""

    def __init__(self, cfg: RoutingConfig):
        self.rng = random.Random()

    def choose(self, key: str, candidates: list[Replica]) -> Replica:
        return self.rng.choice(candidates)


class LeastLoaded:
    def __init__(self, cfg: RoutingConfig):
        pass

    def choose(self, key: str, candidates: list[Replica]) -> Replica:
        return min(candidates, key=lambda r: r.in_flight)


POLICIES = {"cache_aware": CacheAware, "round_robin": RoundRobin, "random": RandomChoice,
            "least_loaded": LeastLoaded}


def chat_key(messages: list[dict], tool_names: list[str]) -> str:
    """The text a chat's prompt grows from: tool names, then each message's role and text."""
    parts = [",".join(tool_names), "\x1e"] if tool_names else []
    for message in messages:
        content = message.get("content")
        if not isinstance(content, str):
            content = "".join(p.get("text", "") for p in content or [] if isinstance(p, dict))
        parts += [message.get("role", ""), "\x1f", content]
        for call in message.get("tool_calls") or []:
            parts += ["\x1d", str(call.get("function", call))]
        parts.append("\x1e")
    return "".join(parts)


def text_key(prompt) -> str:
    """A completion prompt as text; token ids map one to one onto characters."""
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        prompt = prompt[0]                           # several prompts: route by the first
    if isinstance(prompt, str):
        return prompt
    return "".join(chr(t % 0x110000) for t in prompt)
