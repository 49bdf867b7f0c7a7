"""Token ids -> streamed text: whole characters only, stop strings cut out.

The reference method is prefix_offset/read_offset: each step decodes the few tokens since the
last emitted character boundary (`ids[prefix:]`) and the part of them already emitted
(`ids[prefix:read]`); the difference is the new text, held back while it ends in U+FFFD (a
character split over tokens). Decoding a window that starts a little before the new token keeps
tokenizers that drop a leading space at the start of a decode (SentencePiece) correct.

Two cheaper forms give exactly the same text:

* Any tokenizer: `decode(ids[prefix:read])` only changes when a chunk is emitted, so it is kept
  from step to step instead of decoded again (one decode per token that emits nothing).
* Byte-level BPE (`tokenizers.decoders.ByteLevel`: GPT-2, Llama 3, Qwen, SmolLM2...): decoding
  maps each token to its bytes and decodes their concatenation as UTF-8 with U+FFFD for bad
  bytes. A lossy UTF-8 decode that has just produced a valid character (not U+FFFD) is back in
  its initial state, so `decode(P + T) == decode(P) + decode(T)` whenever `decode(P)` ends in
  such a character. Every emit point ends in one (emitted text never ends in U+FFFD), and the
  window starts at the previous emit point, so by induction `new_text == prefix_text +
  lossy(bytes of ids[read:])`: the reference step reduces to "decode the pending bytes; emit
  them unless empty or ending in U+FFFD". The bytes of every token are tabulated once per
  tokenizer (and checked against the tokenizer's own decode of each id), and the pending bytes
  are decoded by Python's UTF-8 decoder, which substitutes U+FFFD for maximal subparts exactly as
  Rust's `String::from_utf8_lossy` does: no call into the tokenizer per token at all.

Stop strings: text in which no character is the first character of a stop string can neither
contain one nor end with the start of one, so it is emitted without the two searches.
"""
from __future__ import annotations

import re
import threading
import weakref
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
        # Where a stop string can begin: one of their first characters.
        self._first_re = re.compile("[" + "".join(re.escape(s[0]) for s in self._stops) + "]" if self._stops
                                    else "(?!)")
        self._ids: list[int] = []
        self._held = ""       # decoded text held back because it may begin a stop string
        self._out: list[str] = []
        self.stopped = False
        self.stop_reason: str | None = None   # the stop string that matched
        self.finished = False
        # Byte-level fast path: the bytes of each token id, and those of ids[read:] not yet emitted.
        self._table = byte_level_table(tokenizer, skip_special_tokens)
        self._pending = b""
        # Any other tokenizer: ids[_prefix:_read] is the already-decoded window before new tokens,
        # and _prefix_text its decode (None: not decoded yet).
        self._decode = _fast_decode(tokenizer)
        self._prefix = 0
        self._read = 0
        self._prefix_text: str | None = None

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
        table = self._table
        if table is None:
            return self._add_decoded()
        if 0 <= token_id < len(table):
            self._pending += table[token_id]
        elif not 0 <= token_id < 1 << 32:        # not a u32: the tokenizer's decode raises this
            raise OverflowError(f"token id {token_id} out of range")
        # (any other id past the vocabulary decodes to nothing, as in the tokenizer)
        if not self._pending:
            return ""
        delta = self._pending.decode("utf-8", "replace")
        # A trailing U+FFFD means the last token ended inside a multi-byte character: wait.
        if delta[-1] == REPLACEMENT:
            return ""
        self._pending = b""
        if not self._stops:                      # _emit without stop strings, inlined
            self._out.append(delta)
            return delta
        return self._emit(self._held + delta, final=False)

    def _add_decoded(self) -> str:
        decode, skip = self._decode, self._skip
        prefix_text = self._prefix_text
        if prefix_text is None:
            prefix_text = self._prefix_text = decode(self._ids[self._prefix:self._read], skip)
        new_text = decode(self._ids[self._prefix:], skip)
        # A trailing U+FFFD means the last token ended inside a multi-byte character: wait.
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT):
            return ""
        delta = new_text[len(prefix_text):]
        self._prefix, self._read = self._read, len(self._ids)
        self._prefix_text = None
        if not self._stops:                      # _emit without stop strings, inlined
            self._out.append(delta)
            return delta
        return self._emit(self._held + delta, final=False)

    def finish(self) -> str:
        """End of generation: return everything still held back (stop strings still apply)."""
        if self.stopped or self.finished:
            return ""
        self.finished = True
        if self._table is not None:
            tail = self._pending.decode("utf-8", "replace")
            self._pending = b""
        else:
            prefix_text = self._prefix_text
            if prefix_text is None:
                prefix_text = self._decode(self._ids[self._prefix:self._read], self._skip)
            tail = self._decode(self._ids[self._prefix:], self._skip)[len(prefix_text):]
        return self._emit(self._held + tail, final=True)

    def _emit(self, buf: str, final: bool) -> str:
        if self._first_re.search(buf) is None:
            # No stop string can begin anywhere in buf: nothing to cut and nothing to hold back.
            if buf:
                self._out.append(buf)
            self._held = ""
            return buf
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
        # The suffixes buf[-n:] for n = min(len(buf), max_hold) .. 1, longest first, skipping
        # those whose first character begins no stop string.
        search = self._first_re.search
        m = search(buf, max(len(buf) - self._max_hold, 0))
        while m is not None:
            tail = buf[m.start():]
            if any(s.startswith(tail) for s in self._stops):
                return len(tail)
            m = search(buf, m.start() + 1)
        return 0


