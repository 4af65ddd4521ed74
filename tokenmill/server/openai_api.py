"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models, /v1/models/{id}.

Response shapes follow OpenAI's API reference (so the official ``openai`` client parses them);
streaming uses server-sent events, one chunk per engine step and sample, ending with
``data: [DONE]``. Every body field is either honored or rejected with a 400 naming it.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

import tokenmill
from tokenmill.engine.async_engine import AsyncEngine, EngineDeadError, RequestFailedError
from tokenmill.outputs import CompletionOutput, RequestOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.logprobs import (
    TokenSpeller,
    chat_logprobs,
    completion_logprobs,
    echo_logprobs,
    join_logprobs,
    vllm_prompt_logprobs,
)
from tokenmill.server.protocol import (
    CHAT_UNSUPPORTED,
    ApiError,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    SamplingFields,
)
from tokenmill.server.serving import (
    ServerState,
    add_requests,
    check_admission,
    check_context,
    check_structured_outputs,
    get_state,
    merge_streams,
    off_loop,
    run_to_end,
    sse,
    timing_headers,
)
from tokenmill.server.tool_calls import ToolPlan, ToolStream, history_message

router = APIRouter()

# OpenAI's field for the backend configuration; a string (TGI's client rejects null)
SYSTEM_FINGERPRINT = f"tokenmill-{tokenmill.__version__}"


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    state = get_state(request)
    state.ready_engine()  # 503 until the first model is loaded
    return {"object": "list", "data": [_model_card(name, engine) for name, engine in state.engines.items()
                                       if engine.is_running]}


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request) -> dict[str, Any]:
    """One model by its served name or an alias (404 for a name this server does not serve)."""
    state = get_state(request)
    name = state.served_name(model_id)
    return _model_card(name, state.ready_engine(name))


def _model_card(name: str, engine: AsyncEngine) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "tokenmill",
            "max_model_len": engine.info.max_model_len}


