"""Text Generation Inference (TGI) compatible routes.

``POST /generate`` returns one object, ``POST /generate_stream`` one SSE event per token, and
``POST /`` is TGI's compatibility route that the ``text-generation`` client calls (a list with
one object, or the stream when ``"stream": true``). Also ``GET /info`` and ``GET /health``; TGI's
``POST /tokenize`` body is answered by vllm_api.py's route. Shapes follow TGI's OpenAPI schema;
errors use the server's OpenAI shape.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

import tokenmill
from tokenmill.engine.async_engine import AsyncEngine, EngineDeadError, RequestFailedError
from tokenmill.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from tokenmill.sampling_params import MAX_N, MAX_STOP_STRINGS, SamplingParams
from tokenmill.server.protocol import ApiError, TgiParameters, TgiRequest
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

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> Response:
    """200 once every served model is loaded and its engine loop runs, 503 before."""
    state = get_state(request)
    if not state.all_ready():
        state.ready_engine()  # the first model's 503 (or its load error)
        raise ApiError(503, "a model is still loading; retry later", code="model_not_ready")
    return JSONResponse({})


@router.get("/info")
async def info(request: Request) -> dict[str, Any]:
    state = get_state(request)
    engine = state.ready_engine().info
    cfg = engine.config
    return {
        "model_id": engine.model_name, "model_sha": None, "model_dtype": engine.dtype,
        "model_device_type": engine.device.split(":")[0], "model_pipeline_tag": "text-generation",
        "max_concurrent_requests": cfg.max_num_seqs + state.max_queue, "max_best_of": MAX_N,
        "max_stop_sequences": MAX_STOP_STRINGS, "max_input_tokens": engine.max_model_len - 1,
        "max_total_tokens": engine.max_model_len, "max_batch_total_tokens": None,
        "max_batch_size": cfg.max_num_seqs, "max_waiting_tokens": None, "waiting_served_ratio": None,
        "validation_workers": 1, "max_client_batch_size": 1, "router": "tokenmill",
        "version": getattr(tokenmill, "__version__", "0.1.0"), "sha": None, "docker_label": None,
    }


@router.post("/generate", response_model=None)
async def generate(body: TgiRequest, request: Request) -> JSONResponse:
    job = await _submit(body, request)
    return await _generate_response(job, request, as_list=False)


@router.post("/generate_stream", response_model=None)
async def generate_stream(body: TgiRequest, request: Request) -> StreamingResponse:
    job = await _submit(body, request, stream=True)
    return StreamingResponse(_stream_events(job), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.post("/", response_model=None)
async def compat_generate(body: TgiRequest, request: Request) -> JSONResponse | StreamingResponse:
    """TGI's compatibility route: what the ``text-generation`` client posts to."""
    if body.stream:
        return await generate_stream(body, request)
    job = await _submit(body, request)
    return await _generate_response(job, request, as_list=True)


# -- request -> engine ------------------------------------------------------------------------------

@dataclass
class _Job:
    state: ServerState
    engine: AsyncEngine
    body: TgiRequest
    params: SamplingParams  # params.seed: the seed reported in details (None when greedy)
    prompt_ids: list[int]
    streams: list[Any]


async def _submit(body: TgiRequest, request: Request, stream: bool = False) -> _Job:
    state = get_state(request)
    p = body.parameters
    _reject_unsupported(p, stream)
    engine = check_admission(state, 1)
    tokenizer = engine.info.tokenizer
    if not body.inputs:
        raise ApiError(400, "inputs must not be empty", param="inputs")
    prompt_ids = await off_loop(tokenizer.encode, body.inputs)  # truncate >= 1: checked by TgiParameters
    if p.truncate:
        prompt_ids = prompt_ids[-p.truncate:]
    params = p.to_sampling_params()
    check_context(engine, len(prompt_ids), params.max_tokens, "max_new_tokens")
    await check_structured_outputs(engine, params, "grammar")
    streams = await add_requests(engine, [prompt_ids], params, [body.inputs])
    return _Job(state, engine, body, params, prompt_ids, streams)


def _reject_unsupported(p: TgiParameters, stream: bool) -> None:
    for name in ("typical_p", "adapter_id"):
        if getattr(p, name) is not None:
            raise ApiError(400, f"{name} is not supported by this server", param=name)
    if p.watermark:
        raise ApiError(400, "watermark is not supported by this server", param="watermark")
    if stream and (p.best_of or 1) > 1:
        raise ApiError(400, "best_of > 1 is not supported with streaming", param="best_of")


# -- engine -> response -----------------------------------------------------------------------------

def _finish_reason(c: CompletionOutput) -> str:
    if c.finish_reason == "length":
        return "length"
    if isinstance(c.stop_reason, str):
        return "stop_sequence"
    return "eos_token"


