"""The model's tokenizer and chat template, behind one small interface the gateway uses.

`load_tokenizer(source)` gives a `ChatTokenizer`: chat messages -> prompt ids (with the model's
own Jinja template, rendered sandboxed by transformers), completion text -> ids, ids -> text,
and the token ids that end a turn.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

from backends.gguf_file import GGUFFile
from backends.source import ModelSource

# Used only when the model ships no chat template: plain ChatML, the most common convention.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# End-of-turn markers of common chat formats; one counts as EOS when the vocab has it and the
# template writes it (a model stops at the marker its template closes turns with).
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>",
               "<|endoftext|>", "<|end_of_text|>", "</s>", "<|return|>", "<｜end▁of▁sentence｜>")


class ChatTemplateError(ValueError):
    """The messages cannot be rendered by the model's chat template (a client error)."""


class ChatTokenizer:
    """A loaded tokenizer plus its chat template; immutable after construction."""

    def __init__(self, hf_tokenizer, name: str, chat_template: str | None,
                 extra_eos_ids: tuple[int, ...] = ()):
        self.hf = hf_tokenizer
        self.name = name
        # The Rust tokenizer when there is one: ~4x faster decode than the transformers wrapper.
        self._backend = getattr(hf_tokenizer, "backend_tokenizer", None) or _PythonBackend(hf_tokenizer)
        self.chat_template = chat_template or CHATML_TEMPLATE
        self.uses_fallback_template = chat_template is None
        self.vocab_size: int = len(hf_tokenizer)
        self.bos_token_id: int | None = hf_tokenizer.bos_token_id
        self.add_bos = self._adds_bos()
        self.eos_token_ids: frozenset[int] = self._eos_ids(extra_eos_ids)
        # Newer transformers can encode control tokens found inside message text as plain text,
        # so a user cannot inject "<|im_end|><|im_start|>system" into the prompt structure.
        self._sanitize = "sanitize_control_tokens" in inspect.signature(
            hf_tokenizer.apply_chat_template).parameters

    def _adds_bos(self) -> bool:
        # The post-processor reflects the metadata (GGUF add_bos_token, tokenizer.json template).
        if self.bos_token_id is None:
            return False
        ids = self._backend.encode("a", add_special_tokens=True).ids
        return bool(ids) and ids[0] == self.bos_token_id

    def _eos_ids(self, extra: tuple[int, ...]) -> frozenset[int]:
        ids = set(extra)
        if self.hf.eos_token_id is not None:
            ids.add(self.hf.eos_token_id)
        for token in END_OF_TURN:
            tid = self._backend.token_to_id(token)
            if tid is not None and token in self.chat_template:
                ids.add(tid)
        return frozenset(ids)

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Prompt ids for a chat, ending with the template's generation prompt."""
        extra = {"sanitize_control_tokens": True} if self._sanitize else {}
        return list(self._render(messages, tools, tokenize=True, return_dict=False, **extra))

    def render_chat(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        """The prompt text the template produces (for logging and tests)."""
        return self._render(messages, tools, tokenize=False)

    def _render(self, messages: list[dict], tools: list[dict] | None, **kwargs):
        if not messages:
            raise ChatTemplateError("messages must not be empty")
        msgs = [normalize_message(m) for m in messages]
        try:
            return self.hf.apply_chat_template(msgs, tools=tools, chat_template=self.chat_template,
                                               add_generation_prompt=True, **kwargs)
        except Exception as exc:   # jinja raise_exception(), missing keys, type errors in the template
            raise ChatTemplateError(f"chat template failed: {exc}") from exc

    def encode(self, text: str) -> list[int]:
        """Ids for a raw completions prompt: BOS only if the model adds one, never EOS."""
        ids = self._backend.encode(text, add_special_tokens=False).ids
        return [self.bos_token_id, *ids] if self.add_bos else ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        # No clean_up_tokenization_spaces: it rewrites " ." etc., which would make incremental
        # decoding disagree with decoding the whole output.
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)


class _PythonBackend:
    """The few `tokenizers.Tokenizer` calls used above, for tokenizers without a Rust backend."""

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        self.vocab = hf_tokenizer.get_vocab()

    def encode(self, text: str, add_special_tokens: bool) -> SimpleNamespace:
        return SimpleNamespace(ids=self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens,
                              clean_up_tokenization_spaces=False)

    def token_to_id(self, token: str) -> int | None:
        return self.vocab.get(token)


