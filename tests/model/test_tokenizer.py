"""Tokenizer: the GGUF-rebuilt tokenizer against transformers' tokenizers, chat templates, bad input."""

from __future__ import annotations

import datetime

import pytest
import tokenizers

from tokenmill.model.gguf import read_gguf, tokenizer_from_gguf
from tokenmill.model.tokenizer import Tokenizer

TEXTS = [
    "Hello world!",
    "The year 2024 had 366 days; pi is 3.14159.",
    "  leading spaces, trailing   \n\n\n  and\ttabs\t\t\r\n",
    "naïve café — «quotes» and ‘curly’ ones…",
    "Emoji: 🤖🚀👩‍👩‍👧 ❤️ and flags 🇫🇷",
    "中文：机器学习很有趣。日本語のテキスト。한국어 텍스트",
    "Здравствуй, мир! Γειά σου κόσμε. مرحبا بالعالم",
    "def f(x):\n    return {'a': [x ** 2, x // 3]}  # comment\n",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "don't won't I'm you're it's we've they'll I'd",
    "x" * 300 + " " + "ab" * 50,
    "",
    " ",
    "\u0000\u0001 control \ufeff bom",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "And 3+3? 🤔"}],
]


@pytest.fixture(scope="module")
def ours(default_model_path) -> Tokenizer:
    return tokenizer_from_gguf(read_gguf(str(default_model_path)))


@pytest.fixture(scope="module")
def hf_gguf_tokenizer(default_model_path):
    """transformers' tokenizer converted from the same GGUF file."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_path.parent, gguf_file=default_model_path.name)


@pytest.fixture(scope="module")
def hf_saved_tokenizer(ours, tmp_path_factory):
    """Our tokenizer exported with save_hf and loaded back by transformers."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tok")
    ours.save_hf(folder)
    return AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers_gguf_tokenizer(ours, hf_gguf_tokenizer, text):
    # transformers' GGUF conversion prepends <|im_start|> as a BOS although the file says
    # add_bos_token = false (SmolLM2 uses no BOS), so compare without special tokens.
    expected = hf_gguf_tokenizer.encode(text, add_special_tokens=False)
    ids = ours.encode(text)
    assert ids == expected
    assert ours.encode(text, add_special_tokens=False) == expected
    assert ours.decode(ids, skip_special_tokens=False) == text
    assert ours.decode(ids, skip_special_tokens=False) == hf_gguf_tokenizer.decode(
        ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def test_special_tokens_and_ids(ours):
    assert ours.vocab_size == 49152
    assert (ours.bos_token_id, ours.eos_token_ids, ours.eos_token) == (1, [2], "<|im_end|>")
    assert {0, 1, 2} <= ours.all_special_ids and 19556 not in ours.all_special_ids
    ids = ours.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert ours.decode(ids) == "user\nhi"  # specials skipped by default


def test_digits_are_split_one_by_one(ours):
    # SmolLM2's pre-tokenizer (GGUF pre "smollm") puts every digit in its own token
    assert ours.convert_ids_to_tokens(ours.encode("12345")) == ["1", "2", "3", "4", "5"]


def test_token_views(ours):
    ids = ours.encode(" world 🤖")
    assert ours.convert_ids_to_tokens(ids)[0] == "Ġworld"
    texts = ours.token_texts(ids)
    assert texts[0] == " world"
    assert len(texts) == len(ids)
    # the emoji's 4 bytes span several tokens: alone each is partial UTF-8, together they decode
    assert any("\ufffd" in t for t in texts)
    assert ours.decode(ids) == " world 🤖"


def test_token_bytes_are_the_pieces_own_bytes(ours):
    ids = ours.encode(" world 🤖")
    assert b"".join(ours.token_bytes(i) for i in ids) == " world 🤖".encode()
    assert all(len(ours.token_bytes(i)) < 4 for i in ids[1:])  # pieces of the emoji, not U+FFFD
    assert ours.token_bytes(ours.eos_token_ids[0]) == ours.eos_token.encode()


def test_token_bytes_of_a_byte_fallback_vocabulary():
    """SentencePiece-style pieces: "▁" is a space, "<0xF0>" is the byte 0xF0."""
    pieces = ["<unk>", "\u2581hi", *(f"<0x{b:02X}>" for b in range(256))]
    bpe = tokenizers.models.BPE({p: i for i, p in enumerate(pieces)}, [], unk_token="<unk>", byte_fallback=True)
    backend = tokenizers.Tokenizer(bpe)
    backend.decoder = tokenizers.decoders.Sequence([tokenizers.decoders.Replace("\u2581", " "),
                                                    tokenizers.decoders.ByteFallback(), tokenizers.decoders.Fuse()])
    tok = Tokenizer(backend, unk_token="<unk>")
    ids = [1, *(2 + b for b in "🤖".encode())]
    assert tok.decode(ids) == " hi🤖" and "\ufffd" in tok.decode(ids[1:2])
    assert [tok.token_bytes(i) for i in ids] == [b" hi", *(bytes([b]) for b in "🤖".encode())]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(ours, hf_gguf_tokenizer, hf_saved_tokenizer, messages,
                                            add_generation_prompt):
    text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    for hf in (hf_gguf_tokenizer, hf_saved_tokenizer):
        assert text == hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    ids = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    assert ids == hf_saved_tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert ids == ours.encode(text, add_special_tokens=False)


def test_saved_tokenizer_round_trips_through_transformers(ours, hf_saved_tokenizer):
    for text in TEXTS:
        assert hf_saved_tokenizer.encode(text) == ours.encode(text)
    assert hf_saved_tokenizer.eos_token == "<|im_end|>" and hf_saved_tokenizer.bos_token == "<|im_start|>"


def test_from_pretrained_reads_saved_folder(ours, tmp_path):
    ours.save_hf(tmp_path)
    loaded = Tokenizer.from_pretrained(tmp_path)
    assert loaded.chat_template == ours.chat_template
    assert (loaded.bos_token_id, loaded.eos_token_ids) == (1, [2])
    assert all(loaded.encode(t) == ours.encode(t) for t in TEXTS)
    # a chat_template.jinja file (newer transformers layout) takes precedence
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    assert Tokenizer.from_pretrained(tmp_path).apply_chat_template([{"role": "user", "content": "hey"}]) == "hey!"


CUSTOM_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ['user', 'assistant'] %}{{ raise_exception('bad role ' + m['role']) }}{% endif %}"
    "{{ m['role'] }}: {{ m['content'] | tojson }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant ({{ strftime_now('%Y') }}):{% endif %}{{ eos_token }}"
)


