"""Engine replicas on Ray Serve behind one endpoint: the deployments, their client and their router.

One Ray Serve application, two deployments (``server/ray_serve.py`` builds and starts it):

* ``EngineReplica`` (N replicas): one engine each, with its own KV cache and torch threads (an
  ``AsyncEngine``: the engine loop in a thread of the replica's process; detokenization and stop
  strings happen there too). ``generate`` streams one request back as ``ReplicaChunk``s, the first
  empty as soon as the engine took the request.
* ``TokenmillIngress`` (one replica): the same FastAPI app as ``tokenmill serve`` (every OpenAI, TGI
  and playground route) whose engine is a ``ReplicaPool``: the pool tokenizes nothing itself (the
  routes do), validates the request, keys the prompt by its block hashes (``server/routing.py``)
  and sends it through a DeploymentHandle whose request router, ``PrefixRequestRouter``, picks the
  replica. Responses carry ``x-tokenmill-replica``, the replica(s) that ran them.

Faults: Ray restarts a replica that dies. Its in-flight requests fail with EngineDeadError (a 503, or
an error event in a stream); a request that a dead replica never took is sent to another one.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from ray.serve.request_router import (
    LocalityMixin,
    MultiplexMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenmill.config import EngineConfig
from tokenmill.engine.async_engine import AsyncEngine, EngineDeadError, RequestStream, StreamingEngine
from tokenmill.engine.info import EngineInfo, EngineStats, leave_cores_to_the_engine, validate_request
from tokenmill.engine.metrics import EngineMetrics
from tokenmill.model.source import load_tokenizer
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.protocol import ApiError
from tokenmill.server.replica_metrics import ReplicaStatsBook
from tokenmill.server.routing import (
    REPLICA_HEADER,
    PrefixAffinity,
    ReplicaChunk,
    ReplicaRequest,
    RoundRobin,
    prompt_block_hashes,
)
from tokenmill.server.serving import RETRY_AFTER_S

logger = logging.getLogger(__name__)

SUBMIT_ATTEMPTS = 3  # a request that a dying replica never took is retried on another this often


# ---- the engine replica ---------------------------------------------------------------------------

class EngineReplica:
    """One engine as a Ray Serve replica (deployed by ``ray_serve.build_application``)."""

    def __init__(self, config: EngineConfig) -> None:
        self.name = serve.get_replica_context().replica_id.unique_id
        self.engine = AsyncEngine.from_config(config)
        self.engine.start()
        import torch  # loaded with the engine anyway; the ingress, which imports this module, does not load it

        logger.info("replica %s: %s loaded, %d torch threads", self.name, self.engine.info.model_name,
                    torch.get_num_threads())

    def info(self) -> EngineInfo:
        """The engine's facts without the tokenizer (the ingress loads its own)."""
        return dataclasses.replace(self.engine.info, tokenizer=None)

    async def generate(self, request: ReplicaRequest) -> AsyncIterator[ReplicaChunk]:
        """Run one request; ValueError at once when the engine rejects it. Cancelling the call (the
        client went away) aborts the request."""
        stream = await self.engine.add_request(request.prompt_token_ids, request.params, request.request_id,
                                               request.prompt, request.cache_salt)
        try:
            yield self._chunk([])
            async for out in stream:
                yield self._chunk([out])
        finally:
            if not stream.finished:
                self.engine.abort(request.request_id)

    def _chunk(self, outputs: list) -> ReplicaChunk:
        return ReplicaChunk(self.name, outputs, self.engine.stats(), time.monotonic())

    def check_health(self) -> None:
        """Ray Serve's health check: a replica whose engine loop stopped is replaced."""
        if not self.engine.is_running:
            raise RuntimeError(f"replica {self.name}: the engine loop is not running")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


# ---- the router -----------------------------------------------------------------------------------