def normalize_message(message: dict) -> dict:
    """OpenAI message -> template message: text parts joined, developer -> system, args as dicts."""
    if not isinstance(message, dict) or "role" not in message:
        raise ChatTemplateError("each message must be an object with a 'role'")
    out = {k: v for k, v in message.items() if v is not None}
    if out["role"] == "developer":
        out["role"] = "system"
    content = out.get("content", "")
    if isinstance(content, list):
        texts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise ChatTemplateError(f"unsupported content part type {kind!r}: only 'text' parts")
            texts.append(part["text"])
        content = "\n".join(texts)   # the same joiner vLLM uses for multi-part text
    elif not isinstance(content, str):
        raise ChatTemplateError("message content must be a string or a list of text parts")
    out["content"] = content
    if out.get("tool_calls"):
        out["tool_calls"] = [_parse_arguments(c) for c in out["tool_calls"]]
    return out


def _parse_arguments(call: dict) -> dict:
    # OpenAI sends arguments as a JSON string; HF chat templates expect a dict (`| tojson`).
    fn = call.get("function") if isinstance(call, dict) else None
    if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
        try:
            args = json.loads(fn["arguments"])
        except ValueError:
            return call
        if isinstance(args, dict):
            return {**call, "function": {**fn, "arguments": args}}
    return call


def _gguf_chat_template(path: str) -> str | None:
    """`tokenizer.chat_template` from a GGUF header, for transformers versions that drop it
    (backends/gguf_file.py reads the header without parsing the token arrays)."""
    try:
        template = GGUFFile(path).fields.get("tokenizer.chat_template")
    except ValueError:          # not a GGUF file this reader takes
        return None
    return template if isinstance(template, str) else None


def _generation_eos(folder: Path) -> tuple[int, ...]:
    # HF models list all their stop ids (e.g. Llama 3's three) in generation_config.json.
    try:
        eos = json.loads((folder / "generation_config.json").read_text()).get("eos_token_id")
    except (OSError, ValueError):
        return ()
    if isinstance(eos, int):
        return (eos,)
    return tuple(i for i in eos if isinstance(i, int)) if isinstance(eos, list) else ()


def _cache_dir(gguf_path: Path) -> Path:
    """Where the converted tokenizer of this exact file (and transformers version) is kept."""
    import transformers

    st = gguf_path.stat()
    key = f"{gguf_path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}"
    root = os.environ.get("RADIXGATE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "radixgate")
    return Path(root) / "tokenizers" / hashlib.sha256(key.encode()).hexdigest()[:20]


def _load_gguf_tokenizer(path: Path):
    """The GGUF's tokenizer, converted once and then read back from a tokenizer.json cache.

    Converting needs transformers' GGUF reader, which imports torch (~4 s) and walks the token
    arrays (~1 s); the cached tokenizer.json loads in ~0.5 s without torch. AutoTokenizer is
    avoided: it would also build the model config by parsing the whole file (~6 s)."""
    from transformers import PreTrainedTokenizerFast

    cache = _cache_dir(path)
    if (cache / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(cache), local_files_only=True)
    try:
        tok = PreTrainedTokenizerFast.from_pretrained(str(path.parent), gguf_file=path.name,
                                                      local_files_only=True)
    except Exception:
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=cache.parent)
    except OSError:
        return tok                      # read-only home: the cache is optional
    try:   # a private folder renamed into place: concurrent loaders never see half a cache
        tok.save_pretrained(tmp)
        os.replace(tmp, cache)
    except OSError:                     # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return tok


@functools.lru_cache(maxsize=4)
def load_tokenizer(source: ModelSource) -> ChatTokenizer:
    """Load the tokenizer of a model source, offline; cached per source in this process."""
    path = Path(source.path)
    if source.kind == "gguf":
        tok = _load_gguf_tokenizer(path)
        template = tok.chat_template or _gguf_chat_template(str(path))
        return ChatTokenizer(tok, path.stem, template)
    if source.kind == "hf":
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        template = tok.chat_template
        if isinstance(template, dict):   # named templates: the default one is the chat template
            template = template.get("default")
        return ChatTokenizer(tok, path.name, template, _generation_eos(path))
    raise ValueError(f"unknown model source kind {source.kind!r}")