def _special_ids(tokenizer: Any) -> set[int]:
    ids = getattr(tokenizer, "all_special_ids", None) or getattr(tokenizer, "special_token_ids", None)
    return set(ids or []) | set(getattr(tokenizer, "eos_token_ids", []) or [])


def _token(tokenizer: Any, token_id: int, position: PositionLogprobs | None, special: set[int],
           text: str | None = None) -> dict[str, Any]:
    lp = position.get(token_id) if position else None
    if text is None:
        text = lp.decoded_token if lp is not None and lp.decoded_token is not None else tokenizer.decode([token_id])
    return {"id": token_id, "text": text, "logprob": lp.logprob if lp else None, "special": token_id in special}


def _top_tokens(tokenizer: Any, position: PositionLogprobs | None, k: int, special: set[int]
                ) -> list[dict[str, Any]]:
    if not position or not k:
        return []
    best = sorted(position, key=lambda t: -position[t].logprob)[:k]
    return [_token(tokenizer, t, position, special) for t in best]


def _sequence_details(job: _Job, out: RequestOutput, c: CompletionOutput) -> dict[str, Any]:
    tokenizer = job.engine.info.tokenizer
    special = _special_ids(tokenizer)
    positions = c.logprobs or [None] * len(c.token_ids)
    tokens = [_token(tokenizer, t, pos, special) for t, pos in zip(c.token_ids, positions, strict=False)]
    k = job.body.parameters.top_n_tokens or 0
    top = [_top_tokens(tokenizer, pos, k, special) for pos in positions] if k else None
    return {"generated_text": _full_text(job, c.text), "finish_reason": _finish_reason(c),
            "generated_tokens": len(c.token_ids), "seed": job.params.seed, "prefill": _prefill(job, out),
            "tokens": tokens, "top_tokens": top}


def _prefill(job: _Job, out: RequestOutput) -> list[dict[str, Any]]:
    if not job.body.parameters.decoder_input_details:
        return []
    tokenizer = job.engine.info.tokenizer
    positions = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
    prefill = []
    for token_id, pos in zip(out.prompt_token_ids, positions, strict=False):
        lp = pos.get(token_id) if pos else None
        prefill.append({"id": token_id, "text": tokenizer.decode([token_id]),
                        "logprob": lp.logprob if lp else None})
    return prefill


def _full_text(job: _Job, text: str) -> str:
    return job.body.inputs + text if job.body.parameters.return_full_text else text


async def _generate_response(job: _Job, request: Request, as_list: bool) -> JSONResponse:
    outputs = await run_to_end(request, job.engine, job.streams)
    out = outputs[0]
    # best_of: the sample with the highest cumulative logprob is the answer, the others are extra.
    ranked = sorted(out.outputs, key=lambda c: -(c.cumulative_logprob or 0.0))
    best = ranked[0]
    response: dict[str, Any] = {"generated_text": _full_text(job, best.text)}
    if job.body.parameters.details:
        details = _sequence_details(job, out, best)
        del details["generated_text"]
        if len(ranked) > 1:
            details["best_of_sequences"] = [_sequence_details(job, out, c) for c in ranked[1:]]
        response["details"] = details
    return JSONResponse([response] if as_list else response, headers=timing_headers(outputs))


async def _stream_events(job: _Job) -> AsyncIterator[str]:
    tokenizer = job.engine.info.tokenizer
    special = _special_ids(tokenizer)
    k = job.body.parameters.top_n_tokens or 0
    last_token: dict[str, Any] | None = None
    try:
        async for _, out in merge_streams(job.engine, job.streams):
            c = out.outputs[0]
            positions = c.delta_logprobs or [None] * len(c.delta_token_ids)
            n = len(c.delta_token_ids)
            for j, (token_id, pos) in enumerate(zip(c.delta_token_ids, positions, strict=False)):
                # The step's released text goes with its last token, so the texts concatenate to the output.
                last_token = _token(tokenizer, token_id, pos, special, c.delta_text if j == n - 1 else "")
                event: dict[str, Any] = {"index": len(c.token_ids) - n + j + 1, "token": last_token,
                                         "top_tokens": _top_tokens(tokenizer, pos, k, special) if k else None,
                                         "generated_text": None, "details": None}
                if out.finished and j == n - 1:
                    _add_final(job, event, c)
                yield sse(event)
            if out.finished and n == 0 and last_token is not None:
                event = {"index": len(c.token_ids), "token": {**last_token, "text": c.delta_text},
                         "top_tokens": None, "generated_text": None, "details": None}
                _add_final(job, event, c)
                yield sse(event)
    except (RequestFailedError, EngineDeadError) as exc:
        yield sse({"error": str(exc), "error_type": "generation"})


def _add_final(job: _Job, event: dict[str, Any], c: CompletionOutput) -> None:
    event["generated_text"] = _full_text(job, c.text)
    event["details"] = {"finish_reason": _finish_reason(c), "generated_tokens": len(c.token_ids),
                        "seed": job.params.seed}
