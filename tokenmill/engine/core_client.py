"""EngineCoreClient: the server's engine, with the engine core in its own process.

The API process keeps the tokenizer, validation, the OutputProcessor (detokenization, stop
strings, logprob entries) and an asyncio stream per request; the core process
(``engine/core_process.py``) runs the forward pass with all the torch threads. A receiver thread
here reads the core's outputs, turns them into RequestOutputs and hands them to the streams; it
also watches the core process: if it dies, every stream fails with EngineDeadError, ``is_running``
turns False (so /health answers 503) and ``on_death`` is called (``tokenmill serve`` exits 1).

It has the same interface as ``AsyncEngine`` (the in-process, threaded engine the tests use).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import multiprocessing
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable

import zmq

from tokenmill.config import EngineConfig
from tokenmill.engine.async_engine import EngineDeadError, RequestStream, StreamingEngine
from tokenmill.engine.core_process import (
    AbortRequests,
    AddRequest,
    CoreLoadFailed,
    CoreOutputs,
    CoreReady,
    Shutdown,
    StopSequences,
    receive,
    run_engine_core,
    send,
)
from tokenmill.engine.info import EngineInfo, EngineStats, leave_cores_to_the_engine, validate_request
from tokenmill.engine.metrics import EngineMetrics
from tokenmill.engine.output_processor import OutputProcessor
from tokenmill.model.source import load_tokenizer
from tokenmill.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

POLL_MS = 200  # the receiver checks that the core process is alive at least this often


class EngineCoreClient(StreamingEngine):
    """Starts the engine core process and serves many asyncio clients from it."""

    def __init__(self, config: EngineConfig, metrics: EngineMetrics | None = None,
                 on_death: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.metrics = metrics or EngineMetrics()
        self.on_death = on_death
        self.info: EngineInfo | None = None
        self.death: str | None = None  # why the core process is gone, once it is
        self._streams: dict[str, RequestStream] = {}
        self._stats: EngineStats | None = None
        self._num_sent = 0
        self._send_lock = threading.Lock()  # zmq sockets are not thread-safe: one sender at a time
        self._stopping = False
        self._folder = tempfile.mkdtemp(prefix="tokenmill-")
        self._context = zmq.Context()
        self._to_core = self._context.socket(zmq.PUSH)
        self._to_core.bind(f"ipc://{self._folder}/input")
        self._from_core = self._context.socket(zmq.PULL)
        self._from_core.bind(f"ipc://{self._folder}/output")
        self._process: multiprocessing.process.BaseProcess | None = None
        self._receiver: threading.Thread | None = None
        self.output_processor: OutputProcessor | None = None

    @classmethod
    def from_config(cls, config: EngineConfig, metrics: EngineMetrics | None = None,
                    on_death: Callable[[str], None] | None = None) -> EngineCoreClient:
        """Start the core process and wait until its model is loaded (raises RuntimeError if it fails)."""
        client = cls(config, metrics, on_death)
        try:
            client.load()
        except BaseException:
            client.shutdown()
            raise
        return client

    # -- lifecycle ---------------------------------------------------------------------------

    def load(self) -> None:
        """Spawn the core process and wait for its model (the API process loads only the tokenizer)."""
        leave_cores_to_the_engine()  # this process tokenizes and streams; the core computes
        tokenizer = load_tokenizer(self.config.model)  # a bad --model fails here, before any process starts
        spawn = multiprocessing.get_context("spawn")  # never fork a process that holds threads
        self._process = spawn.Process(target=run_engine_core, name="tokenmill-core", daemon=True,
                                      args=(self.config, f"ipc://{self._folder}/input",
                                            f"ipc://{self._folder}/output"))
        self._process.start()
        while not self._from_core.poll(POLL_MS):
            if not self._process.is_alive():
                raise RuntimeError(f"the engine core process exited with code {self._process.exitcode} "
                                   "while loading the model")
        message = receive(self._from_core)
        if isinstance(message, CoreLoadFailed):
            raise RuntimeError(message.message)
        assert isinstance(message, CoreReady)
        self.info = dataclasses.replace(message.info, tokenizer=tokenizer)
        self.output_processor = OutputProcessor(tokenizer)

    def start(self) -> None:
        """Start the receiver thread (idempotent)."""
        if self._receiver is not None and self._receiver.is_alive():
            return
        self._receiver = threading.Thread(target=self._receive_loop, name="tokenmill-core-client", daemon=True)
        self._receiver.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort what still runs (clients get finish_reason "abort"), stop the core process, clean up."""
        if self._streams and self.is_running:
            self._send(AbortRequests(list(self._streams)))
            deadline = time.monotonic() + min(timeout, 5.0)
            while self._streams and time.monotonic() < deadline and self.is_running:
                time.sleep(0.01)
        self._stopping = True
        if self._process is not None and self._process.is_alive():
            self._send(Shutdown())
            self._process.join(timeout)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(timeout)
        if self._receiver is not None:
            self._receiver.join(timeout)
        self._fail_all(EngineDeadError("the engine shut down"))
        self._to_core.close(linger=0)
        self._from_core.close(linger=0)
        self._context.term()
        shutil.rmtree(self._folder, ignore_errors=True)

    @property
    def is_running(self) -> bool:
        return (self._process is not None and self._process.is_alive() and self.death is None
                and not self._stopping and self._receiver is not None)

    # -- the coroutine side ----------------------------------------------------------------------

    def num_waiting(self) -> int:
        """Requests not yet running: the core's waiting queue plus those still on their way to it."""
        stats = self._stats
        if stats is None:
            return self._num_sent
        return stats.num_waiting + max(0, self._num_sent - stats.requests_received_total)

    def stats(self) -> EngineStats | None:
        """The core's stats after its last step (None before the first)."""
        return self._stats

    async def add_request(self, prompt_token_ids: list[int], params: SamplingParams,
                          request_id: str | None = None, prompt: str | None = None,
                          cache_salt: str | None = None) -> RequestStream:
        """Submit a request; returns its stream. ValueError when it can never run, EngineDeadError
        when the core is not running."""
        if not self.is_running:
            raise EngineDeadError(self.death or "the engine is not running")
        validate_request(self.info, prompt_token_ids, params)
        request_id = request_id or uuid.uuid4().hex
        self.output_processor.add_request(request_id, prompt, prompt_token_ids, params)
        stream = RequestStream(request_id, asyncio.get_running_loop())
        self._streams[request_id] = stream
        self._send(AddRequest(request_id, list(prompt_token_ids), params, time.perf_counter(), cache_salt))
        self._num_sent += 1
        return stream

    def abort(self, request_id: str) -> None:
        """Abort a request from any thread or coroutine; the core frees its blocks at its next step."""
        if request_id in self._streams and self.is_running:
            self._send(AbortRequests([request_id]))

    # -- the receiver thread -----------------------------------------------------------------------

    def _send(self, message: object) -> None:
        with self._send_lock:
            send(self._to_core, message)

    def _receive_loop(self) -> None:
        while not self._stopping:
            if not self._from_core.poll(POLL_MS):
                if not self._process.is_alive() and not self._stopping:
                    self._on_core_death()
                    return
                continue
            message = receive(self._from_core)
            if isinstance(message, CoreOutputs):
                self._handle(message)

    def _handle(self, message: CoreOutputs) -> None:
        self._stats = message.stats
        self.metrics.record_stats(message.stats)
        for request_id in message.failed:
            self.output_processor.remove_request(request_id)
        self._fail(message.failed, message.error)
        if not message.outputs:
            return
        outputs, stops = self.output_processor.process(message.outputs)
        if stops:
            self._send(StopSequences(stops))
        self._deliver(outputs)

    def _on_core_death(self) -> None:
        code = self._process.exitcode
        self.death = f"the engine core process died (exit code {code}); the server must restart"
        logger.error(self.death)
        self._fail_all(EngineDeadError(self.death))
        if self.on_death is not None:
            self.on_death(self.death)

    def _fail_all(self, error: Exception) -> None:
        for request_id, stream in list(self._streams.items()):
            stream.put(error)
            if self.output_processor is not None:
                self.output_processor.remove_request(request_id)
        self._streams.clear()

