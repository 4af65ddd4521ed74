"""SamplingParams: how one request chooses its tokens and when it stops.

Field names follow vLLM so users need no translation. Every field is validated
here and a bad value raises ``SamplingParamsError`` (a ``ValueError``) naming the field and its
allowed range; its ``param`` carries the field's name as data, so an API can report it under
its own name for the field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_NUM_BEAMS = 16
MAX_N = 128
MAX_SEED = 2**63 - 1  # seeds are int64 >= 0 (vLLM's upper bound; the engine seeds torch with seed mod 2**63)


class SamplingParamsError(ValueError):
    """A bad SamplingParams value. ``param`` is the top-level field at fault ("logit_bias", not
    "logit_bias[5]"), None when no single field is."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param

    def __reduce__(self) -> tuple[type, tuple[str, str | None]]:
        # keep param when the error crosses a process boundary (ValueError pickles only the message)
        return type(self), (str(self), self.param)


@dataclass
class StructuredOutputsParams:
    """A constraint the output must satisfy, enforced token by token (engine/structured_output.py).

    Exactly one of:
    json: a JSON schema (a dict, or its JSON text): the output is one JSON value valid under it.
    regex: the whole output matches this regular expression (Rust ``regex`` syntax).
    choice: the output is exactly one of these strings.
    grammar: a context-free grammar in Lark syntax or llama.cpp's GBNF.
    json_object: True: the output is one JSON object (any keys).
    """

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar", "json_object")
                 if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise SamplingParamsError("structured_outputs: give exactly one of json, regex, choice, grammar, "
                                      f"json_object; got {given or 'none'}", "structured_outputs")
        if isinstance(self.json, str):
            try:
                self.json = json.loads(self.json)
            except json.JSONDecodeError as e:
                raise SamplingParamsError(f"structured_outputs.json: not valid JSON: {e}",
                                          "structured_outputs") from None
        if self.json is not None and not isinstance(self.json, dict):
            raise SamplingParamsError("structured_outputs.json: a JSON schema must be an object, got "
                                      f"{type(self.json).__name__}", "structured_outputs")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise SamplingParamsError(f"structured_outputs.{name} must be a non-empty string",
                                          "structured_outputs")
        if self.choice is not None and (not isinstance(self.choice, list) or not self.choice
                                        or not all(isinstance(c, str) and c for c in self.choice)):
            raise SamplingParamsError("structured_outputs.choice must be a non-empty list of non-empty strings",
                                      "structured_outputs")
        if self.json_object not in (None, True, False):
            raise SamplingParamsError("structured_outputs.json_object must be true or false", "structured_outputs")