@router.post("/v1/completions", response_model=None)
async def create_completion(body: CompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
    state = get_state(request)
    state.check_model(body.model)
    if body.suffix is not None:
        raise ApiError(400, "suffix is not supported", param="suffix")
    tokenizer = state.ready_engine(body.model).info.tokenizer
    prompts, texts = await off_loop(_completion_prompts, body.prompt, tokenizer)
    _check_stream_options(body)
    params = body.to_sampling_params()
    engine = _admit(state, prompts, params.max_tokens, "max_tokens", body.model)
    await check_structured_outputs(engine, params, body.structured_outputs_field()[1] or "structured_outputs")
    ctx = _Context(state, body, "cmpl", tokenizer, texts if body.echo else None, echo_only=body.echo_only)
    streams = await add_requests(engine, prompts, params, texts, cache_salt=body.cache_salt)
    if body.stream:
        return _sse_response(_stream_completion(ctx, engine, streams, params))
    outputs = await run_to_end(request, engine, streams)
    choices = [_completion_choice(ctx, i, o, c, params) for i, o in enumerate(outputs) for c in o.outputs]
    response = {"id": ctx.id, "object": "text_completion", "created": ctx.created, "model": ctx.model,
                "choices": choices, "usage": _usage(outputs, ctx.echo_only), "system_fingerprint": SYSTEM_FINGERPRINT}
    return JSONResponse(response, headers=timing_headers(outputs))


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(body: ChatCompletionRequest, request: Request
                                 ) -> JSONResponse | StreamingResponse:
    state = get_state(request)
    state.check_model(body.model)
    _reject_unsupported_chat(body)
    tokenizer = state.ready_engine(body.model).info.tokenizer
    tools = ToolPlan.from_body(body.tools, body.tool_choice, body.parallel_tool_calls)
    prompt_ids = await off_loop(chat_prompt_ids, tokenizer, body.messages, body.add_generation_prompt,
                                body.chat_template_kwargs, tools)
    _check_stream_options(body)
    params, constraint_field = _chat_sampling_params(body, tools)
    engine = _admit(state, [prompt_ids], params.max_tokens, body.max_tokens_field, body.model)
    await check_structured_outputs(engine, params, constraint_field)
    ctx = _Context(state, body, "chatcmpl", tokenizer)
    ctx.tools = tools if tools is not None and tools.mode != "none" else None
    streams = await add_requests(engine, [prompt_ids], params, cache_salt=body.cache_salt)
    if body.stream:
        return _sse_response(_stream_chat(ctx, engine, streams, params))
    outputs = await run_to_end(request, engine, streams)
    choices = [_chat_choice(ctx, c, params) for c in outputs[0].outputs]
    response = {"id": ctx.id, "object": "chat.completion", "created": ctx.created, "model": ctx.model,
                "choices": choices, "usage": _usage(outputs), "system_fingerprint": SYSTEM_FINGERPRINT}
    if body.prompt_logprobs is not None:
        response["prompt_logprobs"] = vllm_prompt_logprobs(outputs[0])
    return JSONResponse(response, headers=timing_headers(outputs))


# -- request -> engine input ------------------------------------------------------------------------

def _check_stream_options(body: SamplingFields) -> None:
    if body.stream_options is not None and not body.stream:
        raise ApiError(400, "stream_options is only allowed when stream is true", param="stream_options")


def _completion_prompts(prompt: Any, tokenizer: Any) -> tuple[list[list[int]], list[str | None]]:
    """Token ids and text of each prompt: a string, strings, token ids, or lists of token ids."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise ApiError(400, "prompt must not be empty", param="prompt")
    if isinstance(prompt[0], int):
        prompt = [prompt]
    vocab = tokenizer.vocab_size
    ids_list, texts = [], []
    for p in prompt:
        if isinstance(p, str):
            ids_list.append(tokenizer.encode(p))
            texts.append(p)
            continue
        if not p or any(t < 0 or t >= vocab for t in p):
            raise ApiError(400, f"prompt token ids must be a non-empty list of ids in [0, {vocab})",
                           param="prompt")
        ids_list.append(list(p))
        texts.append(None)
    return ids_list, texts


def _chat_sampling_params(body: ChatCompletionRequest, tools: ToolPlan | None) -> tuple[SamplingParams, str]:
    """The body's SamplingParams, with the grammar that forces a tool call when tool_choice asks for one;
    and the field to blame when the request's grammar does not compile."""
    params = body.to_sampling_params()
    constraint_field = body.structured_outputs_field()[1] or "structured_outputs"
    forced = tools.structured_outputs() if tools is not None else None
    if forced is None:
        return params, constraint_field
    if params.structured_outputs is not None:
        raise ApiError(400, f"tool_choice {tools.mode!r} cannot be combined with {constraint_field}",
                       param="tool_choice")
    try:
        return dataclasses.replace(params, structured_outputs=forced), "tools"
    except ValueError as exc:
        raise ApiError(400, f"tool_choice: {exc}", param="tool_choice") from None


def _message_text(i: int, message: ChatMessage) -> str:
    content = message.content
    if content is None:
        if message.role != "assistant":
            raise ApiError(400, f"messages[{i}].content is required for role {message.role!r}",
                           param=f"messages[{i}].content")
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for j, part in enumerate(content):
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ApiError(400, f"messages[{i}].content[{j}]: only parts of type 'text' are supported, "
                                f"got {part.get('type')!r}", param=f"messages[{i}].content[{j}].type")
        parts.append(part["text"])
    return "\n".join(parts)


# what chat_template_kwargs may not set: the route's own arguments of the template
_RESERVED_TEMPLATE_KWARGS = ("messages", "add_generation_prompt", "tokenize")


def chat_prompt_ids(tokenizer: Any, messages: list[ChatMessage], add_generation_prompt: bool,
                    template_kwargs: dict[str, Any] | None = None, tools: ToolPlan | None = None) -> list[int]:
    """The model's chat template applied to the messages (with extra template variables and the
    request's tools), as token ids."""
    if not messages:
        raise ApiError(400, "messages must contain at least one message", param="messages")
    for name in _RESERVED_TEMPLATE_KWARGS:
        if name in (template_kwargs or {}):
            raise ApiError(400, f"chat_template_kwargs must not set {name!r}", param="chat_template_kwargs")
    template = tokenizer.chat_template
    takes_tools = bool(template) and "tools" in template
    conversation = [history_message({"role": "system" if m.role == "developer" else m.role,
                                     "content": _message_text(i, m)}, m.tool_calls, m.tool_call_id, takes_tools)
                    for i, m in enumerate(messages)]
    if tools is not None:
        conversation, tool_kwargs = tools.conversation(conversation, template)
        template_kwargs = {**(template_kwargs or {}), **tool_kwargs}
    try:
        return list(tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                                  tokenize=True, **(template_kwargs or {})))
    except ValueError as exc:
        raise ApiError(400, f"messages: {exc}", param="messages") from None


