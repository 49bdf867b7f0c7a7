"""Input limits (server.limits) on a request body before it is parsed and before anything is tokenised.

Parsing is where a body costs the event loop: json.loads and pydantic hold the interpreter for
their whole run, in a worker thread too, and 16 MiB of `[1,1,1,...]` takes them seconds. So the
body's shape is measured first, as it arrives: `JsonShape` counts nesting and values outside
strings with a few numpy passes per received piece (milliseconds for 16 MiB). A body within those
bounds parses in tens of milliseconds at worst; then `check_fields` checks the fields each API names
(messages, prompt characters, max_tokens, n, stop, logit_bias) and every breach is an APIError
naming the limit (413 for the body's size, 400 for the rest).
"""
from __future__ import annotations

import json
import re

import numpy as np

from gateway.config import RequestLimits
from gateway.errors import APIError

_QUOTE, _BACKSLASH = 0x22, 0x5C
# +1 opens a level, -1 closes one, 2 separates values; everything else is 0
_KIND = np.zeros(256, dtype=np.int8)
_KIND[[ord("["), ord("{")]] = 1
_KIND[[ord("]"), ord("}")]] = -1
_KIND[ord(",")] = 2
# Small pieces are counted with two regular expressions instead: numpy's per-call costs (a dozen calls
# per piece) were ~0.4 ms of a relayed 1-token request's ~2.5 ms in the gateway.
SMALL_PIECE_BYTES = 16 << 10
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(rb"[\[\]{}]")


def body_too_large(limit_bytes: int, size: int | None = None) -> APIError:
    told = f"{size} bytes" if size is not None else "more"
    return APIError(413, f"The request body is {told}; this server accepts at most {limit_bytes} bytes "
                         "(server.limits.max_body_bytes).", code="request_too_large")


class JsonShape:
    """Nesting depth and value count of a JSON text fed in pieces, counted outside strings.

    A quote opens or closes a string unless an odd run of backslashes precedes it; only whether the
    previous piece ended inside a string, and on an odd backslash run, carries over between pieces.
    (Text that is not JSON gets a meaningless shape here and is refused by the parser afterwards.)"""

    def __init__(self):
        self.in_string = False
        self.odd_backslashes = False      # the previous piece ended on an odd run of backslashes
        self.depth = 0
        self.max_depth = 0
        self.values = 0                   # separators + containers: array elements and object members

    def feed(self, piece: bytes) -> None:
        if len(piece) <= SMALL_PIECE_BYTES and not self.in_string and not self.odd_backslashes \
                and self._feed_small(piece):
            return
        if self.odd_backslashes:
            piece = b"\\" + piece          # only the run's parity matters
        if not piece:
            return
        data = np.frombuffer(piece, dtype=np.uint8)
        quotes = np.flatnonzero(data == _QUOTE)
        slashes = np.flatnonzero(data == _BACKSLASH)
        if quotes.size and slashes.size:
            quotes = quotes[_runs_before(quotes, slashes) % 2 == 0]
        self.odd_backslashes = _trailing_run(data, slashes) % 2 == 1
        kinds = _KIND[data]
        marks = np.flatnonzero(kinds)
        if marks.size:
            inside = (np.searchsorted(quotes, marks) + self.in_string) % 2 == 1
            marked = kinds[marks[~inside]]
            if marked.size:
                steps = np.where(marked == 2, 0, marked).astype(np.int64)
                levels = self.depth + np.cumsum(steps)
                self.max_depth = max(self.max_depth, int(levels.max()))
                self.depth = int(levels[-1])
                self.values += int(np.count_nonzero(marked == 2) + np.count_nonzero(marked == 1))
        self.in_string ^= bool(quotes.size % 2)

    def _feed_small(self, piece: bytes) -> bool:
        """feed() for a piece that starts and ends outside a string: whole strings removed, the
        rest counted. False (nothing counted) when a string is left open or a backslash stands
        outside strings: the general path handles those."""
        bare = _STRING.sub(b"", piece)
        if b'"' in bare or b"\\" in bare:
            return False
        depth, top = self.depth, self.max_depth
        for bracket in _BRACKET.findall(bare):
            depth += 1 if bracket in b"[{" else -1
            top = max(top, depth)
        self.depth, self.max_depth = depth, top
        self.values += bare.count(b",") + bare.count(b"[") + bare.count(b"{")
        return True

    def check(self, limits: RequestLimits) -> None:
        if self.max_depth > limits.max_json_depth:
            raise APIError(400, f"The request body nests {self.max_depth} or more levels deep; this server accepts at "
                                f"most {limits.max_json_depth} (server.limits.max_json_depth).", code="json_too_deep")
        if self.values > limits.max_json_values:
            raise APIError(400, f"The request body holds {self.values} or more values; this server accepts at most "
                                f"{limits.max_json_values} (server.limits.max_json_values).",
                           code="json_too_many_values")


