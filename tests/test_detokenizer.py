"""Incremental detokenization with the real SmolLM2 tokenizer (byte-level BPE)."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends.source import resolve_source
from gateway.detokenizer import IncrementalDetokenizer
from gateway.templating import load_tokenizer

TOK = load_tokenizer(resolve_source("packaged:smollm2-135m-instruct"))
# Tokens that are a piece of a multi-byte character on their own: the hard cases.
PARTIAL = [i for i in range(TOK.vocab_size) if "\ufffd" in TOK.decode([i])]
MULTIBYTE = "Hello 你好世界 😀🎉 naïve café 👩‍👩‍👧 ok Ελληνικά 日本語のテキスト"


def stream(ids, stop=(), skip=True):
    d = IncrementalDetokenizer(TOK, list(stop), skip_special_tokens=skip)
    chunks = [d.add_token(i) for i in ids]
    chunks.append(d.finish())
    return d, chunks


def test_vocab_has_partial_tokens():
    assert len(PARTIAL) > 100


def test_multibyte_split_across_tokens():
    ids = TOK.encode(MULTIBYTE)
    assert any(i in PARTIAL for i in ids)          # the text really splits characters
    d, chunks = stream(ids)
    assert all("\ufffd" not in c for c in chunks)
    assert "".join(chunks) == d.text == TOK.decode(ids) == MULTIBYTE
    assert chunks[-1] == ""                        # nothing was left to flush


def test_text_emitted_as_soon_as_characters_complete():
    ids = TOK.encode("ab 😀")
    d = IncrementalDetokenizer(TOK, [])
    seen = []
    for i in ids:
        seen.append(d.add_token(i))
    assert "".join(seen) == "ab 😀" and seen[-1].endswith("😀")


def test_special_tokens_skipped():
    ids = [1, *TOK.encode("hi there"), 2]
    assert "".join(stream(ids)[1]) == "hi there"
    assert "".join(stream(ids, skip=False)[1]) == "<|im_start|>hi there<|im_end|>"


def test_stop_string_spanning_tokens():
    ids = TOK.encode("The quick brown fox jumps over")
    d, chunks = stream(ids, stop=["brown fox"])
    assert d.stopped and d.stop_reason == "brown fox"
    assert "".join(chunks) == d.text == "The quick "
    assert d.add_token(ids[0]) == "" and d.finish() == ""


def test_stop_at_very_start():
    ids = TOK.encode("Stop right there")
    d = IncrementalDetokenizer(TOK, ["Stop"])
    assert d.add_token(ids[0]) == "" and d.stopped
    assert d.text == "" and d.finish() == ""


def test_several_stop_strings_first_one_wins():
    ids = TOK.encode("alpha beta gamma delta")
    d, _ = stream(ids, stop=["delta", "gamma", "zzz"])
    assert d.text == "alpha beta " and d.stop_reason == "gamma"


def test_stop_string_inside_a_token_and_multibyte_stop():
    d, _ = stream(TOK.encode("hello world"), stop=["llo w"])
    assert d.text == "he"
    d, _ = stream(TOK.encode("price: 5€ total"), stop=["€"])
    assert d.text == "price: 5"


def test_hold_back_until_clear_then_released():
    d = IncrementalDetokenizer(TOK, ["END OF"])
    out = "".join(d.add_token(i) for i in TOK.encode("the END"))
    assert out == "the " and not d.stopped          # " END" might become "END OF"
    assert d.finish() == "END" and d.text == "the END"
    d = IncrementalDetokenizer(TOK, ["END OF"])
    out = "".join(d.add_token(i) for i in TOK.encode("the END is near"))
    assert out == "the END is near"                # released once it cannot match


def test_empty_and_duplicate_stops_ignored():
    ids = TOK.encode("abc abc")
    assert stream(ids, stop=["", ""])[0].text == "abc abc"
    assert stream(ids, stop=["c a", "c a"])[0].text == "ab"


def test_decode_window_stays_small():
    calls = []

    class Counting:
        def decode(self, ids, skip_special_tokens=True):
            calls.append(len(ids))
            return TOK.decode(ids, skip_special_tokens)

    ids = TOK.encode(MULTIBYTE * 20)
    d = IncrementalDetokenizer(Counting(), ["never-there"])
    for i in ids:
        d.add_token(i)
    d.finish()
    assert d.text == MULTIBYTE * 20
    assert max(calls) <= 8                         # never the whole output (len(ids) > 500)


token_ids = st.lists(st.one_of(st.integers(0, TOK.vocab_size - 1), st.sampled_from(PARTIAL)),
                     max_size=40)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(token_ids)
def test_random_tokens_never_retract_and_concatenate(ids):
    full = TOK.decode(ids)
    d = IncrementalDetokenizer(TOK, [])
    for i in ids:
        d.add_token(i)
        assert full.startswith(d.text)            # nothing emitted is ever wrong (no broken char)
    d.finish()
    assert d.text == full


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(token_ids, st.data())
def test_random_tokens_with_stop(ids, data):
    full = TOK.decode(ids)
    if full:
        a = data.draw(st.integers(0, len(full) - 1))
        stop = full[a:a + data.draw(st.integers(1, 6))]
    else:
        stop = "x"
    d, chunks = stream(ids, stop=[stop])
    at = full.find(stop)
    assert d.text == "".join(chunks) == (full[:at] if at >= 0 else full)
    assert d.stopped == (at >= 0)


@pytest.mark.parametrize("text", ["日本語", "😀", "a\u0301", "\n\n", "    code"])
def test_round_trip_small(text):
    ids = TOK.encode(text)
    assert "".join(stream(ids)[1]) == text


# ---- the fast paths give exactly the reference method's output ------------------------------

class _Reference:
    """The original prefix_offset/read_offset detokenizer (two decodes per token), kept verbatim
    as the oracle: gateway.detokenizer must emit exactly what this emits."""

    def __init__(self, tokenizer, stop=None, skip_special_tokens=True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._stops = [s for s in dict.fromkeys(stop or []) if s]
        self._max_hold = max((len(s) for s in self._stops), default=1) - 1
        self._ids = []
        self._prefix = 0
        self._read = 0
        self._held = ""
        self._out = []
        self.stopped = False
        self.stop_reason = None
        self.finished = False

    @property
    def text(self):
        return "".join(self._out)

    def add_token(self, token_id):
        if self.stopped or self.finished:
            return ""
        self._ids.append(token_id)
        prefix_text = self._tok.decode(self._ids[self._prefix:self._read], self._skip)
        new_text = self._tok.decode(self._ids[self._prefix:], self._skip)
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        delta = new_text[len(prefix_text):]
        self._prefix, self._read = self._read, len(self._ids)
        return self._emit(self._held + delta, final=False)

    def finish(self):
        if self.stopped or self.finished:
            return ""
        self.finished = True
        prefix_text = self._tok.decode(self._ids[self._prefix:self._read], self._skip)
        tail = self._tok.decode(self._ids[self._prefix:], self._skip)[len(prefix_text):]
        return self._emit(self._held + tail, final=True)

    def _emit(self, buf, final):
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

    def _find_stop(self, buf):
        best = None
        for s in self._stops:
            i = buf.find(s)
            if i != -1 and (best is None or i < best):
                best, self.stop_reason = i, s
        return best

    def _partial_stop_len(self, buf):
        for n in range(min(len(buf), self._max_hold), 0, -1):
            tail = buf[-n:]
            if any(s.startswith(tail) for s in self._stops):
                return n
        return 0


def _run(det, ids, extra):
    """Everything observable: each chunk, finish(), state after it, and that it then stays put."""
    chunks = [(det.add_token(i), det.stopped, det.stop_reason) for i in ids]
    chunks.append((det.finish(), det.stopped, det.stop_reason))
    chunks.append((det.add_token(extra), det.finish(), det.text, det.stopped, det.stop_reason, det.finished))
    return chunks


def assert_same(tok, ids, stop=(), skip=True):
    new = _run(IncrementalDetokenizer(tok, list(stop), skip_special_tokens=skip), ids, 5)
    old = _run(_Reference(tok, list(stop), skip_special_tokens=skip), ids, 5)
    assert new == old, (ids, stop, skip)
    return new


SPECIAL = sorted(TOK._backend.get_added_tokens_decoder())            # ids 0..16 of SmolLM2


def _all_bytes_tokenizer():
    """A byte-level tokenizer whose id b is the single byte b (SmolLM2 lacks 21 of the 256): any
    byte string reaches Rust's decoder, and so its String::from_utf8_lossy, as ids."""
    from tokenizers import Tokenizer, decoders, models

    from gateway.detokenizer import _bytes_to_unicode
    tok = Tokenizer(models.WordLevel({c: b for b, c in _bytes_to_unicode().items()}, unk_token="!"))
    tok.decoder = decoders.ByteLevel()
    return tok