def _reject_unsupported_chat(body: ChatCompletionRequest) -> None:
    for name in CHAT_UNSUPPORTED:
        if getattr(body, name) is not None:
            raise ApiError(400, f"{name} is not supported by this server", param=name)
    if body.modalities is not None and body.modalities != ["text"]:
        raise ApiError(400, "modalities: only [\"text\"] is supported", param="modalities")
    if body.store:
        raise ApiError(400, "store is not supported by this server", param="store")


def _admit(state: ServerState, prompts: list[list[int]], max_tokens: int | None, field_name: str,
           model: str | None) -> AsyncEngine:
    engine = check_admission(state, len(prompts), model)
    for ids in prompts:
        check_context(engine, len(ids), max_tokens, field_name)
    return engine


# -- engine output -> response ----------------------------------------------------------------------

class _Context(TokenSpeller):
    """Per-response constants: id, created, model name, and how to spell tokens."""

    def __init__(self, state: ServerState, body: SamplingFields, prefix: str, tokenizer: Any,
                 echo_texts: list[str | None] | None = None, echo_only: bool = False) -> None:
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = state.served_name(body.model)
        self.n = body.n
        super().__init__(tokenizer)
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)
        self.echo_texts = echo_texts
        self.echo_only = echo_only  # echo with max_tokens 0: the one generated token is dropped
        self.prompt_logprobs = body.prompt_logprobs is not None
        self.tools: ToolPlan | None = None  # chat with tools: answers may be tool calls

    def echo(self, i: int, out: RequestOutput) -> str:
        if self.echo_texts is None:
            return ""
        text = self.echo_texts[i]
        return text if text is not None else self.tokenizer.decode(out.prompt_token_ids)


def _completion_choice(ctx: _Context, i: int, out: RequestOutput, c: CompletionOutput,
                       params: SamplingParams) -> dict[str, Any]:
    echo = ctx.echo(i, out)
    token_ids, positions, text, finish = c.token_ids, c.logprobs, c.text, c.finish_reason
    if ctx.echo_only:
        token_ids, positions, text, finish = [], [], "", "length"
    logprobs = None
    if params.logprobs is not None:
        logprobs = completion_logprobs(ctx, token_ids, positions, params.logprobs, len(echo))
        if ctx.echo_texts is not None:
            logprobs = join_logprobs(echo_logprobs(ctx, out, params.logprobs), logprobs)
    choice = {"index": i * ctx.n + c.index, "text": echo + text, "logprobs": logprobs,
              "finish_reason": finish, "stop_reason": None if ctx.echo_only else c.stop_reason}
    if ctx.prompt_logprobs:
        choice["prompt_logprobs"] = vllm_prompt_logprobs(out)
    return choice


def _chat_choice(ctx: _Context, c: CompletionOutput, params: SamplingParams) -> dict[str, Any]:
    logprobs = chat_logprobs(ctx, c.token_ids, c.logprobs, params.logprobs or 0) \
        if params.logprobs is not None else None
    message: dict[str, Any] = {"role": "assistant", "content": c.text, "refusal": None}
    finish = c.finish_reason
    if ctx.tools is not None:
        content, calls = ctx.tools.parse(c.text)
        if calls:
            message.update(content=content, tool_calls=[call.to_dict() for call in calls])
            finish = "tool_calls" if finish == "stop" else finish
    return {"index": c.index, "message": message, "logprobs": logprobs, "finish_reason": finish,
            "stop_reason": c.stop_reason}


def _tool_delta(stream: ToolStream, c: CompletionOutput, finish: str | None) -> tuple[dict[str, Any], str | None]:
    """A streamed choice's delta and finish_reason when the request has tools (see ToolStream)."""
    delta = stream.delta(c.delta_text) or {}
    if finish:
        last, called = stream.finish()
        for key, value in (last or {}).items():
            delta[key] = delta.get(key, "") + value if key == "content" else value
        if called and finish == "stop":
            finish = "tool_calls"
    return delta, finish


def _usage(outputs: list[RequestOutput], echo_only: bool = False) -> dict[str, Any]:
    """Token counts of a response. One RequestOutput per prompt (its n samples are its outputs), so
    each prompt and its prefix-cache hits count once however many samples it has."""
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    cached = sum(o.num_cached_tokens for o in outputs)
    completion = 0 if echo_only else sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