def _runs_before(quotes: np.ndarray, slashes: np.ndarray) -> np.ndarray:
    """For each quote, the length of the run of backslashes right before it."""
    starts = np.ones(slashes.size, dtype=bool)
    starts[1:] = np.diff(slashes) != 1
    run_start = np.maximum.accumulate(np.where(starts, slashes, 0))
    at = np.minimum(np.searchsorted(slashes, quotes - 1), slashes.size - 1)
    return np.where(slashes[at] == quotes - 1, quotes - run_start[at], 0)


def _trailing_run(data: np.ndarray, slashes: np.ndarray) -> int:
    if not slashes.size or slashes[-1] != data.size - 1:
        return 0
    others = np.flatnonzero(data != _BACKSLASH)
    return data.size - 1 - int(others[-1]) if others.size else data.size


def parse_body(body: bytes):
    """The JSON of a body whose shape was checked; invalid JSON is a 400 as FastAPI words it."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as error:      # UnicodeDecodeError is a ValueError
        raise APIError(400, f"We could not parse the JSON body of your request: {error}") from None


# What each API surface calls the fields the limits apply to.
_SURFACES = {
    "/v1/chat/completions": {"messages": "messages", "text": ("messages", "tools"),
                             "max_tokens": ("max_tokens", "max_completion_tokens"), "stop": "stop", "n": True},
    "/v1/completions": {"messages": "prompt", "text": ("prompt",), "max_tokens": ("max_tokens",), "stop": "stop",
                        "n": True},
    "/v1/responses": {"messages": "input", "text": ("input", "instructions", "tools"),
                      "max_tokens": ("max_output_tokens",), "stop": None, "n": False},
    "/v1/messages": {"messages": "messages", "text": ("messages", "system", "tools"), "max_tokens": ("max_tokens",),
                     "stop": "stop_sequences", "n": False},
    "/v1/messages/count_tokens": {"messages": "messages", "text": ("messages", "system", "tools"), "max_tokens": (),
                                  "stop": None, "n": False},
}
# Bodies the gate parses and checks off the event loop: every surface above; the ones that generate
# (and so count against a caller's budget) are all but the token count.
PARSED_PATHS = frozenset(_SURFACES)
GENERATION_PATHS = PARSED_PATHS - {"/v1/messages/count_tokens"}


def _as_number(value) -> int | float | None:
    """What the request model will read as an integer: an int, and in its lax mode also a whole float
    (300.0) or a numeric string ("300"); None for anything it will refuse by type."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def check_fields(path: str, body, limits: RequestLimits) -> None:
    """The per-field limits of the API at `path` on a parsed body. Fields of the wrong type are left for
    the request model to refuse with its own message."""
    surface = _SURFACES[path]
    if not isinstance(body, dict):
        return
    field = surface["messages"]
    items = body.get(field)
    # a completions prompt that is one list of token ids is one prompt, not many
    if isinstance(items, list) and not (field == "prompt" and all(isinstance(i, int) for i in items)):
        _at_most(len(items), limits.max_messages, "max_messages", field, "entries", "array_above_max_length")
    chars = 0
    for name in surface["text"]:
        chars += _text_chars(body.get(name), limits.max_prompt_chars - chars)
        if chars > limits.max_prompt_chars:
            fields = ", ".join(surface["text"])
            raise APIError(400, f"The request's text ({fields}) has {chars} or more characters; this server accepts "
                                f"at most {limits.max_prompt_chars} (server.limits.max_prompt_chars).", param=name,
                           code="string_above_max_length")
    for name in surface["max_tokens"]:
        value = _as_number(body.get(name))
        if value is not None:
            _at_most(value, limits.max_tokens, "max_tokens", name, "tokens", "integer_above_max_value")
    if surface["n"]:
        n = _as_number(body.get("n"))
        if n is not None:
            _at_most(n, limits.max_n, "max_n", "n", "choices", "integer_above_max_value")
    stop = body.get(surface["stop"]) if surface["stop"] else None
    stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    _at_most(len(stops), limits.max_stop_sequences, "max_stop_sequences", surface["stop"], "stop sequences",
             "array_above_max_length")
    for item in stops:
        if isinstance(item, str):
            _at_most(len(item), limits.max_stop_chars, "max_stop_chars", surface["stop"],
                     "characters in a stop sequence", "string_above_max_length")
    bias = body.get("logit_bias") if surface["n"] else None
    if isinstance(bias, dict):
        _at_most(len(bias), limits.max_logit_bias_entries, "max_logit_bias_entries", "logit_bias", "entries",
                 "array_above_max_length")


def _at_most(value: int, limit: int, key: str, param: str, what: str, code: str) -> None:
    if value > limit:
        raise APIError(400, f"'{param}' has {value} {what}; this server accepts at most {limit} "
                            f"(server.limits.{key}).", param=param, code=code)


def _text_chars(value, budget: int) -> int:
    """Characters of every string inside `value`; stops counting once past `budget` (the walk is
    bounded by the body's value count either way)."""
    total, pending = 0, [value]
    while pending and total <= budget:
        item = pending.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return total