BYTES_TOK = _all_bytes_tokenizer()


def test_fast_path_is_used_for_the_byte_level_tokenizer():
    from gateway.detokenizer import byte_level_table
    for skip in (True, False):
        table = byte_level_table(TOK, skip)
        assert table is not None and len(table) == TOK.vocab_size
        assert all(table[i].decode("utf-8", "replace") == TOK.decode([i], skip) for i in range(TOK.vocab_size))
    assert byte_level_table(TOK, True)[1] == b"" and byte_level_table(TOK, False)[1] == b"<|im_start|>"
    assert byte_level_table(BYTES_TOK, True) == [bytes([b]) for b in range(256)]


def test_python_lossy_utf8_equals_rust_from_utf8_lossy():
    """The fast path decodes bytes with Python's 'replace' handler; the tokenizer uses Rust's
    String::from_utf8_lossy. Both substitute U+FFFD per maximal subpart: check all 1- and 2-byte
    strings, 3- and 4-byte strings over the bytes where UTF-8's rules change, and random ones."""
    import itertools
    import random
    edges = [0x00, 0x41, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xC1, 0xC2, 0xDF, 0xE0, 0xE1,
             0xEC, 0xED, 0xEE, 0xEF, 0xF0, 0xF1, 0xF3, 0xF4, 0xF5, 0xFF]
    cases = [bytes([a]) for a in range(256)] + [bytes([a, b]) for a in range(256) for b in range(256)]
    cases += [bytes(c) for c in itertools.product(edges, repeat=3)]
    cases += [bytes(c) for c in itertools.product(edges[3:], repeat=4)]
    rng = random.Random(7)
    pool = [*edges, *range(0x80, 0xC0, 7), *b"a\n "]
    cases += [bytes(rng.choice(pool) for _ in range(rng.randint(1, 12))) for _ in range(20000)]
    rust = BYTES_TOK.decode_batch([list(c) for c in cases], skip_special_tokens=False)
    for case, text in zip(cases, rust, strict=True):
        assert case.decode("utf-8", "replace") == text, case


