"""What the OpenAI and TGI routes share: the server state, admission checks, running requests.

A route turns its body into prompt token ids and SamplingParams (``body.to_sampling_params()``,
see protocol.py), then calls ``run_to_end`` (non-streaming) or ``merge_streams`` (streaming).
Both abort the engine requests when the HTTP client goes away, so its KV blocks are freed within
one engine step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from tokenmill.engine.async_engine import AsyncEngine, EngineDeadError, RequestFailedError, RequestStream
from tokenmill.engine.metrics import EngineMetrics
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.protocol import ApiError


@dataclass
class ServerState:
    """Everything a route needs, kept on ``app.state.tokenmill``."""

    metrics: EngineMetrics
    api_key: str | None = None
    max_queue: int = 256
    engine: AsyncEngine | None = None  # None while the model loads
    load_error: str | None = None
    extra_model_names: set[str] = field(default_factory=set)  # e.g. the --model argument

    def ready_engine(self) -> AsyncEngine:
        """The engine, or a 503 while the model is loading (or failed to load)."""
        if self.engine is None or not self.engine.is_running:
            message = self.load_error or "the model is loading; retry when GET /health returns 200"
            raise ApiError(503, message, code="model_not_ready")
        return self.engine

    @property
    def model_name(self) -> str:
        return self.ready_engine().info.model_name

    def check_model(self, requested: str | None) -> None:
        """404 for a model name this server does not serve (None means the default)."""
        name = self.model_name
        if requested is not None and requested not in {name, *self.extra_model_names}:
            raise ApiError(404, f"The model `{requested}` does not exist; this server serves `{name}`.",
                           param="model", code="model_not_found")


def get_state(request: Request) -> ServerState:
    return request.app.state.tokenmill


def check_admission(state: ServerState, num_requests: int) -> AsyncEngine:
    """The engine if ``num_requests`` more fit in the waiting queue, else 429."""
    engine = state.ready_engine()
    waiting = engine.num_waiting()
    if waiting + num_requests > state.max_queue:
        raise ApiError(429, f"the server is busy: {waiting} requests are waiting (max_queue={state.max_queue}); "
                            "retry later", code="queue_full")
    return engine


def check_context(engine: AsyncEngine, prompt_len: int, max_tokens: int | None, field_name: str) -> None:
    """400 when the prompt plus the requested tokens cannot fit in the model's context."""
    max_len = engine.info.max_model_len
    if prompt_len == 0:
        raise ApiError(400, "the prompt is empty", param="prompt")
    if prompt_len + (max_tokens or 1) > max_len:
        wanted = f"{prompt_len} in the prompt and {max_tokens} for {field_name}" if max_tokens else \
            f"{prompt_len} in the prompt and at least 1 to generate"
        raise ApiError(400, f"This model's maximum context length is {max_len} tokens; the request needs "
                            f"{prompt_len + (max_tokens or 1)} ({wanted}). Shorten the prompt or lower "
                            f"{field_name}.", param=field_name, code="context_length_exceeded")


async def add_requests(engine: AsyncEngine, prompts: list[list[int]], params: SamplingParams,
                       texts: list[str | None] | None = None, cache_salt: str | None = None) -> list[RequestStream]:
    """Submit one engine request per prompt; a rejection aborts the ones already added.

    cache_salt: requests share prefix-cache entries only with requests of the same salt."""
    streams: list[RequestStream] = []
    try:
        for i, ids in enumerate(prompts):
            streams.append(await engine.add_request(ids, params, prompt=texts[i] if texts else None,
                                                    cache_salt=cache_salt))
    except ValueError as exc:
        abort_all(engine, streams)
        raise ApiError(400, str(exc)) from None
    except EngineDeadError as exc:
        abort_all(engine, streams)
        raise ApiError(503, str(exc)) from None
    except BaseException:
        abort_all(engine, streams)
        raise
    return streams


def abort_all(engine: AsyncEngine, streams: list[RequestStream]) -> None:
    for s in streams:
        if not s.finished:
            engine.abort(s.request_id)


async def wait_for_disconnect(request: Request) -> None:
    """Return when the HTTP client closes the connection (the body is already read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_to_end(request: Request, engine: AsyncEngine, streams: list[RequestStream]) -> list[RequestOutput]:
    """The final output of each stream; aborts them all if the client disconnects first."""

    async def last(stream: RequestStream) -> RequestOutput:
        final = None
        async for out in stream:
            final = out
        if final is None:
            raise RequestFailedError(f"request {stream.request_id} ended without output")
        return final

    gathered = asyncio.ensure_future(asyncio.gather(*(last(s) for s in streams)))
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait({gathered, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not gathered.done():
            raise ApiError(499, "client disconnected")
        return _result(gathered)
    finally:
        watcher.cancel()
        if not gathered.done():
            gathered.cancel()
            with contextlib.suppress(BaseException):
                await gathered
        abort_all(engine, streams)


def _result(gathered: asyncio.Future[list[RequestOutput]]) -> list[RequestOutput]:
    try:
        return gathered.result()
    except RequestFailedError as exc:
        raise ApiError(500, str(exc), code="request_failed") from None
    except EngineDeadError as exc:
        raise ApiError(503, str(exc)) from None


async def merge_streams(engine: AsyncEngine, streams: list[RequestStream]
                        ) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(stream index, output) in arrival order; closing the iterator aborts what is unfinished.

    Starlette cancels a streaming response when its client disconnects; the cancellation lands
    here and the ``finally`` aborts the engine requests.
    """
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                queue.put_nowait((i, out))
            queue.put_nowait((i, None))
        except BaseException as exc:  # noqa: BLE001 - forwarded to the consumer
            queue.put_nowait((i, exc))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        abort_all(engine, streams)


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {payload}\n\n"


def timing_headers(outputs: list[RequestOutput]) -> dict[str, str]:
    """x-time-to-first-token / x-time-per-output-token (seconds), averaged over the requests."""
    ttfts = [o.metrics.ttft for o in outputs if o.metrics.ttft is not None]
    tpots = [o.metrics.tpot for o in outputs if o.metrics.tpot is not None]
    headers = {}
    if ttfts:
        headers["x-time-to-first-token"] = f"{sum(ttfts) / len(ttfts):.6f}"
    if tpots:
        headers["x-time-per-output-token"] = f"{sum(tpots) / len(tpots):.6f}"
    return headers