@dataclass
class SamplingParams:
    """Per-request token selection and stopping.

    n: number of samples returned for the prompt (the prompt is prefilled once).
    max_tokens: most new tokens; None means up to the context length.
    min_tokens: EOS and stop_token_ids are masked until this many tokens are out.
    temperature: 0 means greedy; otherwise logits are divided by it.
    top_k: keep the k most likely tokens; 0 or -1 means off.
    top_p: keep the smallest set of tokens whose probability reaches top_p; 1 means off.
    min_p: drop tokens whose probability is below min_p times the top token's; 0 means off.
    presence_penalty, frequency_penalty: OpenAI semantics on output tokens, in [-2, 2].
    repetition_penalty: transformers semantics on prompt and output tokens; 1 means off.
    logit_bias: token id -> bias added to its logit, in [-100, 100].
    seed: seeds this request's own generator, in [0, 2**63 - 1]; None (not -1) draws a random one.
    stop: strings that end generation; cut from the text unless include_stop_str_in_output.
    stop_token_ids: token ids that end generation (besides EOS).
    ignore_eos: keep generating past EOS.
    logprobs: number of top alternatives reported per output token (the chosen one is always there).
    prompt_logprobs: the same for prompt tokens.
    skip_special_tokens: leave special tokens out of the text.
    num_beams: > 1 runs deterministic beam search with this many beams.
    length_penalty: beam score = sum_logprobs / generated_len ** length_penalty.
    early_stopping: beam search stopping rule (True, False or "never"), as in transformers.
    structured_outputs: a StructuredOutputsParams (or a dict of its fields) the output must satisfy;
        generation ends when the constraint is complete (see docs/structured_output.md).
    """

    n: int = 1
    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    structured_outputs: StructuredOutputsParams | None = None
    # Internal: the playground asks for the distribution after the controls too.
    return_processed_topk: int | None = field(default=None, repr=False)
    # Internal: the playground asks for beam search's per-step candidates.
    return_beam_trace: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.logit_bias:
            try:
                self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            except (TypeError, ValueError):
                raise SamplingParamsError("logit_bias must map token ids to numbers", "logit_bias") from None
        if self.top_k == -1:
            self.top_k = 0
        if isinstance(self.structured_outputs, dict):
            try:
                self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
            except TypeError as e:
                raise SamplingParamsError(f"structured_outputs: {e}", "structured_outputs") from None
        self._validate()

    def _validate(self) -> None:
        _check_int("n", self.n, 1, MAX_N)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, 1, None)
        _check_int("min_tokens", self.min_tokens, 0, None)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise SamplingParamsError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})",
                                      "min_tokens")
        _check_float("temperature", self.temperature, 0.0, None)
        _check_int("top_k", self.top_k, -1, None)
        _check_float("top_p", self.top_p, None, None)
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingParamsError(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        _check_float("min_p", self.min_p, 0.0, 1.0)
        _check_float("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_float("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _check_float("repetition_penalty", self.repetition_penalty, None, None)
        if not self.repetition_penalty > 0:
            raise SamplingParamsError(f"repetition_penalty must be > 0, got {self.repetition_penalty}",
                                      "repetition_penalty")
        for token_id, bias in (self.logit_bias or {}).items():
            if token_id < 0:
                raise SamplingParamsError(f"logit_bias: token id {token_id} must be >= 0", "logit_bias")
            _check_float(f"logit_bias[{token_id}]", bias, -100.0, 100.0, param="logit_bias")
        if self.seed is not None:
            if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
                raise SamplingParamsError(f"seed must be an integer in [0, {MAX_SEED}] (leave it unset for a random "
                                          f"seed), got {self.seed!r}", "seed")
        _check_float("length_penalty", self.length_penalty, None, None)
        self._validate_stops()
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, 0, MAX_LOGPROBS)
        if self.prompt_logprobs is not None:
            _check_int("prompt_logprobs", self.prompt_logprobs, 0, MAX_LOGPROBS)
        _check_int("num_beams", self.num_beams, 1, MAX_NUM_BEAMS)
        if self.early_stopping not in (True, False, "never"):
            raise SamplingParamsError(f"early_stopping must be true, false or 'never', got {self.early_stopping!r}",
                                      "early_stopping")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise SamplingParamsError("structured_outputs must be a StructuredOutputsParams", "structured_outputs")
        if self.num_beams > 1:
            self._validate_beam_search()

    def _validate_stops(self) -> None:
        if len(self.stop) > MAX_STOP_STRINGS:
            raise SamplingParamsError(f"stop: at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}", "stop")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise SamplingParamsError(f"stop: every entry must be a non-empty string, got {s!r}", "stop")
        for t in self.stop_token_ids:
            if not isinstance(t, int) or t < 0:
                raise SamplingParamsError(f"stop_token_ids: every entry must be a token id >= 0, got {t!r}",
                                          "stop_token_ids")

    def _validate_beam_search(self) -> None:
        if self.temperature > 0 and self.temperature != 1.0:
            raise SamplingParamsError("num_beams > 1 is deterministic beam search: temperature must be 0 or unset",
                                      "temperature")
        sampling = [name for name, on in (("top_k", self.top_k > 0), ("top_p", self.top_p < 1.0),
                                          ("min_p", self.min_p > 0)) if on]
        if sampling:
            raise SamplingParamsError("num_beams > 1 is deterministic beam search: top_k, top_p and min_p must be "
                                      "unset", sampling[0])
        if self.n > self.num_beams:
            raise SamplingParamsError(f"n ({self.n}) must be <= num_beams ({self.num_beams})", "n")
        if self.structured_outputs is not None:
            raise SamplingParamsError("num_beams > 1 (beam search) cannot be combined with structured outputs",
                                      "structured_outputs")

    @property
    def greedy(self) -> bool:
        """True when the next token is the argmax (temperature 0 or beam search)."""
        return self.temperature == 0.0 or self.num_beams > 1

    @property
    def use_beam_search(self) -> bool:
        return self.num_beams > 1


def _check_int(name: str, value: object, low: int | None, high: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SamplingParamsError(f"{name} must be an integer, got {value!r}", name)
    _check_range(name, value, low, high, name)


def _check_float(name: str, value: object, low: float | None, high: float | None, param: str | None = None) -> None:
    """``param``: the field to blame when ``name`` is a part of it (``logit_bias[5]``)."""
    param = param or name
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SamplingParamsError(f"{name} must be a number, got {value!r}", param)
    try:
        finite = math.isfinite(value)  # NaN and +-Infinity: JSON parsers accept both
    except OverflowError:  # an integer too large for a float
        finite = False
    if not finite:
        raise SamplingParamsError(f"{name} must be a finite number, got {str(value)[:40]}", param)
    _check_range(name, value, low, high, param)


def _check_range(name: str, value: float, low: float | None, high: float | None, param: str) -> None:
    if low is not None and high is not None and not low <= value <= high:
        raise SamplingParamsError(f"{name} must be in [{low}, {high}], got {value}", param)
    if low is not None and value < low:
        raise SamplingParamsError(f"{name} must be >= {low}, got {value}", param)
    if high is not None and value > high:
        raise SamplingParamsError(f"{name} must be <= {high}, got {value}", param)