TEXTS = [MULTIBYTE, "日本語のテキストと中文字符，한국어 텍스트", "emoji 😀🎉👩‍👩‍👧🏳️‍🌈 flags 🇯🇵🇫🇷",
         "def f(x):\n    return x ** 2  # ünïcödé\n", "a\u0301e\u0301 \u200b zero-width", "€£¥ 1,234.56 ½ ≠ ∞"]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("skip", [True, False])
def test_same_as_reference_on_real_text(text, skip):
    ids = [1, *TOK.encode(text), 2]
    chunks = assert_same(TOK, ids, skip=skip)
    assert "".join(c[0] for c in chunks[:-1]) == TOK.decode(ids, skip)
    full = TOK.decode(ids, skip)
    for n in (1, 2, 3, 5, 8):                          # stops of several lengths, from the text
        for at in range(0, len(full) - n + 1, max(1, len(full) // 7)):
            assert_same(TOK, ids, stop=[full[at:at + n]], skip=skip)
    assert_same(TOK, ids, stop=["\ufffd", "zz", full[-3:]], skip=skip)


@pytest.mark.parametrize("skip", [True, False])
def test_same_as_reference_on_random_ids(skip):
    import random
    rng = random.Random(1234 + skip)
    pieces = [*PARTIAL, *SPECIAL]
    for _ in range(1500):
        ids = []
        for _ in range(rng.randint(0, 30)):
            r = rng.random()
            if r < 0.35:
                ids.append(rng.choice(PARTIAL))
            elif r < 0.45:
                ids.append(rng.choice(SPECIAL))
            elif r < 0.5:
                ids.extend(TOK.encode(rng.choice(["😀", "你", "é", "€", "\ufffd", "👩‍👧"])))
            elif r < 0.52:
                ids.append(rng.randint(TOK.vocab_size, TOK.vocab_size + 50))   # decodes to nothing
            elif r < 0.6:
                ids.append(rng.choice(pieces))
            else:
                ids.append(rng.randrange(TOK.vocab_size))
        full = TOK.decode(ids, skip)
        stops = []
        for _ in range(rng.randint(0, 3)):
            if full and rng.random() < 0.8:
                a = rng.randrange(len(full))
                stops.append(full[a:a + rng.randint(1, 10)])
            else:
                stops.append(rng.choice(["\ufffd", "the", "😀", "<|im_end|>", " ", "a-z", "]", "^", "\\", "[", ".*"]))
        assert_same(TOK, ids, stop=stops, skip=skip)


def test_same_as_reference_on_random_bytes():
    """Every byte string, valid UTF-8 or not, one byte per token."""
    import random
    rng = random.Random(5)
    pool = [*range(0x80, 0xC0, 5), *range(0xC0, 0x100), *b"ab \n"]
    for _ in range(2000):
        ids = [rng.choice(pool) for _ in range(rng.randint(0, 24))]
        ids += list(rng.choice(["😀", "你好", "é", "\ufffd"]).encode()) if rng.random() < 0.5 else []
        full = BYTES_TOK.decode(ids)
        stops = [full[a:a + rng.randint(1, 4)] for a in rng.sample(range(len(full)), min(2, len(full)))]
        assert_same(BYTES_TOK, ids, stop=stops, skip=rng.random() < 0.5)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.integers(0, TOK.vocab_size + 3), st.sampled_from(PARTIAL),
                          st.sampled_from(SPECIAL)), max_size=40),
       st.lists(st.text(min_size=0, max_size=6), max_size=3), st.booleans())