# -- streaming --------------------------------------------------------------------------------------

def _sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _stream_with_errors(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Once the 200 is sent an error can only be an event; then the stream ends normally."""
    try:
        async for event in events:
            yield event
    except (RequestFailedError, EngineDeadError) as exc:
        yield sse(ApiError(500 if isinstance(exc, RequestFailedError) else 503, str(exc)).to_dict())
    yield sse("[DONE]")


def _chunk(ctx: _Context, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
    chunk = {"id": ctx.id, "object": obj, "created": ctx.created, "model": ctx.model, "choices": choices,
             "system_fingerprint": SYSTEM_FINGERPRINT}
    if ctx.include_usage:
        chunk["usage"] = None
    return chunk


def _final_usage_chunk(ctx: _Context, obj: str, finals: dict[int, RequestOutput]) -> str:
    chunk = _chunk(ctx, obj, [])
    chunk["usage"] = _usage([finals[i] for i in sorted(finals)], ctx.echo_only)
    return sse(chunk)


def _stream_completion(ctx: _Context, engine: AsyncEngine, streams: list[Any],
                       params: SamplingParams) -> AsyncIterator[str]:
    async def events() -> AsyncIterator[str]:
        finals: dict[int, RequestOutput] = {}
        started: set[tuple[int, int]] = set()  # (prompt, sample) that sent their echo
        done: set[tuple[int, int]] = set()  # (prompt, sample) that sent their finish_reason
        async for i, out in merge_streams(engine, streams):
            choices = []
            for c in out.outputs:
                key = (i, c.index)
                echo = "" if key in started else ctx.echo(i, out)
                started.add(key)
                token_ids, positions, text, finish = c.delta_token_ids, c.delta_logprobs, c.delta_text, c.finish_reason
                if ctx.echo_only:
                    token_ids, positions, text, finish = [], [], "", "length" if finish else None
                text = echo + text
                finish = finish if key not in done else None
                if not (text or token_ids or finish):
                    continue
                if finish:
                    done.add(key)
                lps = None
                if params.logprobs is not None:
                    lps = completion_logprobs(ctx, token_ids, positions, params.logprobs, len(echo))
                    if echo:
                        lps = join_logprobs(echo_logprobs(ctx, out, params.logprobs), lps)
                choices.append({"index": i * ctx.n + c.index, "text": text, "logprobs": lps,
                                "finish_reason": finish})
            if choices:
                yield sse(_chunk(ctx, "text_completion", choices))
            if out.finished:
                finals[i] = out
        if ctx.include_usage:
            yield _final_usage_chunk(ctx, "text_completion", finals)

    return _stream_with_errors(events())


def _stream_chat(ctx: _Context, engine: AsyncEngine, streams: list[Any],
                 params: SamplingParams) -> AsyncIterator[str]:
    async def events() -> AsyncIterator[str]:
        finals: dict[int, RequestOutput] = {}
        first = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                  "finish_reason": None} for i in range(ctx.n)]
        yield sse(_chunk(ctx, "chat.completion.chunk", first))
        done: set[int] = set()  # samples that sent their finish_reason
        tool_streams = {i: ToolStream(ctx.tools) for i in range(ctx.n)} if ctx.tools is not None else None
        async for i, out in merge_streams(engine, streams):
            choices = []
            for c in out.outputs:
                # one entry per sample and event, as OpenAI sends: the last tokens carry the finish_reason
                finish = c.finish_reason if c.finish_reason and c.index not in done else None
                if not (c.delta_text or c.delta_token_ids or finish):
                    continue
                if finish:
                    done.add(c.index)
                lps = chat_logprobs(ctx, c.delta_token_ids, c.delta_logprobs, params.logprobs or 0) \
                    if params.logprobs is not None and c.delta_token_ids else None
                delta = {"content": c.delta_text} if c.delta_text or c.delta_token_ids else {}
                if tool_streams is not None:
                    delta, finish = _tool_delta(tool_streams[c.index], c, finish)
                    if not delta and not finish and lps is None:
                        continue  # text held back: it may be a tool call
                choices.append({"index": c.index, "delta": delta, "logprobs": lps, "finish_reason": finish})
            if choices:
                yield sse(_chunk(ctx, "chat.completion.chunk", choices))
            if out.finished:
                finals[i] = out
        if ctx.include_usage:
            yield _final_usage_chunk(ctx, "chat.completion.chunk", finals)

    return _stream_with_errors(events())
