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
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request

from tokenmill.engine.async_engine import AsyncEngine, EngineDeadError, RequestFailedError, RequestStream
from tokenmill.engine.info import grammar_compiler_for
from tokenmill.engine.metrics import EngineMetrics
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams, SamplingParamsError
from tokenmill.server.protocol import ApiError

# The model names TGI-style clients send when they have none: TGI ignores the field, text-generation and
# the TGI docs send "tgi", huggingface_hub's InferenceClient(base_url=...) sends "dummy". With one model
# served they mean it; with several a request must name one.
TGI_PLACEHOLDER_NAMES = frozenset({"tgi", "dummy"})


@dataclass
class ServerState:
    """Everything a route needs, kept on ``app.state.tokenmill``.

    Several models may be served at once (``tokenmill serve --model A --model B``): one engine each,
    with its own KV cache, keyed by served name in ``engines``. A request picks one by its ``model``
    field; no ``model`` (and the TGI routes, which have none) means the first. ``engine`` is the first.
    """

    metrics: EngineMetrics
    api_key: str | None = None
    max_queue: int = 256
    engine: AsyncEngine | None = None  # the first model's engine; None while it loads
    load_error: str | None = None
    extra_model_names: set[str] = field(default_factory=set)  # other names of the first model
    aliases: dict[str, str] = field(default_factory=dict)  # other name (its --model argument) -> served name
    # served name -> engine, in serving order; a name is in served_names from the start, in engines once loaded
    engines: dict[str, AsyncEngine] = field(default_factory=dict)
    served_names: list[str] = field(default_factory=list)

    def add_engine(self, name: str, engine: AsyncEngine) -> None:
        """Serve ``engine`` as ``name``; the first one added is the default (``engine``)."""
        if name not in self.served_names:
            self.served_names.append(name)
        self.engines[name] = engine
        if self.served_names[0] == name:
            self.engine = engine

    def _name(self, requested: str | None) -> str | None:
        """The served name ``requested`` means (None: the first model), or None when nothing is served yet."""
        if self.engine is not None and not self.served_names:
            self.add_engine(self.engine.info.model_name, self.engine)  # set directly by a caller
        if requested is None or requested in self.extra_model_names:
            return self.served_names[0] if self.served_names else None
        if requested in self.served_names:
            return requested
        if requested in self.aliases:
            return self.aliases[requested]
        by_model = [n for n, e in self.engines.items() if e.info.model_name == requested]
        if by_model:
            return by_model[0]
        if requested in TGI_PLACEHOLDER_NAMES and len(self.served_names) == 1:
            return self.served_names[0]
        return None

    def ready_engine(self, model: str | None = None) -> AsyncEngine:
        """The engine serving ``model`` (None: the first), or a 503 while it loads (or failed to load)."""
        name = self._name(model)
        engine = self.engines.get(name) if name is not None else None
        if engine is None or not engine.is_running:
            message = self.load_error or "the model is loading; retry when GET /health returns 200"
            raise ApiError(503, message, code="model_not_ready")
        return engine

    def all_ready(self) -> bool:
        """Every served model is loaded and running."""
        self._name(None)
        return bool(self.served_names) and all(
            n in self.engines and self.engines[n].is_running for n in self.served_names)

    @property
    def model_name(self) -> str:
        return self.served_name(None)

    def served_name(self, requested: str | None) -> str:
        """The name a response reports for a request that asked for ``requested``."""
        self.check_model(requested)
        name = self._name(requested)
        if name is None:
            self.ready_engine()  # 503
        return name

    def check_model(self, requested: str | None) -> None:
        """404 for a model name this server does not serve (None means the default)."""
        if requested is None or self._name(requested) is not None:
            return
        if not self.served_names:
            self.ready_engine()  # nothing declared yet: still loading (503)
        served = ", ".join(f"`{n}`" for n in self.served_names)
        raise ApiError(404, f"The model `{requested}` does not exist; this server serves {served}.",
                       param="model", code="model_not_found")


T = TypeVar("T")
RETRY_AFTER_S = 1  # seconds a 429 (queue full) asks the client to wait before it retries


async def off_loop(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a worker thread. For a request's CPU work on the API side (tokenizing, rendering a chat
    template): megabytes of text take seconds, and on the event loop they would stall /health and every open
    stream meanwhile. (Tokenizer.encode releases the GIL; a template renders in Python, sharing it.)"""
    return await asyncio.to_thread(fn, *args)


def get_state(request: Request) -> ServerState:
    return request.app.state.tokenmill


def check_admission(state: ServerState, num_requests: int, model: str | None = None) -> AsyncEngine:
    """The engine of ``model`` (None: the first) if ``num_requests`` more fit in its waiting queue, else 429
    (with Retry-After); a 400 when they could never fit, since retrying would not help."""
    state.check_model(model)
    engine = state.ready_engine(model)
    if num_requests > state.max_queue:
        raise ApiError(400, f"this request holds {num_requests} prompts but at most {state.max_queue} requests may "
                            f"wait (max_queue): send at most {state.max_queue} prompts per request",
                       param="prompt", code="too_many_prompts")
    waiting = engine.num_waiting()
    if waiting + num_requests > state.max_queue:
        raise ApiError(429, f"the server is busy: {waiting} requests are waiting (max_queue={state.max_queue}); "
                            "retry later", code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})
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


async def check_structured_outputs(engine: AsyncEngine, params: SamplingParams, field_name: str) -> None:
    """A 400 naming the body's field when the request's grammar (schema, regex ...) does not compile."""
    if params.structured_outputs is None:
        return
    try:
        await off_loop(grammar_compiler_for(engine.info).compile, params.structured_outputs)
    except SamplingParamsError as exc:
        raise ApiError(400, f"{field_name}: {exc}", param=field_name) from None


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