class PrefixRequestRouter(LocalityMixin, MultiplexMixin, RequestRouter):
    """Ray Serve's request router for EngineReplica: ``routing.PrefixAffinity`` (or round-robin) over
    the queue lengths Ray Serve tracks per replica. Ray then takes, in the order given, the first replica
    with room (fewer ongoing requests than ``max_ongoing_requests``).

    No FIFO mixin: each routing attempt must serve the request it ranked replicas for.
    """

    def initialize_state(self, routing: str = "prefix", imbalance: int = 8) -> None:
        self.routing = routing
        self.affinity = PrefixAffinity(imbalance)
        self.round_robin = RoundRobin()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        by_name = {r.replica_id.unique_id: r for r in candidate_replicas}
        if self.routing == "round-robin":
            ranks = self.round_robin.rank(list(by_name))
        else:
            request = _replica_request(pending_request)
            ranks = self.affinity.rank(request.block_hashes if request else [], await self._loads(candidate_replicas))
        return [[by_name[name] for name in rank] for rank in ranks]

    async def _loads(self, replicas: list[RunningReplica]) -> dict[str, int]:
        """Replica -> ongoing requests, from Ray Serve's cache, probing the replicas it has no fresh entry for."""
        loads, unknown = {}, []
        for r in replicas:
            n = self.replica_queue_len_cache.get(r.replica_id)
            if n is None:
                unknown.append(r)
            else:
                loads[r.replica_id.unique_id] = n
        if unknown:
            for r, n in await self._probe_queue_lens(unknown, 0):
                if n is not None:
                    loads[r.replica_id.unique_id] = n
        return loads

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        request = _replica_request(pending_request)
        if request is not None and request.block_hashes:
            self.affinity.record(request.block_hashes, replica_id.unique_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.affinity.forget([replica_id.unique_id])


def _replica_request(pending_request: PendingRequest | None) -> ReplicaRequest | None:
    if pending_request is None:
        return None
    return next((a for a in pending_request.args if isinstance(a, ReplicaRequest)), None)


# ---- the ingress side -----------------------------------------------------------------------------

# The replicas that ran the current HTTP request; ReplicaHeaderMiddleware sets it, the pool appends.
_ROUTED: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("tokenmill_routed", default=None)


class ReplicaPool(StreamingEngine):
    """The replicas as one engine for the server's routes (the interface of AsyncEngine).

    ``num_waiting`` counts the requests waiting for a replica with room: each replica holds up to its
    ``max_ongoing_requests`` (max_num_seqs running + max_queue waiting), so the server's 429 comes once
    every replica is full and max_queue more requests wait in front of them.
    """

    def __init__(self, handle: DeploymentHandle, info: EngineInfo, metrics: EngineMetrics | None = None) -> None:
        self.info = info
        self.metrics = metrics or EngineMetrics()
        self.book = ReplicaStatsBook(self.metrics)
        self._handle = handle.options(stream=True)
        self._streams: dict[str, RequestStream] = {}
        self._pumps: dict[str, asyncio.Task] = {}
        self._num_routing = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._prefix_keys = info.config.enable_prefix_caching

    @classmethod
    async def connect(cls, handle: DeploymentHandle, model: str) -> ReplicaPool:
        """Ask a replica for the engine's facts (waits until one has loaded) and load the tokenizer here."""
        info = await handle.info.remote()
        tokenizer = await asyncio.to_thread(load_tokenizer, model)
        return cls(handle, dataclasses.replace(info, tokenizer=tokenizer))

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    def shutdown(self, timeout: float = 10.0) -> None:
        for task in list(self._pumps.values()):
            if self._loop is not None:
                self._loop.call_soon_threadsafe(task.cancel)
        self._loop = None

    @property
    def is_running(self) -> bool:
        return self._loop is not None

    def num_waiting(self) -> int:
        return self._num_routing

    def stats(self) -> EngineStats:
        """The replicas' stats summed (each as of its last chunk)."""
        return self.book.total()

    async def add_request(self, prompt_token_ids: list[int], params: SamplingParams,
                          request_id: str | None = None, prompt: str | None = None,
                          cache_salt: str | None = None) -> RequestStream:
        """Route the request and return its stream once a replica's engine took it. ValueError when it can
        never run; ApiError 429 when Ray Serve's queue for the replicas is full; EngineDeadError when no
        replica could take it."""
        if not self.is_running:
            raise EngineDeadError("the server is not running")
        validate_request(self.info, prompt_token_ids, params)
        request_id = request_id or uuid.uuid4().hex
        hashes = prompt_block_hashes(prompt_token_ids, self.info.block_size, cache_salt) if self._prefix_keys else []
        request = ReplicaRequest(request_id, list(prompt_token_ids), params, prompt, cache_salt, hashes)
        responses, first = await self._submit(request)
        self.book.routed_to(first.replica)
        self.book.update(first.replica, first.stats, first.sent_at)
        routed = _ROUTED.get()
        if routed is not None:
            routed.append(first.replica)
        stream = RequestStream(request_id, asyncio.get_running_loop())
        self._streams[request_id] = stream
        self._pumps[request_id] = asyncio.ensure_future(self._pump(request_id, first.replica, responses))
        return stream

    def abort(self, request_id: str) -> None:
        """Cancel the call: Ray Serve cancels the replica's generator, which aborts the engine request."""
        task = self._pumps.get(request_id)
        if task is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(task.cancel)

    async def _submit(self, request: ReplicaRequest) -> tuple[DeploymentResponseGenerator, ReplicaChunk]:
        self._num_routing += 1
        try:
            for _ in range(SUBMIT_ATTEMPTS):
                responses = self._handle.generate.remote(request)
                try:
                    return responses, await responses.__anext__()
                except RayTaskError as exc:  # raised by the replica's engine: ValueError -> 400
                    raise exc.cause from None
                except RayActorError as exc:  # died before it took the request: another replica may
                    logger.warning("a replica died before taking request %s; routing it again: %s",
                                   request.request_id, exc)
                    died = exc
                except BackPressureError as exc:
                    raise ApiError(429, f"the server is busy: {exc}; retry later", code="queue_full",
                                   headers={"Retry-After": str(RETRY_AFTER_S)}) from None
                except DeploymentUnavailableError as exc:
                    raise EngineDeadError(f"no engine replica is available: {exc}") from None
                except BaseException:
                    responses.cancel()
                    raise
            raise EngineDeadError(f"the replicas died before taking the request: {died}")
        finally:
            self._num_routing -= 1

    async def _pump(self, request_id: str, replica: str, responses: DeploymentResponseGenerator) -> None:
        """Hand the replica's outputs to the request's stream until it finishes or fails."""
        try:
            async for chunk in responses:
                self.book.update(chunk.replica, chunk.stats, chunk.sent_at)
                self._deliver(chunk.outputs)
        except (asyncio.CancelledError, RequestCancelledError):
            responses.cancel()
            self._streams.pop(request_id, None)
            return
        except RayActorError as exc:
            logger.error("replica %s died with request %s in flight: %s", replica, request_id, exc)
            self.book.retire(replica)
            self._fail_dead(request_id, f"the engine replica {replica} died while running this request; "
                                        "retry it (the other replicas are serving)")
        except RayTaskError as exc:
            self._fail([request_id], str(exc.cause))
        except Exception as exc:  # noqa: BLE001 - whatever else Ray raises ends this request, not the server
            logger.exception("request %s failed on replica %s", request_id, replica)
            self._fail([request_id], f"{type(exc).__name__}: {exc}")
        finally:
            self._pumps.pop(request_id, None)
        if request_id in self._streams:
            self._fail([request_id], f"replica {replica} ended the request without finishing it")

    def _fail_dead(self, request_id: str, reason: str) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.put(EngineDeadError(reason))
            self.metrics.record_failed()


class ReplicaHeaderMiddleware:
    """Names the replica(s) that ran a request in the ``x-tokenmill-replica`` response header (pure ASGI,
    so streams pass untouched)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        routed: list[str] = []
        token = _ROUTED.set(routed)

        async def send_named(message: Message) -> None:
            if message["type"] == "http.response.start" and routed:
                value = ",".join(dict.fromkeys(routed)).encode()
                message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER.encode(), value)]}
            await send(message)

        try:
            await self.app(scope, receive, send_named)
        finally:
            _ROUTED.reset(token)


@dataclass
class IngressOptions:
    """What ``create_app`` takes besides the engine (api_key, max_queue, served_model_names ...)."""

    model: str
    app_options: dict[str, Any] = field(default_factory=dict)


@serve.ingress()
class TokenmillIngress:
    """The HTTP side: the server's FastAPI app over a ReplicaPool."""

    async def __init__(self, engine: DeploymentHandle, options: IngressOptions) -> None:
        leave_cores_to_the_engine()  # this process tokenizes and streams; the replicas compute
        self.options = options
        self.pool = await ReplicaPool.connect(engine, options.model)

    def __serve_build_asgi_app__(self) -> FastAPI:
        from tokenmill.server.app import create_app

        app = create_app(self.pool, **self.options.app_options)
        app.add_middleware(ReplicaHeaderMiddleware)
        return app

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.pool.shutdown()

