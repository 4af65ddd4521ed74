"""AsyncEngine: the LLMEngine loop in one background thread, an asyncio stream per request.

Coroutines add and abort requests directly on the engine (its core has the one request queue
and the one lock; a rejection raises ValueError in the caller at once). The loop thread waits
until the core has work, runs ``step()`` and pushes each RequestOutput into the asyncio.Queue of
its request with ``loop.call_soon_threadsafe``. When nothing is running the thread sleeps on the
core's condition, so an idle server costs no CPU.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from tokenmill.engine.info import EngineInfo, EngineStats, EngineStepError
from tokenmill.engine.metrics import EngineMetrics
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop is not running (shut down, or not started)."""


class RequestFailedError(RuntimeError):
    """The engine raised while running this request; other requests go on."""


@dataclass
class RequestStream:
    """The asyncio side of one request: RequestOutputs (deltas) in engine order.

    Iterate it with ``async for``; iteration ends after the output with ``finished=True``
    and raises ``RequestFailedError`` if the engine failed this request.
    """

    request_id: str
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException] = field(default_factory=asyncio.Queue)
    finished: bool = False

    def put(self, item: RequestOutput | BaseException) -> None:
        """Thread-safe: called from the engine thread."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        while not self.finished:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                self.finished = True
                raise item
            self.finished = item.finished
            yield item


class StreamingEngine:
    """What the server's engines share: an asyncio stream per request, outputs handed to the streams,
    and requests failed with a RequestFailedError. Subclasses add requests and abort them."""

    metrics: EngineMetrics
    _streams: dict[str, RequestStream]

    async def add_request(self, prompt_token_ids: list[int], params: SamplingParams,
                          request_id: str | None = None, prompt: str | None = None,
                          cache_salt: str | None = None) -> RequestStream:
        raise NotImplementedError

    def abort(self, request_id: str) -> None:
        raise NotImplementedError

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str | None = None, prompt: str | None = None
                       ) -> AsyncIterator[RequestOutput]:
        """Add a request and yield its outputs; closing the iterator early aborts the request."""
        stream = await self.add_request(prompt_token_ids, params, request_id, prompt)
        try:
            async for out in stream:
                yield out
        finally:
            if not stream.finished:
                self.abort(stream.request_id)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Hand each output to its stream; a finished request's stream is dropped and its metrics recorded."""
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue  # a request already failed, reporting its abort
            stream.put(out)
            if out.finished:
                del self._streams[out.request_id]
                self.metrics.record_finished(out)

    def _fail(self, request_ids: list[str], reason: str) -> None:
        """End these requests' streams with a RequestFailedError (and count them as errors)."""
        for request_id in request_ids:
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                stream.put(RequestFailedError(f"request {request_id} failed: {reason}"))
                self.metrics.record_failed()


class AsyncEngine(StreamingEngine):
    """Runs an LLMEngine in a background thread and serves many asyncio clients.

    engine: a loaded ``LLMEngine``. metrics: where timings and gauges are recorded.
    """

    def __init__(self, engine: Any, metrics: EngineMetrics | None = None) -> None:
        self.engine = engine
        self.metrics = metrics or EngineMetrics()
        self._streams: dict[str, RequestStream] = {}
        self._stopping = False
        self._thread: threading.Thread | None = None

    @classmethod
    def from_config(cls, config: Any, metrics: EngineMetrics | None = None) -> AsyncEngine:
        """Load the model of ``config`` (an EngineConfig) and wrap it; call ``start()`` next."""
        from tokenmill.engine.llm_engine import LLMEngine

        return cls(LLMEngine(config), metrics)

    @property
    def info(self) -> EngineInfo:
        """The model and engine facts the API side needs (name, tokenizer, context length ...)."""
        return self.engine.info

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the loop thread (idempotent)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="tokenmill-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort whatever is still running, stop the thread and wait for it."""
        self._stopping = True
        self.engine.wake()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    # -- the coroutine side ----------------------------------------------------------------------

    def num_waiting(self) -> int:
        """Requests not yet running: submitted but not yet scheduled."""
        return self.engine.stats().num_waiting

    def stats(self) -> EngineStats:
        """The engine's stats now (an ``EngineStats``)."""
        return self.engine.stats()

    async def add_request(self, prompt_token_ids: list[int], params: SamplingParams,
                          request_id: str | None = None, prompt: str | None = None,
                          cache_salt: str | None = None) -> RequestStream:
        """Submit a request; returns its stream.

        Raises ValueError when the engine rejects it (prompt too long, bad params for the
        model), and EngineDeadError when the loop is not running.
        """
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        request_id = request_id or uuid.uuid4().hex
        stream = RequestStream(request_id, asyncio.get_running_loop())
        self._streams[request_id] = stream  # before the engine can report on it
        try:
            self.engine.add_request(prompt_token_ids, params, request_id=request_id, prompt=prompt,
                                    cache_salt=cache_salt)
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        return stream

    def abort(self, request_id: str) -> None:
        """Abort a request from any thread or coroutine; its blocks are freed at the next step."""
        if request_id in self._streams:
            self.engine.abort(request_id)

    # -- the loop thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            if not self.engine.wait_for_work(timeout=1.0):
                continue
            if self._stopping:
                break
            self._step()
            self._record_stats()
        self._drain_on_shutdown()

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except EngineStepError as exc:
            self._fail(exc.request_ids, str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - not a step error the core contained: fail every request
            logger.exception("engine step failed")
            for request_id in self._streams:
                self.engine.abort(request_id)
            self._fail(list(self._streams), str(exc))
            return
        self._deliver(outputs)

    def _drain_on_shutdown(self) -> None:
        for request_id in list(self._streams):
            self.engine.abort(request_id)
        # One more step reports the aborts, so each client gets finish_reason "abort".
        if self._streams and self.engine.has_unfinished():
            self._step()
        for stream in self._streams.values():
            stream.put(EngineDeadError("the engine shut down"))
        self._streams.clear()
        self._record_stats()

    def _record_stats(self) -> None:
        try:
            stats = self.engine.stats()
        except Exception:  # noqa: BLE001 - metrics must never stop the loop
            logger.exception("engine.stats() failed")
            return
        self.metrics.record_stats(stats)
