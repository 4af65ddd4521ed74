"""A GGUF vocabulary (``tokenizer.ggml.*`` metadata) rebuilt as a ``tokenizers`` tokenizer that encodes
exactly as llama.cpp does (checked against llama.cpp's own vocab test vectors, tests/model/test_vocab_vectors.py).

``tokenizer.ggml.model``:
- ``gpt2``: byte-level BPE. ``tokenizer.ggml.pre`` names the pre-tokenizer: llama.cpp splits the text with
  a list of regexes in turn (each keeps the unmatched spans too), which is a ``Sequence`` of isolated
  ``Split``s here, with the same regexes (``PRE_TOKENIZER_REGEXES``).
- ``llama``: SentencePiece BPE with byte fallback. llama.cpp merges the adjacent pair whose concatenation is
  the highest-scoring vocabulary entry; that is BPE with one merge per (a, b) split of every entry, ranked
  by the entry's score. Spaces become U+2581 and, with ``add_space_prefix``, the text (and the text after
  each special token) gets one leading space.
- ``gemma4``: BPE over raw UTF-8 (no byte-level mapping) with spaces as U+2581, split at line breaks,
  bytes outside the vocabulary as ``<0xXX>`` tokens.
- ``bert``: WordPiece. llama.cpp's GGUF marks word starts with U+2581 and continuations bare; the
  ``tokenizers`` WordPiece wants the opposite (``##`` on continuations), so the vocabulary is renamed.

Control tokens (type 3) are special; user-defined ones (type 4) are matched whole in the raw text first,
as llama.cpp does. Unigram (``t5``), ``rwkv`` and ``plamo2`` vocabularies are not supported.
"""

from __future__ import annotations

from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from tokenmill.model.tokenizer import Tokenizer

SUPPORTED_TOKENIZER_MODELS = ("gpt2", "llama", "gemma4", "bert")
SPACE = "\u2581"  # SentencePiece's visible space
CONTROL, USER_DEFINED, BYTE = 3, 4, 6  # tokenizer.ggml.token_type values

# llama.cpp's pre-tokenizer regexes (src/llama-vocab.cpp, llm_tokenizer_bpe), applied in order.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
_QWEN35 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
           r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# escaped: these are exactly llama.cpp's code points (an editor's Unicode normalization would change some)
_DEEPSEEK_LLM_LETTERS = (
    "A-Za-z\xb5\xc0-\xd6\xd8-\xf6\xf8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373"
    "\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481"
    "\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf"
    "\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d"
    "\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4"
    "\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107"
    "\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f"
    "\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d"
    "\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17"
    "\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb"
    "\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943")
PRE_TOKENIZER_REGEXES: dict[str, list[str]] = {
    "default": [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]"],
    "gpt2": [_GPT2],
    "llama3": [_LLAMA3],
    "qwen2": [_QWEN2],
    "qwen35": [_QWEN35],
    "deepseek-llm": ["[\r\n]", rf"\s?[{_DEEPSEEK_LLM_LETTERS}]+", r"\s?[!-/:-~！-／：-～‘-‟　-。]+", r"\s+$",
                     "[一-龥ࠀ-一가-퟿]+", r"\p{N}+"],
    "deepseek-coder": ["[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", "[一-龥ࠀ-一가-퟿]+", r"\p{N}"],
    "falcon": [r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, "[0-9][0-9][0-9]"],
    "starcoder": [r"\p{N}", _GPT2],  # also refact, command-r, smollm, codeshell, exaone, minerva
    "gemma4": ["[^\n]+|[\n]+"],
}
# tokenizer.ggml.pre -> (regex list, ignore_merges: a word that is a whole vocabulary entry stays whole)
_PRE_ALIASES: dict[str, tuple[str, bool]] = {
    **{p: ("llama3", True) for p in ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                                      "midm-2.0", "lfm2")},
    **{p: ("llama3", False) for p in ("dbrx", "smaug-bpe", "chatglm-bpe")},
    **{p: ("gpt2", False) for p in ("gpt-2", "phi-2", "mpt", "olmo", "jais", "jina-es", "jina-de", "roberta-bpe",
                                    "jina-v1-en", "jina-v2-code", "jina-v2-es", "jina-v2-de", "exaone4", "mellum")},
    **{p: ("qwen2", False) for p in ("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez", "hunyuan")},
    **{p: ("starcoder", False) for p in ("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone",
                                         "minerva-7b")},
    "qwen35": ("qwen35", False), "deepseek-llm": ("deepseek-llm", False),
    "deepseek-coder": ("deepseek-coder", False), "falcon": ("falcon", False), "default": ("default", False),
}


