"""Request bodies of the HTTP APIs (pydantic), their conversion to SamplingParams, and the error
every route raises.

Models forbid unknown fields (a typo must not be silently ignored) and use strict types (the
string "0.7" is not a temperature). Fields that the OpenAI or TGI APIs define but tokenmill does
not implement are declared as ``Any = None`` and rejected by the routes with a 400 that names
them, so a client learns at once that e.g. ``tools`` had no effect.

Each body turns itself into SamplingParams with one ``to_sampling_params()``. A sampling field's
default lives in SamplingParams: a body field left at None takes it. SamplingParams validates;
its error becomes a 400 whose ``param`` is the body's own name for the field.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tokenmill.sampling_params import (
    MAX_LOGPROBS,
    MAX_NUM_BEAMS,
    SamplingParams,
    SamplingParamsError,
    StructuredOutputsParams,
)


class ApiError(Exception):
    """An error the client caused or must know about, rendered as OpenAI-shaped JSON."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error",
             429: "rate_limit_error", 500: "internal_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers  # extra response headers (Retry-After on a 429)

    def to_dict(self) -> dict[str, Any]:
        """``{"error": {"message", "type", "param", "code"}}``."""
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code}}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _no_lone_surrogates(cls, data: Any) -> Any:
        """JSON can spell a lone UTF-16 surrogate (``"\\ud800"``), which is no Unicode character: no tokenizer
        takes it and no response can echo it. A 400 naming the first field that holds one."""
        path = lone_surrogate_path(data)
        if path is not None:
            raise ApiError(400, f"{path}: the string holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff "
                                "escape), which is not valid Unicode", param=path)
        return data


_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate_path(data: Any) -> str | None:
    """Where in a parsed JSON value (dicts, lists, strings) a string or key holds a lone surrogate, as a
    field name (``messages[0].content``; ``body`` for the value itself); None when nowhere. Iterative: a
    deeply nested body must not overflow the stack."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str) and _SURROGATE.search(value):
            return path.encode("utf-8", "backslashreplace").decode() or "body"  # a key may hold one too
        if isinstance(value, dict):
            for key, item in reversed(value.items()):
                sub = f"{path}.{key}" if path else str(key)
                stack.append((sub, item))
                stack.append((sub, key))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item) for i, item in reversed(list(enumerate(value))))
    return None


class StreamOptions(Strict):
    include_usage: bool = False


class NullMeansDefault(Strict):
    """A body whose optional fields take their default when sent as an explicit ``null``, as OpenAI's
    API does (``"n": null`` is ``n=1``): clients such as text-generation's ``Client.chat`` send every field."""

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k not in cls.model_fields}
        return data


class SamplingControls(NullMeansDefault):
    """Fields with SamplingParams' names and meaning, shared by the OpenAI bodies and the
    playground's steps body; None (the default) means SamplingParams' default."""

    min_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    ignore_eos: bool | None = None

    def controls(self) -> dict[str, Any]:
        """The controls this body sets, as SamplingParams keyword arguments."""
        return _given(**{name: getattr(self, name) for name in SamplingControls.model_fields})


