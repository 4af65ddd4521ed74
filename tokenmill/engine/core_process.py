"""The engine core in a process of its own, so the HTTP side never slows the forward pass.

The API process (``engine/core_client.py``) and this process talk over two ZeroMQ sockets on
``ipc://`` paths in a private temporary folder: requests, aborts and stop-string stops go in,
token-id outputs and engine stats come out. Messages are pickled dataclasses (both ends are the
same tokenmill, so nothing needs a schema; pickle is as fast as msgpack for these small objects).
The loop steps while there is work and otherwise blocks on the input socket, so an idle server
costs no CPU; it exits when told to, or when its parent process is gone.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import pickle
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import zmq

from tokenmill.config import EngineConfig
from tokenmill.engine.info import EngineInfo, EngineStats, EngineStepError
from tokenmill.engine.step import EngineCoreOutput, SequenceStop
from tokenmill.sampling_params import SamplingParams

if TYPE_CHECKING:
    from tokenmill.engine.core import EngineCore

logger = logging.getLogger(__name__)

IDLE_POLL_MS = 1000  # how often an idle core checks that its parent is still alive
# glibc keeps the pages of freed temporaries (a step's activations, megabytes each for prefill chunks of every
# size) and they add up to hundreds of MB over minutes of mixed traffic: hand them back this often while busy,
# and whenever the core falls idle. One trim costs ~10-15 ms here, one step's delay every 10 s (docs/memory.md).
TRIM_EVERY_S = 10.0


# ---- API process -> core --------------------------------------------------------------------------

@dataclass
class AddRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    cache_salt: str | None = None


@dataclass
class AbortRequests:
    request_ids: list[str]


@dataclass
class StopSequences:
    stops: list[SequenceStop]


@dataclass
class Shutdown:
    pass


# ---- core -> API process --------------------------------------------------------------------------

@dataclass
class CoreReady:
    """The model is loaded: the engine's facts (its ``tokenizer`` is None: the API process loads its own)."""

    info: EngineInfo


@dataclass
class CoreLoadFailed:
    message: str


@dataclass
class CoreOutputs:
    """One step's reports and the engine's stats after it."""

    outputs: list[EngineCoreOutput]
    stats: EngineStats
    failed: list[str] = field(default_factory=list)  # requests aborted because the step raised
    error: str | None = None


def send(socket: zmq.Socket, message: object) -> None:
    socket.send(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL), copy=False)


def receive(socket: zmq.Socket) -> object:
    return pickle.loads(socket.recv(copy=False).buffer)


def run_engine_core(config: EngineConfig, input_address: str, output_address: str) -> None:
    """Process entry: load the model, report ready, then serve requests until Shutdown."""
    # the engine (and torch) load here, in the core process: the API process imports this module for the
    # messages above and must not load torch (engine/info.py)
    from tokenmill.engine.core import EngineCore

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s [core]: %(message)s")
    context = zmq.Context()
    inbox = context.socket(zmq.PULL)
    inbox.connect(input_address)
    outbox = context.socket(zmq.PUSH)
    outbox.connect(output_address)
    try:
        try:
            core = EngineCore(config)
        except Exception as exc:  # noqa: BLE001 - reported to the API process, which shows it on /health
            logger.exception("failed to load the model %r", config.model)
            send(outbox, CoreLoadFailed(f"failed to load the model {config.model!r}: {exc}"))
            return
        send(outbox, CoreReady(dataclasses.replace(core.info, tokenizer=None)))
        _serve(core, inbox, outbox)
    finally:  # close with a short linger so the process can exit even if nobody reads its last message
        outbox.close(linger=1000)
        inbox.close(linger=0)
        context.term()


def _serve(core: EngineCore, inbox: zmq.Socket, outbox: zmq.Socket) -> None:
    from tokenmill.engine.kv_cache import release_freed_heap

    parent = multiprocessing.parent_process()
    last_trim, worked = time.monotonic(), False  # worked: steps ran since the last trim
    while True:
        # orphaned (the API process was killed): nobody will read our outputs. Checked every step, not only
        # when idle: a busy core would decode its requests to the end, then block once the unread outputs
        # fill the socket's queue, and never exit (seen with kill -9 under load, scripts/soak.py).
        if parent is not None and not parent.is_alive():
            return
        busy = core.has_unfinished()
        worked = worked or busy
        if worked and (not busy or time.monotonic() - last_trim >= TRIM_EVERY_S):
            release_freed_heap(collect=False)
            last_trim, worked = time.monotonic(), busy
        if not busy and not inbox.poll(IDLE_POLL_MS):
            continue
        while inbox.poll(0):
            if not _apply(core, receive(inbox), outbox):
                return
        if not core.has_unfinished():
            send(outbox, CoreOutputs([], core.stats()))  # e.g. an abort of a finished request
            continue
        try:
            outputs = core.step()
        except EngineStepError as exc:
            send(outbox, CoreOutputs([], core.stats(), failed=exc.request_ids, error=str(exc)))
            continue
        send(outbox, CoreOutputs(outputs, core.stats()))


def _apply(core: EngineCore, message: object, outbox: zmq.Socket) -> bool:
    """Apply one message from the API process; False for Shutdown."""
    if isinstance(message, AddRequest):
        try:
            core.add_request(message.prompt_token_ids, message.params, message.request_id,
                             arrival_time=message.arrival_time, cache_salt=message.cache_salt)
        except ValueError as exc:  # the API side validated it already: only a duplicate id gets here
            send(outbox, CoreOutputs([], core.stats(), failed=[message.request_id], error=str(exc)))
    elif isinstance(message, AbortRequests):
        for request_id in message.request_ids:
            core.abort(request_id)
    elif isinstance(message, StopSequences):
        core.stop_sequences(message.stops)
    elif isinstance(message, Shutdown):
        return False
    return True

