"""Chat templating and prompt encoding on the real embedded SmolLM2 tokenizer."""
from __future__ import annotations

import json

import pytest

from backends.source import ModelSource, resolve_source
from gateway.templating import (
    CHATML_TEMPLATE,
    ChatTemplateError,
    ChatTokenizer,
    _gguf_chat_template,
    load_tokenizer,
    normalize_message,
)

SYSTEM_USER = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
EXPECTED = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
            "<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def source():
    return resolve_source("packaged:smollm2-135m-instruct")


@pytest.fixture(scope="module")
def tok(source):
    return load_tokenizer(source)


def test_metadata(tok):
    assert tok.vocab_size == 49152
    assert tok.name == "SmolLM2-135M-Instruct.Q4_1"
    assert tok.eos_token_ids == frozenset({2})          # <|im_end|>: EOS and end of turn
    assert tok.hf.convert_ids_to_tokens(2) == "<|im_end|>"
    assert not tok.add_bos and not tok.uses_fallback_template


def test_system_user_chatml(tok):
    assert tok.render_chat(SYSTEM_USER) == EXPECTED
    ids = tok.apply_chat_template(SYSTEM_USER)
    assert ids[:3] == [1, 9690, 198]                      # <|im_start|> system \n
    assert ids[-4:] == [1, 520, 9531, 198]                # <|im_start|> assistant \n: the generation prompt
    assert tok.decode(ids, skip_special_tokens=False) == EXPECTED
    assert ids == tok.encode(EXPECTED)


def test_default_system_prompt_from_template(tok):
    text = tok.render_chat([{"role": "user", "content": "Hi!"}])
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n")


def test_content_parts_and_developer_role(tok):
    parts = [{"type": "text", "text": "Be"}, {"type": "text", "text": "brief."}]
    msgs = [{"role": "developer", "content": parts},
            {"role": "user", "content": [{"type": "text", "text": "Hi!"}]}]
    assert tok.render_chat(msgs) == EXPECTED.replace("Be brief.", "Be\nbrief.")


def test_tool_messages_pass_through(tok):
    msgs = [{"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None,
             "tool_calls": [{"id": "c1", "type": "function",
                             "function": {"name": "wx", "arguments": '{"city": "Oslo"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    text = tok.render_chat(msgs)
    assert "<|im_start|>assistant\n<|im_end|>" in text          # None content renders as ""
    assert "<|im_start|>tool\nsunny<|im_end|>" in text
    call = normalize_message(msgs[1])["tool_calls"][0]
    assert call["function"]["arguments"] == {"city": "Oslo"}       # HF templates expect a dict


def test_control_tokens_in_content_stay_text(tok):
    if not tok._sanitize:
        pytest.skip("this transformers cannot sanitize control tokens")
    ids = tok.apply_chat_template([{"role": "user", "content": "a<|im_end|>b"}])
    plain = tok.apply_chat_template([{"role": "user", "content": "ab"}])
    assert ids.count(2) == plain.count(2)                           # no injected <|im_end|>


@pytest.mark.parametrize("bad", [[], [{"content": "no role"}],
                                 [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
                                 [{"role": "user", "content": 5}]])
def test_bad_messages(tok, bad):
    with pytest.raises(ChatTemplateError):
        tok.apply_chat_template(bad)


def test_template_raise_exception_is_client_error(tok):
    strict = ChatTokenizer(tok.hf, "strict", "{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        strict.apply_chat_template([{"role": "user", "content": "x"}])


def test_completions_encode(tok):
    assert tok.encode("Hello world") == [19556, 905]                  # add_bos_token is False
    assert tok.decode(tok.encode("Hello 你好 😀")) == "Hello 你好 😀"
    assert tok.encode("") == []


def test_fallback_chatml_template(tok):
    plain = ChatTokenizer(tok.hf, "plain", None)
    assert plain.uses_fallback_template and plain.chat_template == CHATML_TEMPLATE
    assert plain.render_chat(SYSTEM_USER) == EXPECTED
    assert tok.hf.chat_template != CHATML_TEMPLATE                    # the shared tokenizer is untouched


def test_gguf_template_reader(source, tok):
    assert _gguf_chat_template(source.path) == tok.chat_template


def test_hf_folder(tmp_path, tok):
    tok.hf.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").write_text(CHATML_TEMPLATE + "{# folder #}")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    hf = load_tokenizer(ModelSource("hf", str(tmp_path)))
    assert hf.name == tmp_path.name and hf.chat_template.endswith("{# folder #}")
    assert hf.eos_token_ids == frozenset({0, 2})
    assert hf.apply_chat_template(SYSTEM_USER) == tok.apply_chat_template(SYSTEM_USER)
    assert hf.encode("Hello world") == [19556, 905]


def test_tokenizer_without_rust_backend(tok):
    class NoBackend:                       # stands in for a python-only (slow) tokenizer
        def __init__(self, inner):
            self._inner = inner

        def __getattr__(self, name):
            if name == "backend_tokenizer":
                raise AttributeError(name)
            return getattr(self._inner, name)

        def __len__(self):
            return len(self._inner)

    slow = ChatTokenizer(NoBackend(tok.hf), "slow", tok.chat_template)
    assert slow.eos_token_ids == tok.eos_token_ids and slow.add_bos == tok.add_bos
    assert slow.encode("Hello world") == tok.encode("Hello world")
    assert slow.decode([1, 19556, 2]) == "Hello"
    assert slow.apply_chat_template(SYSTEM_USER) == tok.apply_chat_template(SYSTEM_USER)


def test_gguf_tokenizer_disk_cache(tmp_path, monkeypatch, source, tok):
    monkeypatch.setenv("RADIXGATE_CACHE_DIR", str(tmp_path))
    fresh = load_tokenizer.__wrapped__(source)                  # converts, then writes the cache
    assert list(tmp_path.glob("tokenizers/*/tokenizer.json"))
    cached = load_tokenizer.__wrapped__(source)                 # reads tokenizer.json back
    for t in (fresh, cached):
        assert t.chat_template == tok.chat_template and t.eos_token_ids == tok.eos_token_ids
        assert t.add_bos == tok.add_bos and t.vocab_size == tok.vocab_size
        assert t.apply_chat_template(SYSTEM_USER) == tok.apply_chat_template(SYSTEM_USER)
        assert t.encode("Hello 你好 😀") == tok.encode("Hello 你好 😀")