# ---- the tokenizers behind a Decoder -------------------------------------------------------

def _rust_tokenizer(tokenizer):
    """The `tokenizers.Tokenizer` whose decode `tokenizer.decode` is exactly, if there is one."""
    try:
        from tokenizers import Tokenizer
    except ImportError:     # pragma: no cover - a dependency of the server
        return None
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    from gateway.templating import ChatTokenizer
    if isinstance(tokenizer, ChatTokenizer) and type(tokenizer).decode is ChatTokenizer.decode:
        backend = getattr(tokenizer, "_backend", None)
        if isinstance(backend, Tokenizer):
            return backend
    return None


def _fast_decode(tokenizer):
    """`tokenizer.decode` without wrappers in between (ChatTokenizer.decode only copies the ids)."""
    rust = _rust_tokenizer(tokenizer)
    return tokenizer.decode if rust is None else rust.decode     # decode(ids, skip_special_tokens)


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> character map of byte-level BPE (GPT-2; tokenizers' `bytes_char`)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


# str.translate table: a byte-level character -> the latin-1 character of its byte; any other
# character below 256 -> U+FFFF, so that encoding to latin-1 fails for every token that is not
# made of byte-level characters only (the decoder takes such a token's own UTF-8 bytes).
_TO_LATIN1 = {i: "\uffff" for i in range(256)}
_TO_LATIN1.update({ord(c): chr(b) for b, c in _bytes_to_unicode().items()})

_tables: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_tables_lock = threading.Lock()


def byte_level_table(tokenizer, skip_special_tokens: bool) -> list[bytes] | None:
    """The bytes each token id decodes to (b"" for skipped ids), when decoding a sequence of ids
    is exactly the lossy UTF-8 decode of their concatenated bytes; None for other tokenizers."""
    rust = _rust_tokenizer(tokenizer)
    if rust is None:
        return None
    with _tables_lock:
        try:
            tables = _tables[rust]
        except KeyError:
            tables = _tables[rust] = _build_tables(rust)
    return None if tables is None else tables[skip_special_tokens]


def _build_tables(rust) -> dict[bool, list[bytes]] | None:
    """Per-id bytes with special tokens kept / skipped, from the same token strings and the same
    byte map the ByteLevel decoder uses; every entry is checked against the tokenizer's decode of
    that id alone, and anything unexpected leaves the tokenizer on the general path (None)."""
    from tokenizers.decoders import ByteLevel
    if not isinstance(rust.decoder, ByteLevel):
        return None
    n = max(rust.get_vocab(with_added_tokens=True).values(), default=-1) + 1
    keep: list[bytes] = []
    for i in range(n):
        token = rust.id_to_token(i)
        if token is None:
            keep.append(b"")
            continue
        try:
            keep.append(token.translate(_TO_LATIN1).encode("latin-1"))
        except UnicodeEncodeError:
            keep.append(token.encode("utf-8"))
    # Added tokens are the only ids whose decoding string could differ from id_to_token (their
    # normalized form); their text is checked below, which proves their bytes when those are
    # valid UTF-8 (lossy decoding is then one-to-one).
    for i in rust.get_added_tokens_decoder():
        if 0 <= i < n:
            try:
                keep[i].decode("utf-8")
            except UnicodeDecodeError:
                return None
    singles = [[i] for i in range(n)]
    full = rust.decode_batch(singles, skip_special_tokens=False)
    if any(b.decode("utf-8", "replace") != s for b, s in zip(keep, full, strict=True)):
        return None
    # Decoding one id gives its whole text or, when skipped as special, nothing.
    shown = rust.decode_batch(singles, skip_special_tokens=True)
    skip = [b if s else b"" for b, s in zip(keep, shown, strict=True)]
    if any(b.decode("utf-8", "replace") != s for b, s in zip(skip, shown, strict=True)):
        return None
    return {False: keep, True: skip}
