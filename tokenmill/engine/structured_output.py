"""Structured outputs: grammars (JSON schema, regex, choice, Lark/GBNF) enforced token by token.

The grammar engine is llguidance: it compiles a grammar against the tokenizer's vocabulary and, for
a matcher's current state, fills a bitmask of the tokens that may come next. Per request:

1. ``GrammarCompiler.compile`` turns the request's ``StructuredOutputsParams`` into llguidance's
   grammar text, validates it (a bad schema, regex or grammar raises ``SamplingParamsError`` with
   the library's message) and caches the compiled matcher by that text. It runs where a request
   is validated (``validate_request``: the API process and the core both have the tokenizer), so
   only the spec crosses the process boundary and the core compiles it again from its own cache.
2. The scheduler gives each sequence a ``Grammar`` (a fresh copy of the compiled matcher; forks
   for n > 1 copy the parent's state), asks it for the bitmask of each row it plans to sample
   (``Grammar.bitmask``: for draft tokens, the state after each draft, rolled back afterwards)
   and advances it with every token it appends (``Grammar.accept``).
3. The sampler applies the bitmask to those rows' logits before every other step
   (``sampler.apply_grammar_mask``); rows without a grammar are not touched.

The API process imports this module to validate grammars and must not load torch (engine/info.py):
torch is imported only where the core builds a step's bitmask.
"""

from __future__ import annotations

import functools
import json
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import llguidance
import numpy as np

from tokenmill.sampling_params import SamplingParamsError, StructuredOutputsParams

if TYPE_CHECKING:
    import torch

# JSON options: no free whitespace (a sampled model could otherwise write spaces forever), the
# separators a model has seen most: {"a": 1, "b": [1, 2]}.
_JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Compiled grammars kept per compiler (by grammar text), least recently used dropped first.
_CACHE_SIZE = 256


def grammar_text(spec: StructuredOutputsParams) -> str:
    """llguidance's grammar text for a spec (the cache key). SamplingParamsError if it cannot be built."""
    try:
        if spec.json is not None:
            return llguidance.LLMatcher.grammar_from_json_schema(spec.json, defaults=_JSON_OPTIONS)
        if spec.json_object:
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=_JSON_OPTIONS)
        if spec.regex is not None:
            return llguidance.LLMatcher.grammar_from_regex(spec.regex)
        if spec.choice is not None:
            return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec.choice))
        return llguidance.grammar_from("grammar", spec.grammar)  # Lark, or GBNF converted to Lark
    except ValueError as e:
        raise SamplingParamsError(f"structured_outputs.{_kind(spec)}: {e}", "structured_outputs") from None


def _kind(spec: StructuredOutputsParams) -> str:
    return next(name for name in ("json", "regex", "choice", "grammar", "json_object")
                if getattr(spec, name) not in (None, False))


class GrammarCompiler:
    """Compiles grammars against one tokenizer's vocabulary and caches them by grammar text."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: list[int]) -> None:
        """tokenizer: tokenmill's Tokenizer (its ``backend`` is a ``tokenizers.Tokenizer``, whose
        JSON llguidance reads to get every token's bytes); vocab_size: the model's logits width."""
        self.vocab_size = vocab_size
        self.ll_tokenizer = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size,
                                                   eos_token=list(eos_token_ids))
        self._cache: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()  # requests are validated on the API threads and the core's

    def compile(self, spec: StructuredOutputsParams) -> llguidance.LLMatcher:
        """The compiled matcher for spec (in its start state; copy it before use).

        SamplingParamsError with llguidance's message for an invalid or unsupported grammar."""
        text = grammar_text(spec)
        with self._lock:
            matcher = self._cache.get(text)
            if matcher is not None:
                self._cache.move_to_end(text)
                return matcher
        matcher = llguidance.LLMatcher(self.ll_tokenizer, text, log_level=0)
        if matcher.is_error():
            raise SamplingParamsError(f"structured_outputs.{_kind(spec)}: {matcher.get_error()}",
                                      "structured_outputs")
        with self._lock:
            self._cache[text] = matcher
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return matcher

    def grammar(self, spec: StructuredOutputsParams) -> Grammar:
        """A fresh matcher for one sequence."""
        return Grammar(self.compile(spec).deep_copy(), self.vocab_size)


@functools.lru_cache(maxsize=8)
def grammar_compiler(tokenizer: Any, vocab_size: int, eos_token_ids: tuple[int, ...]) -> GrammarCompiler:
    """The compiler of a tokenizer (building llguidance's view of a vocabulary takes ~0.2 s: once)."""
    return GrammarCompiler(tokenizer, vocab_size, list(eos_token_ids))


class Grammar:
    """One sequence's position in its grammar. Only the scheduler calls the methods that move it."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self._matcher = matcher
        self.num_words = (vocab_size + 31) // 32

    def bitmask(self, draft_token_ids: list[int]) -> torch.Tensor:
        """[1 + len(drafts), ceil(V / 32)] int32: row j allows the tokens that may follow drafts[:j].

        The drafts are consumed to reach each row's state and rolled back afterwards, so the state
        is unchanged; they must be valid (``valid_prefix``)."""
        import torch  # the engine core's side only (see the module docstring)

        rows = []
        for token in [*draft_token_ids, None]:
            rows.append(self.allowed_now())
            if token is not None and not self._matcher.consume_token(token):
                raise RuntimeError(f"grammar rejected draft token {token}: {self._matcher.get_error()}")
        if draft_token_ids:
            self._matcher.rollback(len(draft_token_ids))
        return torch.from_numpy(np.stack(rows))

    def allowed_now(self) -> np.ndarray:
        """[ceil(V / 32)] int32 bitmask of the tokens allowed in the current state (bit t % 32 of word t // 32)."""
        row = np.full(self.num_words, -1, dtype=np.int32)
        self._matcher.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)
        return row

    def valid_prefix(self, token_ids: list[int]) -> int:
        """How many of token_ids (from the current state on) the grammar allows."""
        return self._matcher.validate_tokens(token_ids)

    def accept(self, token_id: int) -> bool:
        """Advance by a sampled token; False when the grammar does not allow it."""
        return self._matcher.consume_token(token_id)

    @property
    def is_terminated(self) -> bool:
        """The output is complete: the grammar allows nothing more (but EOS)."""
        return self._matcher.is_stopped()

    @property
    def error(self) -> str | None:
        return self._matcher.get_error() if self._matcher.is_error() else None

    def fork(self) -> Grammar:
        """A copy at the same state (the n samples of a request fork after their first token)."""
        return Grammar(self._matcher.deep_copy(), self.num_words * 32)


def is_allowed(bitmask_row: Any, token_id: int) -> bool:
    """Whether a bitmask row [ceil(V / 32)] int32 (numpy or torch) allows token_id."""
    return bool((int(bitmask_row[token_id // 32]) >> (token_id % 32)) & 1)


def num_allowed(bitmask_row: np.ndarray) -> int:
    """How many tokens a numpy bitmask row [ceil(V / 32)] int32 allows."""
    return int(np.unpackbits(np.ascontiguousarray(bitmask_row).view(np.uint8)).sum())
