"""Token ids -> streamed text: whole characters only, stop strings cut out.

Incremental decoding uses the prefix_offset/read_offset technique: each step decodes only the
few tokens since the last emitted character boundary (`ids[prefix:]`) and the part of them
already emitted (`ids[prefix:read]`); the difference is the new text. Decoding a window that
starts a little before the new token keeps tokenizers that drop a leading space at the start of
a decode (SentencePiece) and byte-level BPE (a character split over tokens) correct.
"""
from __future__ import annotations

from typing import Protocol

REPLACEMENT = "\ufffd"   # what a decoder writes for bytes that are not (yet) a whole character


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Feed generated token ids one at a time; get back text that is safe to send."""

    def __init__(self, tokenizer: Decoder, stop: list[str] | None = None, skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._stops = [s for s in dict.fromkeys(stop or []) if s]   # dedupe, drop empty strings
        self._max_hold = max((len(s) for s in self._stops), default=1) - 1
        self._ids: list[int] = []
        self._prefix = 0      # ids[_prefix:_read] is the already-decoded window before new tokens
        self._read = 0
        self._held = ""       # decoded text held back because it may begin a stop string
        self._out: list[str] = []
        self.stopped = False
        self.stop_reason: str | None = None   # the stop string that matched
        self.finished = False

    @property
    def text(self) -> str:
        """All text returned so far."""
        return "".join(self._out)

    @property
    def token_ids(self) -> list[int]:
        return self._ids

    def add_token(self, token_id: int) -> str:
        """Take one token; return the text that became safe to emit ("" if none or stopped)."""
        if self.stopped or self.finished:
            return ""
        self._ids.append(token_id)
        prefix_text = self._tok.decode(self._ids[self._prefix:self._read], self._skip)
        new_text = self._tok.decode(self._ids[self._prefix:], self._skip)
        # A trailing U+FFFD means the last token ended inside a multi-byte character: wait.
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT):
            return ""
        delta = new_text[len(prefix_text):]
        self._prefix, self._read = self._read, len(self._ids)
        return self._emit(self._held + delta, final=False)

    def finish(self) -> str:
        """End of generation: return everything still held back (stop strings still apply)."""
        if self.stopped or self.finished:
            return ""
        self.finished = True
        prefix_text = self._tok.decode(self._ids[self._prefix:self._read], self._skip)
        tail = self._tok.decode(self._ids[self._prefix:], self._skip)[len(prefix_text):]
        return self._emit(self._held + tail, final=True)

    def _emit(self, buf: str, final: bool) -> str:
        cut = self._find_stop(buf)
        if cut is not None:
            out, self._held = buf[:cut], ""
            self.stopped = True
        elif final or not self._stops:
            out, self._held = buf, ""
        else:
            keep = self._partial_stop_len(buf)
            out, self._held = buf[:len(buf) - keep], buf[len(buf) - keep:]
        if out:
            self._out.append(out)
        return out

    def _find_stop(self, buf: str) -> int | None:
        # The earliest match wins; emitted text never holds a stop prefix, so `buf` is enough.
        best = None
        for s in self._stops:
            i = buf.find(s)
            if i != -1 and (best is None or i < best):
                best, self.stop_reason = i, s
        return best

    def _partial_stop_len(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of some stop string."""
        for n in range(min(len(buf), self._max_hold), 0, -1):
            tail = buf[-n:]
            if any(s.startswith(tail) for s in self._stops):
                return n
        return 0
