"""Request bodies of the HTTP APIs (pydantic) and the error every route raises.

Models forbid unknown fields (a typo must not be silently ignored) and use strict types (the
string "0.7" is not a temperature). Fields that the OpenAI or TGI APIs define but tokenmill does
not implement are declared as ``Any = None`` and rejected by the routes with a 400 that names
them, so a client learns at once that e.g. ``tools`` had no effect.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ApiError(Exception):
    """An error the client caused or must know about, rendered as OpenAI-shaped JSON."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error",
             429: "rate_limit_error", 500: "internal_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def to_dict(self) -> dict[str, Any]:
        """``{"error": {"message", "type", "param", "code"}}``."""
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code}}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(Strict):
    include_usage: bool = False


class SamplingFields(Strict):
    """Fields shared by /v1/completions and /v1/chat/completions (OpenAI names + vLLM extras)."""

    model: str | None = None
    n: int = 1
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # accepted for compatibility; not used
    stream: bool = False
    stream_options: StreamOptions | None = None
    best_of: int | None = None
    # Extras (vLLM names), not in OpenAI's API.
    top_k: int | None = None
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False
    include_stop_str_in_output: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = None
    echo: bool = False
    suffix: Any = None  # unsupported


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: Any = None  # unsupported
    refusal: Any = None


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]
    logprobs: bool = False
    top_logprobs: int | None = None
    max_completion_tokens: int | None = None
    add_generation_prompt: bool = True
    # Defined by OpenAI, not implemented here: rejected when set.
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    response_format: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None
    service_tier: Any = None
    store: Any = None
    metadata: Any = None


CHAT_UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "parallel_tool_calls", "audio",
                    "prediction", "reasoning_effort", "web_search_options", "service_tier", "metadata")


class TgiParameters(BaseModel):
    """The ``parameters`` of a TGI /generate request (TGI's names and defaults)."""

    model_config = ConfigDict(extra="forbid", strict=True)

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
    truncate: int | None = None
    typical_p: Any = None  # unsupported
    watermark: bool = False  # true is rejected
    grammar: Any = None  # unsupported
    adapter_id: Any = None  # unsupported


class TgiRequest(Strict):
    """POST /generate, /generate_stream and / (TGI's compatibility route)."""

    inputs: str
    parameters: TgiParameters = Field(default_factory=TgiParameters)
    stream: bool = False


class TokenizeRequest(Strict):
    """POST /tokenize."""

    inputs: str
    parameters: TgiParameters | None = None
