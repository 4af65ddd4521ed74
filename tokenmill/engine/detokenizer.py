"""Incremental, UTF-8-safe detokenization with stop strings held back.

Two problems make "decode the new token and append" wrong:

* A token can end in the middle of a UTF-8 character (byte-level BPE splits emoji and CJK
  into byte tokens); decoding it alone gives U+FFFD. We keep a window of token ids
  ``[prefix_offset, read_offset)`` that was already released, decode the window with and
  without the new tokens, and release the difference only when it does not end in U+FFFD.
  Each step decodes a few tokens, never the whole output.
* A stop string can span tokens and must never reach the client, not even its first
  characters. Released text is searched for stop strings, and any tail that is a prefix of
  some stop string is held back until the next token settles it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Protocol

from tokenmill.sampling_params import SamplingParams

# Prompt tokens kept in the first window so the first output token decodes in context
# (tokenizers that drop a leading space at the start of a decode).
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class TokenDecoder(Protocol):
    """What the detokenizer needs from a tokenizer."""

    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


@dataclass
class DetokenizerUpdate:
    """What one call releases."""

    delta_text: str  # new text safe to send now
    stop_string: str | None  # set when a stop string matched (generation must end)


class IncrementalDetokenizer:
    """Turns one sequence's output tokens into text deltas.

    ``text`` is all text released so far (the concatenation of every delta and ``finish()``).
    After a stop string matched, further tokens release nothing.
    """

    def __init__(self, tokenizer: TokenDecoder, prompt_token_ids: list[int], params: SamplingParams):
        self.tokenizer = tokenizer
        self.skip_special_tokens = params.skip_special_tokens
        self.stop_strings: list[str] = list(params.stop or [])
        self.include_stop = params.include_stop_str_in_output
        self.text = ""
        self.stop_string: str | None = None
        context = prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:]
        self._ids: list[int] = list(context)  # prompt context + output tokens
        self._prefix_offset = 0  # start of the decode window
        self._read_offset = len(context)  # tokens before this were released
        self._held = ""  # decoded text held back: it may start a stop string

    def clone(self) -> IncrementalDetokenizer:
        """An independent copy (same tokenizer) that can be fed other tokens."""
        clone = copy.copy(self)
        clone._ids = list(self._ids)
        return clone

    def add_tokens(self, token_ids: list[int]) -> DetokenizerUpdate:
        """Append generated tokens; returns the text that became safe to send."""
        if self.stop_string is not None:
            return DetokenizerUpdate("", self.stop_string)
        self._ids.extend(token_ids)
        return self._release(self._decode_new(final=False))

    def finish(self) -> str:
        """Release everything held back (the sequence ended for another reason)."""
        if self.stop_string is not None:
            return ""
        update = self._release(self._decode_new(final=True), final=True)
        return update.delta_text

    def _decode_new(self, final: bool) -> str:
        """Text of the tokens after read_offset, or "" while it ends mid-character."""
        window = self._ids[self._prefix_offset:self._read_offset]
        prefix_text = self.tokenizer.decode(window, skip_special_tokens=self.skip_special_tokens)
        full_text = self.tokenizer.decode(self._ids[self._prefix_offset:],
                                          skip_special_tokens=self.skip_special_tokens)
        if len(full_text) <= len(prefix_text):
            return ""  # e.g. a skipped special token: nothing new yet
        if full_text.endswith(_REPLACEMENT_CHAR) and not final:
            return ""  # the last character is incomplete: wait for its next bytes
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return full_text[len(prefix_text):]

    def _release(self, new_text: str, final: bool = False) -> DetokenizerUpdate:
        """Search held + new text for a stop string; release what cannot be part of one."""
        buffer = self._held + new_text
        match = _first_stop(buffer, self.stop_strings)
        if match is not None:
            start, stop = match
            end = start + len(stop) if self.include_stop else start
            self._held = ""
            self.stop_string = stop
            return self._emit(buffer[:end], stop)
        keep = 0 if final else _stop_prefix_len(buffer, self.stop_strings)
        self._held = buffer[len(buffer) - keep:] if keep else ""
        return self._emit(buffer[:len(buffer) - keep], None)

    def _emit(self, delta: str, stop: str | None) -> DetokenizerUpdate:
        self.text += delta
        return DetokenizerUpdate(delta, stop)


def _first_stop(text: str, stops: list[str]) -> tuple[int, str] | None:
    """The stop string that completes first in text (then the one starting first), with its start."""
    best: tuple[int, int, str] | None = None  # (end, start, stop)
    for stop in stops:
        start = text.find(stop)
        if start < 0:
            continue
        candidate = (start + len(stop), start, stop)
        if best is None or candidate[:2] < best[:2]:
            best = candidate
    return None if best is None else (best[1], best[2])


def _stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest tail of text that is a proper prefix of some stop string."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest
