"""Tool calls read out of a model's output, whole or as it streams, in the model's call format
(gateway/tools.py says which formats there are and how one is chosen): ids, arguments as JSON
strings, the text around the calls kept as content, malformed calls left as text."""
from __future__ import annotations

import json
import re
import uuid

from gateway.tools import ARGS, CLOSE, HERMES, OPEN, PYTHON_TAG, TOOL_CALLS, CallFormat


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _call_of(value, names) -> dict | None:
    """{"name", "arguments" (a JSON string)} from a decoded call object, or None if it is not a
    call of an offered function."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or value["name"] not in names:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        return {"name": value["name"], "arguments": arguments}
    return {"name": value["name"], "arguments": json.dumps(arguments)}


def _loads(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


_DECODER = json.JSONDecoder()

# What each format's parser answers about the text at a place where a call may begin (`block`):
#   None              the text so far may still become a call: hold it back (never when final);
#   (n, [calls...])   the first n characters are these calls;
#   (n, [])           the first n characters (n > 0) are not a call: they are content.
# `locate(buffer, at_start)` is where in the buffer a call may begin (len(buffer): nowhere); a
# partial marker at the end counts, so it is held back rather than sent as content. Deciding only
# from the text so far makes the streamed result equal the whole one, which is parsed the same way.


class _Hermes:
    @staticmethod
    def locate(buffer: str, at_start: bool) -> int:
        return _marker_at(buffer, OPEN)

    @staticmethod
    def block(text: str, names, final: bool):
        if not text.startswith(OPEN):                   # a partial marker at the end
            return (len(text), []) if final else None
        end = text.find(CLOSE, len(OPEN))
        if end < 0:                                     # an unclosed block that parses at the end is a call
            if not final:
                return None
            call = _call_of(_loads(text[len(OPEN):].strip()), names)
            return len(text), [call] if call else []
        call = _call_of(_loads(text[len(OPEN):end].strip()), names)
        return end + len(CLOSE), [call] if call else []


class _Llama3:
    """The reply is the call: a JSON object (or several, separated by ";") from its first
    character, or after <|python_tag|>. <|python_tag|> is a special token, so it is usually gone
    from the decoded text; text before it, if it is there, is content."""

    @staticmethod
    def locate(buffer: str, at_start: bool) -> int:
        if at_start:
            head = buffer.lstrip()
            if not head or head[0] == "{" or PYTHON_TAG.startswith(head[:len(PYTHON_TAG)]):
                return 0
        return _marker_at(buffer, PYTHON_TAG)

    @staticmethod
    def block(text: str, names, final: bool):
        body = text.lstrip()
        if body.startswith(PYTHON_TAG):
            body = body[len(PYTHON_TAG):]
        elif PYTHON_TAG.startswith(body):               # nothing yet, or a partial tag
            return (len(text), []) if final else None
        skip = len(text) - len(body)                    # what precedes the JSON
        calls, pos, want_object = [], 0, True
        while True:
            rest = body[pos:].lstrip()
            pos = len(body) - len(rest)
            if not rest:
                return (len(text), calls) if final else None
            if want_object:
                if rest[0] != "{":
                    return skip + pos or len(text), []
                try:
                    value, end = _DECODER.raw_decode(rest)
                except ValueError:                      # unfinished (or broken) JSON
                    return (len(text), []) if final else None
                call = _call_of(value, names)
                if call is None:
                    return skip + pos + end, []
                calls.append(call)
                pos, want_object = pos + end, False
            elif rest[0] == ";":
                pos, want_object = pos + 1, True
            elif rest[0] == "{":                        # one object per line, without ";"
                want_object = True
            else:                                       # text after the calls: the reply was not a call
                return skip + pos, []


_MISTRAL_NAME = re.compile(r"([A-Za-z_][\w.-]*)" + re.escape(ARGS))
_MISTRAL_NAME_SO_FAR = re.compile(r"[A-Za-z_][\w.-]*(\[(A(R(G(S)?)?)?)?)?")


class _Mistral:
    """[TOOL_CALLS] then a JSON list of calls (or one object), or name[ARGS]{arguments}. The
    marker is a control token, dropped from text decoded without special tokens, so a reply that
    starts with a JSON list of calls is read as calls too."""

    @staticmethod
    def locate(buffer: str, at_start: bool) -> int:
        if at_start:
            head = buffer.lstrip()
            if not head or head[0] == "[":
                return 0
        return _marker_at(buffer, TOOL_CALLS)

    @staticmethod
    def block(text: str, names, final: bool):
        body = text.lstrip()
        if body.startswith(TOOL_CALLS):
            payload, marked = body[len(TOOL_CALLS):], True
        elif TOOL_CALLS.startswith(body):               # nothing yet, or a partial marker
            return (len(text), []) if final else None
        elif re.match(r"\[\s*(\{|$)", body):            # a bare list at the start of the reply
            payload, marked = body, False
        else:                                           # "[" that begins neither: content
            return len(text) - len(body) + 1, []
        p = payload.lstrip()
        skip = len(text) - len(p)
        if not p:
            return (len(text), []) if final else None
        if p[0] in "[{":
            try:
                value, end = _DECODER.raw_decode(p)
            except ValueError:
                return (len(text), []) if final else None
            items = value if isinstance(value, list) else [value]
            calls = [_call_of(item, names) for item in items]
            return skip + end, calls if items and all(calls) else []
        if marked:
            named = _MISTRAL_NAME.match(p)
            if named:
                try:
                    value, end = _DECODER.raw_decode(p[named.end():])
                except ValueError:
                    return (len(text), []) if final else None
                call = _call_of({"name": named.group(1), "arguments": value}, names)
                return skip + named.end() + end, [call] if call else []
            if not final and _MISTRAL_NAME_SO_FAR.fullmatch(p):
                return None
        return len(text) - len(payload), []             # the marker alone is content


_PARSERS = {"hermes": _Hermes, "llama3": _Llama3, "mistral": _Mistral}


def _marker_at(buffer: str, marker: str) -> int:
    start = buffer.find(marker)
    return start if start >= 0 else len(buffer) - _partial_suffix(buffer, marker)


class ToolCallStream:
    """Splits streamed text into content and whole calls, in the model's call format (`fmt`, else
    the one `names` carries, else hermes): text that may begin a call is held back until it does
    or cannot; a call is emitted once it is complete (or the output ends)."""

    def __init__(self, names, fmt: CallFormat | None = None):
        self.names = names
        self.format = fmt or getattr(names, "format", HERMES)
        self._parser = _PARSERS[self.format.name]
        self.buffer = ""
        self.calls: list[dict] = []
        self._begun = False           # something left already: no longer at the start of the reply

    def feed(self, text: str) -> tuple[str, list[dict]]:
        """(content safe to send now, calls completed by this text)."""
        self.buffer += text
        return self._drain(final=False)

    def finish(self) -> tuple[str, list[dict]]:
        """What is left when the output ends: an unfinished call that parses is a call."""
        content, calls = self._drain(final=True)
        rest, self.buffer = self.buffer, ""
        return content + rest, calls

    def _drain(self, final: bool) -> tuple[str, list[dict]]:
        content, done = "", []
        while self.buffer:
            start = self._parser.locate(self.buffer, not self._begun)
            if start:
                content, self.buffer, self._begun = content + self.buffer[:start], self.buffer[start:], True
            if not self.buffer:
                break
            got = self._parser.block(self.buffer, self.names, final)
            if got is None:
                break
            n, calls = got
            if calls:
                done += calls
                self.calls += calls
                self.buffer = self.buffer[n:].lstrip()
            else:
                content, self.buffer = content + self.buffer[:n], self.buffer[n:]
            self._begun = True
        return content, done


def parse_tool_calls(text: str, names, fmt: CallFormat | None = None) -> tuple[str, list[dict]]:
    """(the text outside calls, the calls) from a whole output, in the model's format (as for
    ToolCallStream); text that does not parse as calls of offered functions stays text."""
    stream = ToolCallStream(names, fmt)
    content, calls = stream.feed(text)
    rest, more = stream.finish()
    calls += more
    return ((content + rest).strip() if calls else text), calls


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper start of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
