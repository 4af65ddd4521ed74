"""AsyncEngine: the LLMEngine loop in one background thread, an asyncio stream per request.

The engine is not thread-safe, so only the loop thread touches it. Coroutines hand it work
through two small queues (requests to add, ids to abort) and wake it with a condition; the
thread drains them between steps, runs ``step()`` and pushes each RequestOutput into the
asyncio.Queue of its request with ``loop.call_soon_threadsafe``. When nothing is running the
thread sleeps on the condition, so an idle server costs no CPU.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from tokenmill.engine.metrics import EngineMetrics
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop is not running (shut down, or not started)."""


class RequestFailedError(RuntimeError):
    """The engine raised while running this request; other requests go on."""


@dataclass
class _Pending:
    """A request waiting for the loop thread to call ``engine.add_request``."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None
    stream: RequestStream
    accepted: asyncio.Future[None]


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


class AsyncEngine:
    """Runs an LLMEngine in a background thread and serves many asyncio clients.

    engine: a loaded ``LLMEngine`` (or anything with its add_request/abort/step/
    has_unfinished/stats methods). metrics: where timings and gauges are recorded.
    """

    def __init__(self, engine: Any, metrics: EngineMetrics | None = None) -> None:
        self.engine = engine
        self.metrics = metrics or EngineMetrics()
        self._cond = threading.Condition()
        self._pending: list[_Pending] = []
        self._aborts: list[str] = []
        self._streams: dict[str, RequestStream] = {}  # touched only by the loop thread
        self._num_waiting = 0  # engine's waiting queue after the last drain/step
        self._stopping = False
        self._thread: threading.Thread | None = None

    @classmethod
    def from_config(cls, config: Any, metrics: EngineMetrics | None = None) -> AsyncEngine:
        """Load the model of ``config`` (an EngineConfig) and wrap it; call ``start()`` next."""
        from tokenmill.engine.llm_engine import LLMEngine

        return cls(LLMEngine(config), metrics)

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
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    # -- the coroutine side ----------------------------------------------------------------------

    def num_waiting(self) -> int:
        """Requests not yet running: submitted but not added, plus the engine's waiting queue."""
        with self._cond:
            return len(self._pending) + self._num_waiting

    async def add_request(self, prompt_token_ids: list[int], params: SamplingParams,
                          request_id: str | None = None, prompt: str | None = None) -> RequestStream:
        """Submit a request; returns its stream once the engine has accepted it.

        Raises ValueError when the engine rejects it (prompt too long, bad params for the
        model), and EngineDeadError when the loop is not running.
        """
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        loop = asyncio.get_running_loop()
        request_id = request_id or uuid.uuid4().hex
        stream = RequestStream(request_id, loop)
        pending = _Pending(request_id, list(prompt_token_ids), params, prompt, stream, loop.create_future())
        with self._cond:
            self._pending.append(pending)
            self._cond.notify()
        try:
            await pending.accepted
        except asyncio.CancelledError:
            self.abort(request_id)
            raise
        return stream

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

    def abort(self, request_id: str) -> None:
        """Abort a request from any thread or coroutine; its blocks are freed at the next step."""
        with self._cond:
            self._aborts.append(request_id)
            self._cond.notify()

    # -- the loop thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._pending or self._aborts or self._stopping or self.engine.has_unfinished()):
                    self._record_stats()  # idle: publish the final gauges (KV usage back to 0)
                    self._cond.wait()
                pending, self._pending = self._pending, []
                self._num_waiting += len(pending)  # still waiting until the next stats say otherwise
                aborts, self._aborts = self._aborts, []
                stopping = self._stopping
            if stopping:
                self._drain_on_shutdown(pending)
                return
            new_ids = self._add_pending(pending)
            if new_ids:
                self._record_stats()  # so num_waiting() counts them before the step ends
            for request_id in aborts:
                self._abort(request_id)
            if self.engine.has_unfinished():
                self._step(new_ids)
            self._record_stats()

    def _add_pending(self, pending: list[_Pending]) -> list[str]:
        added = []
        for p in pending:
            try:
                self.engine.add_request(p.prompt_token_ids, p.params, request_id=p.request_id,
                                        prompt=p.prompt, arrival_time=None)
            except Exception as exc:  # noqa: BLE001 - any rejection goes back to that caller only
                _resolve(p.accepted, exc if isinstance(exc, ValueError) else RequestFailedError(str(exc)))
                continue
            self._streams[p.request_id] = p.stream
            added.append(p.request_id)
            _resolve(p.accepted, None)
        return added

    def _abort(self, request_id: str) -> None:
        if request_id not in self._streams:
            return  # already finished, or failed
        try:
            self.engine.abort(request_id)
        except Exception:  # noqa: BLE001 - a failed abort must not stop the loop
            logger.exception("abort of request %s failed", request_id)

    def _step(self, new_ids: list[str]) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:  # noqa: BLE001
            self._fail_after_step_error(exc, new_ids)
            return
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue  # a request we already failed, reporting its abort
            stream.put(out)
            if out.finished:
                del self._streams[out.request_id]
                self.metrics.record_finished(out)

    def _fail_after_step_error(self, exc: Exception, new_ids: list[str]) -> None:
        """Fail only the requests that can have caused ``exc``.

        A request that breaks the engine almost always does so on its first step, so the
        requests added just before the failed step are the suspects. With no new request we
        cannot tell, and fail every running one rather than loop on the same error.
        """
        suspects = [r for r in new_ids if r in self._streams] or list(self._streams)
        logger.error("engine step failed; failing request(s) %s", suspects, exc_info=exc)
        for request_id in suspects:
            self._abort(request_id)
            self._streams.pop(request_id).put(RequestFailedError(f"request {request_id} failed: {exc}"))
            self.metrics.record_failed()

    def _drain_on_shutdown(self, pending: list[_Pending]) -> None:
        for p in pending:
            _resolve(p.accepted, EngineDeadError("the engine is shutting down"))
        for request_id in list(self._streams):
            self._abort(request_id)
        # One more step reports the aborts, so each client gets finish_reason "abort".
        if self._streams and self.engine.has_unfinished():
            self._step([])
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
        self._num_waiting = stats.num_waiting
        self.metrics.record_stats(stats)


def _resolve(future: asyncio.Future[None], exc: BaseException | None) -> None:
    """Complete ``future`` from the engine thread, on its own event loop."""

    def done() -> None:
        if future.done():
            return  # the caller went away (cancelled)
        if exc is None:
            future.set_result(None)
        else:
            future.set_exception(exc)

    future.get_loop().call_soon_threadsafe(done)