class SamplingFields(SamplingControls):
    """Fields shared by /v1/completions and /v1/chat/completions (OpenAI names + vLLM extras)."""

    model: str | None = None
    n: int = 1
    max_tokens: int | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # accepted for compatibility; not used
    stream: bool = False
    stream_options: StreamOptions | None = None
    best_of: int | None = None
    # Extras (vLLM names), not in OpenAI's API.
    num_beams: int | None = None
    length_penalty: float | None = None
    early_stopping: bool | Literal["never"] | None = None
    include_stop_str_in_output: bool | None = None
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = None
    # Prefix-cache isolation (vLLM's name): only requests with the same salt share cached KV blocks.
    cache_salt: str | None = Field(default=None, min_length=1)
    # vLLM's extra: the top-k logprobs of every prompt token (the whole prompt is computed, no cache hit)
    prompt_logprobs: int | None = None
    # Structured outputs: OpenAI's response_format, vLLM's structured_outputs and guided_* (one at most).
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def structured_outputs_field(self) -> tuple[StructuredOutputsParams | None, str | None]:
        """The body's output constraint and the field it came from; a 400 when several are set."""
        fields = {"structured_outputs": self.structured_outputs, "guided_json": self.guided_json,
                  "guided_regex": self.guided_regex, "guided_choice": self.guided_choice,
                  "guided_grammar": self.guided_grammar}
        if self.response_format is not None and self.response_format.get("type") != "text":
            fields["response_format"] = self.response_format
        given = [name for name, value in fields.items() if value is not None]
        if len(given) > 1:
            raise ApiError(400, f"give at most one of {', '.join(given)}", param=given[1])
        if not given:
            return None, None
        name = given[0]
        try:
            if name == "response_format":
                return response_format_params(self.response_format), name
            if name == "structured_outputs":
                return StructuredOutputsParams(**self.structured_outputs), name
            return StructuredOutputsParams(**{name.removeprefix("guided_"): fields[name]}), name
        except (SamplingParamsError, TypeError) as exc:
            raise ApiError(400, f"{name}: {exc}", param=name) from None

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None,
                         body_names: Mapping[str, str], prompt_logprobs: int | None = None) -> SamplingParams:
        """The shared conversion; each endpoint brings its max_tokens and logprobs (None: no limit,
        no logprobs), prompt_logprobs when it needs more than the body's, and its names for the
        SamplingParams fields it spells differently."""
        if self.prompt_logprobs is not None and self.stream:
            raise ApiError(400, "prompt_logprobs is not supported with stream", param="prompt_logprobs")
        if self.best_of is not None and self.best_of != self.n:
            raise ApiError(400, f"best_of ({self.best_of}) must equal n ({self.n}) or be unset", param="best_of")
        structured, field_name = self.structured_outputs_field()
        body_names = {**body_names, "structured_outputs": field_name or "structured_outputs"}
        return make_sampling_params(
            body_names, n=self.n, max_tokens=max_tokens, logprobs=logprobs, logit_bias=_logit_bias(self.logit_bias),
            structured_outputs=structured,
            **self.controls(), **_given(
                prompt_logprobs=self.prompt_logprobs if prompt_logprobs is None else prompt_logprobs,
                num_beams=self.num_beams, length_penalty=self.length_penalty, early_stopping=self.early_stopping,
                include_stop_str_in_output=self.include_stop_str_in_output, stop_token_ids=self.stop_token_ids,
                skip_special_tokens=self.skip_special_tokens))


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = None
    echo: bool = False
    suffix: Any = None  # unsupported

    @property
    def echo_only(self) -> bool:
        """``echo`` with ``max_tokens: 0``: the prompt (and its logprobs) back, nothing generated."""
        return self.echo and self.max_tokens == 0

    def to_sampling_params(self) -> SamplingParams:
        """With ``echo`` and ``logprobs: k`` the prompt tokens get their top-k logprobs too (the
        scoring path of evaluation harnesses). An echo-only request runs one step, whose token the
        route drops, as vLLM does."""
        prompt_logprobs = None
        if self.echo and self.logprobs is not None:
            prompt_logprobs = max(self.logprobs, self.prompt_logprobs or 0)
        return self._sampling_params(1 if self.echo_only else self.max_tokens, self.logprobs, {},
                                     prompt_logprobs)


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a "tool" message: the call it answers
    refusal: Any = None


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]
    logprobs: bool = False
    top_logprobs: int | None = None
    max_completion_tokens: int | None = None
    add_generation_prompt: bool = True
    # vLLM's extra: more variables for the chat template (e.g. {"enable_thinking": false})
    chat_template_kwargs: dict[str, Any] | None = None
    # Defined by OpenAI, not implemented here: rejected when set.
    tools: list[Any] | None = None  # validated in server/tool_calls.py
    tool_choice: str | dict[str, Any] | None = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None
    service_tier: Any = None
    store: Any = None
    metadata: Any = None

    @property
    def max_tokens_field(self) -> str:
        """The field that limits the output: max_completion_tokens when set (it wins), else max_tokens."""
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def to_sampling_params(self) -> SamplingParams:
        """``logprobs: true`` with ``top_logprobs: k`` is SamplingParams' ``logprobs=k``."""
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(max_tokens, logprobs,
                                     {"max_tokens": self.max_tokens_field, "logprobs": "top_logprobs"})


CHAT_UNSUPPORTED = ("functions", "function_call", "audio",
                    "prediction", "reasoning_effort", "web_search_options", "service_tier", "metadata")


