"""Tokenizer: text <-> token ids, special tokens, and the model's chat template.

A thin layer over a ``tokenizers.Tokenizer`` (the Rust fast tokenizer), built either from a Hugging
Face folder (tokenizer.json + tokenizer_config.json) or from GGUF metadata (see gguf.py). The
chat template is rendered with jinja2 the way transformers renders it, so prompts match exactly.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
import tokenizers
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's table): printable Latin-1 bytes stand
    for themselves, the other bytes take the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + i): b for i, b in enumerate(others)})
    return table


_BYTE_LEVEL_DECODER = _byte_level_alphabet()  # stand-in character -> byte
_BYTE_FALLBACK_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


# transformers' clean_up_tokenization: spaces before punctuation and contractions removed on decode.
_CLEANUP_PAIRS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                  (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


class Tokenizer:
    """Encode/decode text and render chat prompts for one model."""

    def __init__(self, backend: tokenizers.Tokenizer, *, bos_token: str | None = None,
                 eos_token: str | None = None, unk_token: str | None = None, pad_token: str | None = None,
                 eos_token_ids: list[int] | None = None, chat_template: str | None = None,
                 clean_up_tokenization_spaces: bool = False) -> None:
        """``backend`` does the splitting and BPE (its post-processor adds BOS when the model wants one);
        ``eos_token_ids`` lists every id that ends a generation (defaults to the eos token's id)."""
        self.backend = backend
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = bos_token, eos_token, unk_token, pad_token
        self.bos_token_id = self._id_of(bos_token)
        eos_id = self._id_of(eos_token)
        self.eos_token_ids = list(eos_token_ids) if eos_token_ids else ([] if eos_id is None else [eos_id])
        self.chat_template = chat_template
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        special = {i for i, tok in backend.get_added_tokens_decoder().items() if tok.special}
        named = (self._id_of(t) for t in (bos_token, eos_token, unk_token, pad_token))
        self.all_special_ids: set[int] = special | {i for i in named if i is not None} | set(self.eos_token_ids)

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    # ---- text <-> ids -------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens`` the model's BOS (if it uses one) is prepended.

        Thread-friendly: ``tokenizers``' ``encode`` holds the GIL for the whole call (seconds for megabytes
        of text) while ``encode_batch`` releases it, so a server tokenizing in a worker thread keeps its event
        loop running. Same ids either way."""
        return self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (bytes that do not form complete UTF-8 characters become U+FFFD)."""
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces:
            for old, new in _CLEANUP_PAIRS:
                text = text.replace(old, new)
        return text

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        """Raw vocabulary strings of ``ids`` (byte-level BPE shows a space as 'Ġ')."""
        return [self.backend.id_to_token(i) for i in ids]

    def token_texts(self, ids: list[int]) -> list[str]:
        """What each id decodes to on its own (special tokens included; partial UTF-8 shows U+FFFD)."""
        return self.backend.decode_batch([[i] for i in ids], skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes ``token_id`` stands for, also when they are not whole UTF-8 characters (a byte-level
        BPE piece of an emoji, SentencePiece's ``<0xF0>``), where decoding it alone gives U+FFFD."""
        piece = self.backend.id_to_token(token_id)
        if piece is None or token_id in self.all_special_ids:
            return self.decode([token_id], skip_special_tokens=False).encode()
        if self._decoder_kind == "byte_level" and all(ch in _BYTE_LEVEL_DECODER for ch in piece):
            return bytes(_BYTE_LEVEL_DECODER[ch] for ch in piece)
        if self._decoder_kind == "byte_fallback":
            match = _BYTE_FALLBACK_PIECE.fullmatch(piece)
            return bytes([int(match.group(1), 16)]) if match else piece.replace("\u2581", " ").encode()
        return self.decode([token_id], skip_special_tokens=False).encode()

    @cached_property
    def _decoder_kind(self) -> str:
        """How the backend's decoder turns pieces into bytes: "byte_level", "byte_fallback" or "text"."""
        decoder = json.loads(self.backend.to_str()).get("decoder") or {}
        kinds = {d.get("type") for d in decoder.get("decoders") or [decoder]}
        return "byte_level" if "ByteLevel" in kinds else "byte_fallback" if "ByteFallback" in kinds else "text"

    # ---- chat template ------------------------------------------------------------------------

    @cached_property
    def _compiled_template(self) -> jinja2.Template:
        if not self.chat_template:
            raise ValueError("this model has no chat template; send a plain prompt instead")
        return _jinja_env().from_string(self.chat_template)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tokenize: bool = False, **template_kwargs: Any) -> str | list[int]:
        """Render ``messages`` ([{"role", "content"}, ...]) with the model's chat template.

        Same variables as transformers: messages, add_generation_prompt, the special token strings
        (bos_token, eos_token, ...), tools/documents (None unless given in ``template_kwargs``).
        ``tokenize=True`` returns ids, encoded without adding special tokens (the template has them).
        """
        _check_messages(messages)
        variables = {"bos_token": self.bos_token, "eos_token": self.eos_token, "unk_token": self.unk_token,
                     "pad_token": self.pad_token, "tools": None, "documents": None, **template_kwargs}
        try:
            text = self._compiled_template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template error: {e}") from e
        return self.encode(text, add_special_tokens=False) if tokenize else text

    # ---- persistence --------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, folder: str | Path, eos_token_ids: list[int] | None = None) -> Tokenizer:
        """Load a Hugging Face tokenizer folder: tokenizer.json, tokenizer_config.json (special tokens,
        chat_template) or chat_template.jinja. ValueError if tokenizer.json is missing or unreadable."""
        folder = Path(folder)
        try:
            backend = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # the Rust side raises a bare Exception for missing/corrupt files
            raise ValueError(f"{folder}: cannot load tokenizer.json ({e})") from e
        cfg = _read_json(folder / "tokenizer_config.json")
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        return cls(backend, bos_token=_token_str(cfg.get("bos_token")), eos_token=_token_str(cfg.get("eos_token")),
                   unk_token=_token_str(cfg.get("unk_token")), pad_token=_token_str(cfg.get("pad_token")),
                   eos_token_ids=eos_token_ids, chat_template=template,
                   clean_up_tokenization_spaces=bool(cfg.get("clean_up_tokenization_spaces", False)))

    def save_hf(self, folder: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json so transformers' AutoTokenizer loads it."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(folder / "tokenizer.json"))
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": self.bos_token,
               "eos_token": self.eos_token, "unk_token": self.unk_token, "pad_token": self.pad_token,
               "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
               "chat_template": self.chat_template}
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))


def _jinja_env() -> ImmutableSandboxedEnvironment:
    """A sandboxed jinja2 environment with the globals and filters chat templates expect."""
    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
        # jinja's own tojson HTML-escapes; templates expect plain json.dumps
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _check_messages(messages: list[dict]) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise ValueError(f"messages[{i}] must be a dict with a string 'role' and a 'content'")


def _token_str(value: Any) -> str | None:
    """tokenizer_config stores a special token as a string or as {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