def test_same_as_reference_hypothesis(ids, stops, skip):
    assert_same(TOK, ids, stop=stops, skip=skip)


@pytest.mark.parametrize("bad", [-1, 1 << 32])
def test_id_out_of_u32_rejected_like_the_tokenizer(bad):
    with pytest.raises(OverflowError):
        _Reference(TOK).add_token(bad)
    with pytest.raises(OverflowError):
        IncrementalDetokenizer(TOK).add_token(bad)
    assert assert_same(TOK, [(1 << 32) - 1, TOK.vocab_size, *TOK.encode("ok")])[-1][2] == "ok"


# ---- tokenizers off the byte-level path: the general method, one decode per token ----------

def _sentencepiece_like(strip: bool):
    """A tiny Llama-2 style tokenizer (Metaspace text, byte fallback, leading space stripped)."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in ["▁", *"abcdefghijklmnopqrstuvwxyzHTW.,!", "▁t", "▁th", "he", "▁the", "▁a"]:
        vocab[piece] = len(vocab)
    merges = [("▁", "t"), ("▁t", "h"), ("h", "e"), ("▁th", "e"), ("▁", "a")]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    tok.add_special_tokens(["<s>", "</s>"])
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + [decoders.Strip(" ", 1, 0)] if strip else steps)
    return tok


class _Plain:
    """A Decoder that is not a tokenizers.Tokenizer: forces the general path."""

    def __init__(self, tok):
        self.tok, self.calls = tok, 0

    def decode(self, ids, skip_special_tokens=True):
        self.calls += 1
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


@pytest.mark.parametrize("strip", [True, False])
def test_general_path_same_as_reference_sentencepiece(strip):
    import random

    from gateway.detokenizer import byte_level_table
    sp = _sentencepiece_like(strip)
    assert byte_level_table(sp, True) is None            # not byte-level: the general path
    rng = random.Random(99)
    texts = ["the cat 你好 😀 the end", "Hello World", "a  b   the, the!", "é€😀"]
    for text in texts:
        ids = [1, *sp.encode(text, add_special_tokens=False).ids, 2]
        for skip in (True, False):
            assert_same(sp, ids, skip=skip)
            assert_same(_Plain(sp), ids, stop=["the", " t"], skip=skip)
    for _ in range(800):
        ids = [rng.randrange(sp.get_vocab_size() + 2) for _ in range(rng.randint(0, 25))]
        full = sp.decode(ids)
        stops = [full[a:a + rng.randint(1, 5)] for a in rng.sample(range(len(full)), min(2, len(full)))]
        assert_same(sp, ids, stop=stops, skip=rng.random() < 0.7)


def test_sentencepiece_window_text_is_not_the_emitted_delta():
    """Why the general path still decodes the emitted window: with SentencePiece the decode of a
    window drops its leading space, so it is not the text that was emitted for those tokens."""
    sp = _sentencepiece_like(strip=True)
    ids = sp.encode("the the the", add_special_tokens=False).ids
    assert sp.decode(ids[:2]) == "the the" and sp.decode(ids[:1]) == "the"
    delta = sp.decode(ids[:2])[len(sp.decode(ids[:1])):]
    assert delta == " the" != sp.decode(ids[1:2]) == "the"
    assert "".join(c[0] for c in assert_same(sp, ids)[:-1]) == "the the the"


def test_general_path_skips_the_window_decode_while_nothing_is_emitted():
    plain = _Plain(TOK)
    ref = _Plain(TOK)
    ids = TOK.encode(MULTIBYTE * 3)
    d, r = IncrementalDetokenizer(plain, []), _Reference(ref, [])
    for i in ids:
        assert d.add_token(i) == r.add_token(i)
    assert d.finish() == r.finish()
    assert ref.calls == 2 * len(ids) + 2
    assert plain.calls < ref.calls