class TgiParameters(Strict):
    """The ``parameters`` of a TGI /generate request (TGI's names and defaults)."""

    # SamplingParams field -> this body's name for it
    BODY_NAMES: ClassVar[dict[str, str]] = {"max_tokens": "max_new_tokens", "n": "best_of",
                                            "logprobs": "top_n_tokens", "prompt_logprobs": "decoder_input_details",
                                            "structured_outputs": "grammar"}

    best_of: int | None = None
    decoder_input_details: bool = False
    details: bool = False
    do_sample: bool = False
    frequency_penalty: float | None = None
    max_new_tokens: int | None = 100
    repetition_penalty: float | None = None
    return_full_text: bool = False
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    temperature: float | None = None
    top_k: int | None = None
    top_n_tokens: int | None = None
    top_p: float | None = None
    truncate: int | None = Field(default=None, ge=1)  # keep the last N prompt tokens (/generate, /tokenize)
    typical_p: Any = None  # unsupported
    watermark: bool = False  # true is rejected
    grammar: dict[str, Any] | None = None  # {"type": "json" | "regex" | "json_schema", "value": ...}
    adapter_id: Any = None  # unsupported

    def to_sampling_params(self) -> SamplingParams:
        """SamplingParams for these parameters; its ``seed`` is the one reported in ``details``.

        Like TGI, a request samples when do_sample is set or any sampling control differs from its
        neutral value; otherwise it is greedy. A sampled request without a seed gets a random one,
        reported back so the client can reproduce it.
        """
        sampling = self.do_sample or self.temperature not in (None, 1.0) or bool(self.top_k) \
            or self.top_p not in (None, 1.0)
        best_of = 1 if self.best_of is None else self.best_of
        if best_of > 1 and not sampling:
            raise ApiError(400, "best_of > 1 needs sampling: set do_sample, temperature, top_k or top_p",
                           param="best_of")
        if best_of > 1 and self.seed is not None:
            raise ApiError(400, "seed must not be set when best_of > 1", param="seed")
        seed = None
        if sampling and best_of == 1:
            seed = self.seed if self.seed is not None else random.getrandbits(63)
        return make_sampling_params(
            self.BODY_NAMES, n=best_of, max_tokens=self.max_new_tokens, seed=seed, stop=self.stop,
            logprobs=(self.top_n_tokens or 0) if (self.details or self.top_n_tokens or best_of > 1) else None,
            prompt_logprobs=0 if self.decoder_input_details else None,
            structured_outputs=self.structured_outputs(),
            **_given(temperature=self.temperature if sampling else 0.0, top_k=self.top_k, top_p=self.top_p,
                     repetition_penalty=self.repetition_penalty, frequency_penalty=self.frequency_penalty))


    def structured_outputs(self) -> StructuredOutputsParams | None:
        """TGI's grammar: a JSON schema (object or its text), a regex, or {"name", "schema"} (json_schema)."""
        if self.grammar is None:
            return None
        kind, value = self.grammar.get("type"), self.grammar.get("value")
        try:
            if kind == "json" and isinstance(value, (dict, str)):
                return StructuredOutputsParams(json=value)
            if kind == "regex" and isinstance(value, str):
                return StructuredOutputsParams(regex=value)
            if kind == "json_schema" and isinstance(value, dict) and isinstance(value.get("schema"), dict):
                return StructuredOutputsParams(json=value["schema"])
        except SamplingParamsError as exc:
            raise ApiError(400, f"grammar: {exc}", param="grammar") from None
        raise ApiError(400, 'grammar must be {"type": "json", "value": <JSON schema>}, {"type": "regex", "value": '
                            '<regex>} or {"type": "json_schema", "value": {"name", "schema"}}', param="grammar")


class TgiRequest(Strict):
    """POST /generate, /generate_stream and / (TGI's compatibility route)."""

    inputs: str
    parameters: TgiParameters = Field(default_factory=TgiParameters)
    stream: bool = False