def test_custom_template_globals_match_transformers(ours, tmp_path):
    from transformers import AutoTokenizer

    custom = Tokenizer(ours.backend, bos_token="<|im_start|>", eos_token="<|im_end|>", chat_template=CUSTOM_TEMPLATE)
    custom.save_hf(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "user", "content": 'say "héllo" <b>'}, {"role": "assistant", "content": "ok"}]
    text = custom.apply_chat_template(messages)
    assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert '"say \\"héllo\\" <b>"' in text  # plain json.dumps: no HTML escaping, no ASCII escaping
    assert str(datetime.date.today().year) in text
    with pytest.raises(ValueError, match="bad role system"):
        custom.apply_chat_template([{"role": "system", "content": "x"}])


@pytest.mark.parametrize("messages", [
    [], "hello", [{"content": "no role"}], [{"role": "user"}], ["not a dict"], [{"role": 3, "content": "x"}],
])
def test_bad_messages_raise(ours, messages):
    with pytest.raises(ValueError, match="messages"):
        ours.apply_chat_template(messages)


def test_no_chat_template_raises(ours):
    bare = Tokenizer(ours.backend, eos_token="<|im_end|>")
    with pytest.raises(ValueError, match="no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "hi"}])


def test_clean_up_tokenization_spaces_matches_transformers(ours, hf_gguf_tokenizer):
    # transformers' GGUF llama-3-style tokenizer cleans up spaces on decode; ours does when asked
    cleaning = Tokenizer(ours.backend, eos_token="<|im_end|>", clean_up_tokenization_spaces=True)
    ids = ours.encode("Hello , world . I 'm sure it 's fine ! Is it ?")
    assert cleaning.decode(ids) == hf_gguf_tokenizer.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids) == "Hello , world . I 'm sure it 's fine ! Is it ?"


def test_from_pretrained_without_tokenizer_json_raises(tmp_path):
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)


def test_gguf_bos_post_processor(ours):
    # a GGUF with add_bos_token = true gets BOS prepended by encode(add_special_tokens=True)
    backend = tokenizers.Tokenizer.from_str(ours.backend.to_str())
    backend.post_processor = tokenizers.processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])
    with_bos = Tokenizer(backend, bos_token="<|im_start|>", eos_token="<|im_end|>")
    assert with_bos.encode("hi") == [1, *ours.encode("hi")]
    assert with_bos.encode("hi", add_special_tokens=False) == ours.encode("hi")


def test_golden_prompts_tokenize_like_transformers(ours):
    """The golden greedy data's prompt ids (from transformers) are what our tokenizer gives."""
    import json
    from pathlib import Path

    golden = json.loads((Path(__file__).parents[1] / "data" / "golden_greedy.json").read_text())
    for case in golden["cases"]:
        if "chat" in case:
            assert ours.apply_chat_template(case["chat"]) == case["prompt"]
            assert ours.apply_chat_template(case["chat"], tokenize=True) == case["prompt_token_ids"]
        assert ours.encode(case["prompt"]) == case["prompt_token_ids"]


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2"])
def test_split_pre_tokenizers_follow_their_regex(pre):
    """Llama 3 / Qwen2 GGUFs: pieces are exactly the regex matches (byte-level mapped), nothing re-split."""
    import regex
    from tokenizers.pre_tokenizers import ByteLevel

    from tokenmill.model.gguf_tokenizer import _LLAMA3, _QWEN2, pre_tokenizer_for

    pattern = _QWEN2 if pre == "qwen2" else _LLAMA3
    byte_map = ByteLevel.alphabet()  # the 256 printable stand-ins, in byte order below
    table = {b: c for b, c in zip(range(256), _bytes_to_unicode(), strict=True)}
    assert set(table.values()) == set(byte_map)
    text = "I'll pay 12345 dollars!!  Ok?\n\n  日本語 café\t\tx = [1, 22];"
    pieces = [p for p, _ in pre_tokenizer_for(pre)[0].pre_tokenize_str(text)]
    expected = ["".join(table[b] for b in m.encode()) for m in regex.findall(pattern, text)]
    assert pieces == expected
    digits = [p for p in pieces if p.isdigit()]
    assert digits == (["123", "45", "1", "22"] if pre == "llama-bpe" else list("12345122"))


def _bytes_to_unicode() -> list[str]:
    # GPT-2's byte -> printable character table: printable Latin-1 bytes map to themselves,
    # the rest to 256, 257, ... in byte order
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out
