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