class TokenizeRequest(NullMeansDefault):
    """POST /tokenize: TGI's body (``inputs``, ``parameters.truncate``) or vLLM's (``prompt``, or
    ``messages`` rendered with the chat template); exactly one of inputs, prompt and messages."""

    inputs: str | None = None
    parameters: TgiParameters | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    model: str | None = None
    add_special_tokens: bool | None = None  # vLLM's defaults: true for a prompt, false for messages
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False

    @property
    def form(self) -> str:
        """Which of "inputs", "prompt" and "messages" the body gives; a 400 unless exactly one."""
        given = [name for name in ("inputs", "prompt", "messages") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ApiError(400, "send exactly one of inputs (TGI), prompt or messages (vLLM); got "
                                f"{', '.join(given) or 'none'}", param=given[-1] if given else "prompt")
        return given[0]


class DetokenizeRequest(NullMeansDefault):
    """POST /detokenize (vLLM)."""

    tokens: list[int]
    model: str | None = None


# -- the playground's bodies (/v1/tokenize, /v1/playground/*) -----------------------------------------

class PlaygroundTokenizeRequest(Strict):
    """POST /v1/tokenize."""

    text: str
    chat_template: bool = False  # wrap text as one user message in the model's chat template
    add_generation_prompt: bool = True  # with chat_template: end with the assistant header
    model: str | None = None
    tokenizer: str | None = None  # instead of model: any name of GET /v1/playground/tokenizers


class PromptFields(Strict):
    """The prompt part shared by the steps and beam requests."""

    prompt: str
    chat_template: bool = True
    system: str | None = None
    model: str | None = None


class StepsRequest(PromptFields, SamplingControls):
    """POST /v1/playground/steps: the sampling controls plus how many candidates to report."""

    max_tokens: int = 32
    temperature: float = 0.7  # the page's default: sampled, so the processed distribution shows
    top_n: int = 10  # candidates per step, in [1, MAX_LOGPROBS]
    # a constraint ({"json" | "regex" | "choice" | "grammar": ...}): each step shows what it masked
    structured_outputs: dict[str, Any] | None = None

    def to_sampling_params(self) -> SamplingParams:
        if not 1 <= self.top_n <= MAX_LOGPROBS:
            raise ApiError(400, f"top_n must be in [1, {MAX_LOGPROBS}], got {self.top_n}", param="top_n")
        return make_sampling_params({"logprobs": "top_n"}, max_tokens=self.max_tokens, logprobs=self.top_n,
                                    return_processed_topk=self.top_n, **self.controls(),
                                    **_given(structured_outputs=self.structured_outputs))


class BeamRequest(PromptFields):
    """POST /v1/playground/beam."""

    num_beams: int = 4
    max_tokens: int = 16
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False

    def to_sampling_params(self) -> SamplingParams:
        """Deterministic beam search returning every beam, with the per-step trace."""
        if self.num_beams < 2:
            raise ApiError(400, f"num_beams must be in [2, {MAX_NUM_BEAMS}] for beam search, got {self.num_beams}",
                           param="num_beams")
        return make_sampling_params({}, num_beams=self.num_beams, n=self.num_beams, max_tokens=self.max_tokens,
                                    temperature=0.0, length_penalty=self.length_penalty,
                                    early_stopping=self.early_stopping, return_beam_trace=True)


# -- conversion helpers -------------------------------------------------------------------------------

def make_sampling_params(body_names: Mapping[str, str], **kwargs: Any) -> SamplingParams:
    """``SamplingParams(**kwargs)``, its error a 400 whose ``param`` is the body's field.

    ``body_names`` maps a SamplingParams field to the body field it came from where the two names
    differ; the message then leads with the body's name ("max_new_tokens: max_tokens must be ...").
    """
    try:
        return SamplingParams(**kwargs)
    except SamplingParamsError as exc:
        param = body_names.get(exc.param, exc.param) if exc.param else None
        message = str(exc) if param == exc.param else f"{param}: {exc}"
        raise ApiError(400, message, param=param) from None


def response_format_params(response_format: dict[str, Any]) -> StructuredOutputsParams | None:
    """OpenAI's response_format: {"type": "text"}, {"type": "json_object"} or
    {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}."""
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise ApiError(400, 'response_format: json_schema must be {"name": ..., "schema": {...}}',
                           param="response_format")
        return StructuredOutputsParams(json=spec.get("schema") or {})
    raise ApiError(400, 'response_format: type must be "text", "json_object" or "json_schema", '
                        f"got {kind!r}", param="response_format")


def _given(**kwargs: Any) -> dict[str, Any]:
    """The arguments that are not None: a field the body leaves unset takes SamplingParams' default."""
    return {name: value for name, value in kwargs.items() if value is not None}


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    """JSON object keys are strings; SamplingParams wants token ids."""
    if not bias:
        return None
    try:
        return {int(k): v for k, v in bias.items()}
    except ValueError:
        raise ApiError(400, "logit_bias keys must be token ids (integers as strings)", param="logit_bias") from None