def tokenizer_from_gguf(gf: Any) -> Tokenizer:
    """The model's tokenizer from a ``GGUFFile``'s ``tokenizer.ggml.*`` metadata; ValueError for an
    unsupported tokenizer model or pre-tokenizer."""
    md = gf.metadata
    kind = md.get("tokenizer.ggml.model")
    builders = {"gpt2": _byte_level_bpe, "llama": _sentencepiece_bpe, "gemma4": _gemma4_bpe, "bert": _wordpiece}
    if kind not in builders:
        raise ValueError(f"{gf.path!r}: unsupported GGUF tokenizer model {kind!r} (supported: "
                         f"{', '.join(SUPPORTED_TOKENIZER_MODELS)})")
    tokens: list[str] = md["tokenizer.ggml.tokens"]
    types: list[int] = md.get("tokenizer.ggml.token_type", [1] * len(tokens))
    backend = builders[kind](md, tokens, types)
    # control tokens are special (skipped when decoding); user-defined ones are matched whole, not special
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, ty in zip(tokens, types, strict=True) if ty == CONTROL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, ty in zip(tokens, types, strict=True) if ty == USER_DEFINED])

    def token(key: str) -> str | None:
        i = md.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos = token("bos") if kind != "bert" else token("cls")
    add_bos = md.get("tokenizer.ggml.add_bos_token", kind in ("llama", "bert"))
    if kind == "bert" and bos is not None and token("seperator") is not None:
        sep = token("seperator")
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A {sep}", pair=f"{bos} $A {sep} $B {sep}",
            special_tokens=[(bos, md["tokenizer.ggml.cls_token_id"]), (sep, md["tokenizer.ggml.seperator_token_id"])])
    elif add_bos and bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, md["tokenizer.ggml.bos_token_id"])])
    from tokenmill.model.gguf import gguf_eos_token_ids

    return Tokenizer(backend, bos_token=bos, eos_token=token("eos"), unk_token=token("unknown"),
                     pad_token=token("padding"), eos_token_ids=gguf_eos_token_ids(md),
                     chat_template=md.get("tokenizer.chat_template"))


def pre_tokenizer_for(pre: str) -> tuple[pre_tokenizers.PreTokenizer, bool]:
    """(byte-level pre-tokenizer, ignore_merges) for a ``tokenizer.ggml.pre`` value; ValueError if unknown."""
    if pre not in _PRE_ALIASES:
        raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r}; supported: {sorted(_PRE_ALIASES)}")
    name, ignore_merges = _PRE_ALIASES[pre]
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZER_REGEXES[name]]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    return pre_tokenizers.Sequence([*splits, byte_level]), ignore_merges


def _merges(md: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for m in md.get("tokenizer.ggml.merges", []):
        i = m.find(" ", 1)  # as llama.cpp: the separator is the first space after the first character
        out.append((m[:i], m[i + 1:]))
    return out


def _byte_level_bpe(md: dict[str, Any], tokens: list[str], types: list[int]) -> tokenizers.Tokenizer:
    pre_tok, ignore_merges = pre_tokenizer_for(md.get("tokenizer.ggml.pre", "default"))
    bpe = models.BPE({t: i for i, t in enumerate(tokens)}, _merges(md), ignore_merges=ignore_merges)
    backend = tokenizers.Tokenizer(bpe)
    backend.pre_tokenizer = pre_tok
    backend.decoder = decoders.ByteLevel()
    return backend


def _spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """Every (a, b) with a, b and a + b in the vocabulary, best-scoring a + b first (llama.cpp's SPM order)."""
    vocab = {t: i for i, t in enumerate(tokens) if types[i] != BYTE}
    ranked = []
    for t, i in vocab.items():
        for cut in range(1, len(t)):
            a, b = t[:cut], t[cut:]
            if a in vocab and b in vocab:
                ranked.append((-scores[i], i, a, b))
    ranked.sort()
    return [(a, b) for _, _, a, b in ranked]


def _byte_fallback_decoder(strip_prefix: bool) -> decoders.Decoder:
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if strip_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    return decoders.Sequence(steps)


def _sentencepiece_bpe(md: dict[str, Any], tokens: list[str], types: list[int]) -> tokenizers.Tokenizer:
    scores = md.get("tokenizer.ggml.scores") or [-float(i) for i in range(len(tokens))]
    unk = md.get("tokenizer.ggml.unknown_token_id")
    bpe = models.BPE({t: i for i, t in enumerate(tokens)}, _spm_merges(tokens, scores, types),
                     unk_token=tokens[unk] if unk is not None else None, byte_fallback=True, fuse_unk=True)
    backend = tokenizers.Tokenizer(bpe)
    prefix = md.get("tokenizer.ggml.add_space_prefix", True)
    steps = [normalizers.Prepend(" ")] if prefix else []
    backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", SPACE)])
    backend.decoder = _byte_fallback_decoder(prefix)
    return backend


def _gemma4_bpe(md: dict[str, Any], tokens: list[str], types: list[int]) -> tokenizers.Tokenizer:
    bpe = models.BPE({t: i for i, t in enumerate(tokens)}, _merges(md), byte_fallback=True)
    backend = tokenizers.Tokenizer(bpe)
    backend.normalizer = normalizers.Replace(" ", SPACE)
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(PRE_TOKENIZER_REGEXES["gemma4"][0]), behavior="isolated")
    backend.decoder = _byte_fallback_decoder(False)
    return backend


def _wordpiece(md: dict[str, Any], tokens: list[str], types: list[int]) -> tokenizers.Tokenizer:
    # GGUF: "▁word" starts a word, "piece" continues one; tokenizers: "word" and "##piece"
    vocab = {}
    for i, (t, ty) in enumerate(zip(tokens, types, strict=True)):
        name = t if ty == CONTROL else (t[1:] if t.startswith(SPACE) else "##" + t)
        vocab.setdefault(name, i)
    unk = tokens[md.get("tokenizer.ggml.unknown_token_id", 100)]
    backend = tokenizers.Tokenizer(models.WordPiece(vocab, unk_token=unk, max_input_chars_per_word=10**6))
    backend.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                    strip_accents=None, lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    return backend
