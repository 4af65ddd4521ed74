"""The HTTP server: FastAPI app factory, auth, error handlers, lifespan, ``tokenmill serve``.

``create_app`` builds the app around an EngineConfig (the model loads in the background after
startup, and every model route answers 503 until it is ready) or around an AsyncEngine that the
caller owns. Routes live in openai_api.py and tgi_api.py; the playground's static page is served
at ``/`` and its optional router (tokenmill/server/playground_api.py, exporting ``router``) is
included when present. Routes reach the engine through ``request.app.state.tokenmill``
(a serving.ServerState).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import importlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenmill.config import DEFAULT_MODEL, EngineConfig
from tokenmill.engine.async_engine import AsyncEngine
from tokenmill.engine.core_client import EngineCoreClient
from tokenmill.engine.metrics import EngineMetrics
from tokenmill.server import openai_api, tgi_api, vllm_api
from tokenmill.server.protocol import ApiError
from tokenmill.server.serving import ServerState

logger = logging.getLogger(__name__)

PLAYGROUND_DIR = Path(__file__).parent / "playground"
OPEN_PATHS = ("/health", "/metrics")  # answer without the API key (probes, Prometheus); see protect_metrics
DEFAULT_MAX_QUEUE = 256
# Largest request body accepted (413 beyond): TGI's default payload limit. A full 8k-token context is ~50 kB of
# text or token ids, so this leaves room for many prompts in one body while a 10 MB body is refused unread.
DEFAULT_MAX_REQUEST_BYTES = 2_000_000
GRACEFUL_SHUTDOWN_S = 30


Engine = EngineConfig | AsyncEngine | EngineCoreClient


def create_app(engine: Engine | list[Engine], api_key: str | None = None,
               max_queue: int = DEFAULT_MAX_QUEUE, model_names: set[str] | None = None,
               on_load_error: Callable[[], None] | None = None,
               served_model_names: list[str] | None = None,
               playground_tokenizers: list[str] | None = None,
               max_request_bytes: int | None = DEFAULT_MAX_REQUEST_BYTES, protect_metrics: bool = False) -> FastAPI:
    """The FastAPI app.

    engine: an EngineConfig (after startup the app starts the engine core in its own process,
    which loads the model, and shuts it down with the app) or a running-or-not AsyncEngine /
    EngineCoreClient (the caller owns it; the app only starts it); or a list of either kind to serve
    several models, each with its own engine and KV cache, chosen by the request's ``model`` (the first
    is the default). served_model_names: one name per engine (default: the model's name); with one
    engine, several names are the name it reports and aliases it answers to too (as vLLM's
    ``--served-model-name A B``).
    api_key: when set, every route but /health, /metrics and the static page needs
    ``Authorization: Bearer <api_key>``. max_queue: most requests waiting for each engine before
    new ones get 429. model_names: extra names accepted in the ``model`` field for the first model.
    playground_tokenizers: tokenizer files the playground compares besides the models' (ValueError for a bad one).
    max_request_bytes: bodies larger than this get 413 without being read (None: no limit).
    protect_metrics: /metrics needs the API key too (default: open to Prometheus, like /health).
    """
    if max_queue < 0:
        raise ValueError(f"max_queue must be >= 0, got {max_queue}")
    if max_request_bytes is not None and max_request_bytes < 1:
        raise ValueError(f"max_request_bytes must be >= 1 (or None for no limit), got {max_request_bytes}")
    engines = list(engine) if isinstance(engine, list) else [engine]
    names, aliases = _served_names(engines, served_model_names)
    configs = [isinstance(e, EngineConfig) for e in engines]
    if any(configs) and not all(configs):
        raise ValueError("create_app: pass either EngineConfigs or engines, not a mix")
    metrics = EngineMetrics() if configs[0] else engines[0].metrics
    state = ServerState(metrics=metrics, api_key=api_key or None, max_queue=max_queue,
                        extra_model_names=set(model_names or ()), served_names=names, aliases=aliases)
    app = FastAPI(title="tokenmill", version="0.1.0", lifespan=_lifespan(engines, state, on_load_error))
    app.state.tokenmill = state
    _add_error_handlers(app)
    app.add_middleware(_AuthMiddleware, state=state, protect_metrics=protect_metrics)
    if max_request_bytes is not None:
        app.add_middleware(_BodyLimitMiddleware, max_bytes=max_request_bytes)
    app.add_middleware(_InternalErrorMiddleware)  # outermost of ours: also catches the auth middleware's errors
    app.add_api_route("/metrics", _metrics, methods=["GET"], include_in_schema=False)
    app.include_router(openai_api.router)
    app.include_router(tgi_api.router)
    app.include_router(vllm_api.router)
    _include_playground_router(app, playground_tokenizers or [])
    # Last: a mount at "/" would shadow any route added after it.
    app.mount("/", _PlaygroundFiles(directory=PLAYGROUND_DIR, html=True, check_dir=False), name="playground")
    app.openapi = lambda: _openapi_schema(app)
    return app


def _served_names(engines: list[Engine], names: list[str] | None) -> tuple[list[str], dict[str, str]]:
    """One distinct served name per engine: the given ones, else each model's own name; and the aliases
    (alias -> served name): a single engine's names after its first."""
    from tokenmill.model.source import served_model_name

    aliases: dict[str, str] = {}
    if names is not None and len(engines) == 1 and len(names) > 1:
        aliases = dict.fromkeys(names[1:], names[0])
        names = names[:1]
    if names is not None and len(names) != len(engines):
        raise ValueError(f"served_model_names: got {len(names)} names for {len(engines)} models "
                         "(give one name per model, or several names for a single model)")
    names = names or [served_model_name(e.model) if isinstance(e, EngineConfig) else e.info.model_name
                      for e in engines]
    if len(set(names)) != len(names):
        raise ValueError(f"served model names must be distinct, got {names}; name them with --served-model-name")
    return names, aliases


def _lifespan(engines: list[Engine], state: ServerState,
              on_load_error: Callable[[], None] | None) -> Callable[[FastAPI], Any]:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not isinstance(engines[0], EngineConfig):
            for name, engine in zip(state.served_names, engines, strict=True):
                engine.start()
                state.add_engine(name, engine)
            yield
            return
        # Load after startup so the port answers (503) while the weights load; one model after the other.
        loading = asyncio.create_task(_load_all(engines, state, on_load_error))
        try:
            yield
        finally:
            loading.cancel()
            for engine in list(state.engines.values()):
                await asyncio.to_thread(engine.shutdown)

    return lifespan


async def _load_all(configs: list[EngineConfig], state: ServerState,
                    on_load_error: Callable[[], None] | None) -> None:
    for name, config in zip(list(state.served_names), configs, strict=True):
        if not await _load(config, state, on_load_error, name):
            return
        if config.model != name:
            state.aliases.setdefault(config.model, name)  # the --model argument names it too


async def _load(config: EngineConfig, state: ServerState, on_load_error: Callable[[], None] | None,
                name: str) -> bool:
    def on_death(reason: str) -> None:  # the core process died: /health turns 503 and the server exits 1
        state.load_error = reason
        if on_load_error is not None:
            on_load_error()

    try:
        engine = await asyncio.to_thread(EngineCoreClient.from_config, config, state.metrics, on_death)
    except Exception as exc:  # noqa: BLE001 - reported on /health and in the log
        logger.exception("failed to load the model %r", config.model)
        state.load_error = f"failed to load the model {config.model!r}: {exc}"
        if on_load_error is not None:
            on_load_error()
        return False
    engine.start()
    state.add_engine(name, engine)
    logger.info("model %s loaded as %r; ready", engine.info.model_name, name)
    return True


async def _metrics(request: Request) -> Response:
    body, content_type = request.app.state.tokenmill.metrics.render()
    return Response(body, media_type=content_type)


def _include_playground_router(app: FastAPI, tokenizer_paths: list[str]) -> None:
    """Hook for the playground's own routes: tokenmill/server/playground_api.py's ``router`` (and its
    ``attach``, which loads the ``--playground-tokenizer`` files)."""
    try:
        module = importlib.import_module("tokenmill.server.playground_api")
    except ModuleNotFoundError as exc:
        if exc.name != "tokenmill.server.playground_api":
            raise
        return
    app.include_router(module.router)
    module.attach(app, tokenizer_paths)


class _PlaygroundFiles(StaticFiles):
    """The static page; any other method on an unknown path is a 404 (not StaticFiles' 405)."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        if scope["method"] not in ("GET", "HEAD"):
            raise StarletteHTTPException(404)
        return await super().get_response(path, scope)


# -- auth and errors --------------------------------------------------------------------------------

# What /openapi.json documents for every operation: the statuses the server sends for errors, in its one shape.
_ERROR_RESPONSES = {
    "400": "invalid request: the message names the field, and so does `param`",
    "401": "the API key is missing or wrong (with --api-key)",
    "404": "a model this server does not serve",
    "413": "the body is larger than --max-request-bytes",
    "429": "the waiting queue is full; retry after the Retry-After header's seconds",
    "503": "the model is loading, failed to load, or the engine is shutting down",
}
_ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}


def _openapi_schema(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema with the errors as sent: validation errors are 400 in OpenAI's shape (FastAPI would
    document a 422 with its own shape), plus the other error statuses every route may answer."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        schema.setdefault("components", {}).setdefault("schemas", {})["Error"] = _ERROR_SCHEMA
        error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                responses = operation.setdefault("responses", {})
                responses.pop("422", None)
                for status, description in _ERROR_RESPONSES.items():
                    responses.setdefault(status, {"description": description, "content": error})
        app.openapi_schema = schema
    return app.openapi_schema

class _AuthMiddleware:
    """401 for a missing or wrong bearer token when an API key is set (pure ASGI: streams untouched)."""

    def __init__(self, app: ASGIApp, state: ServerState, protect_metrics: bool = False) -> None:
        self.app = app
        self.state = state
        self.open_paths = tuple(p for p in OPEN_PATHS if not (protect_metrics and p == "/metrics"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.state.api_key or self._is_open(scope):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        # constant time: how long the comparison takes must not tell how much of a guess was right
        if not hmac.compare_digest(headers.get(b"authorization", b""), f"Bearer {self.state.api_key}".encode()):
            error = ApiError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                             code="invalid_api_key")
            await JSONResponse(error.to_dict(), status_code=401)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _is_open(self, scope: Scope) -> bool:
        path = scope["path"]
        if path in self.open_paths:
            return True
        if scope["method"] not in ("GET", "HEAD"):
            return False
        # The static playground page holds no data; its API calls carry the key.
        file = PLAYGROUND_DIR / path.lstrip("/")
        try:
            return path == "/" or file.resolve().is_relative_to(PLAYGROUND_DIR) and file.is_file()
        except (ValueError, OSError):  # a path no file can have ("embedded null byte", too long): not open
            return False


class _BodyTooLarge(StarletteHTTPException):
    def __init__(self, max_bytes: int) -> None:
        super().__init__(413)
        self.error = ApiError(413, f"the request body is larger than this server's limit of {max_bytes} bytes "
                                   "(tokenmill serve --max-request-bytes)", code="request_too_large")


class _BodyLimitMiddleware:
    """413 for a body over ``max_bytes``: at once when its Content-Length says so (the body is never read),
    else as soon as the bytes received pass the limit. (FastAPI's own ``max_body_size`` answers a plain-text
    413; the API's errors are OpenAI-shaped JSON.)"""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            error = _BodyTooLarge(self.max_bytes).error
            await JSONResponse(error.to_dict(), status_code=413)(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:  # an HTTPException passes FastAPI's body reading as it is
                raise _BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited, send)


class _InternalErrorMiddleware:
    """An unexpected error becomes a JSON 500 and the connection stays usable.

    Starlette's own last-resort handler sends its 500 and then re-raises, and uvicorn closes the
    keep-alive connection on an exception; here the error is logged and not re-raised. An error after
    the response started can only end that response (the client sees a truncated body or stream).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as exc:  # noqa: BLE001 - the last resort: reported to the client and the log
            logger.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if started:
                return
            error = ApiError(500, f"internal error: {type(exc).__name__}", code="internal_error")
            await JSONResponse(error.to_dict(), status_code=500)(scope, receive, send)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.to_dict(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(_validation_error(exc).to_dict(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc, _BodyTooLarge):
            return JSONResponse(exc.error.to_dict(), status_code=413)
        return JSONResponse(ApiError(exc.status_code, str(exc.detail)).to_dict(), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))


def _validation_error(exc: RequestValidationError) -> ApiError:
    """The first pydantic error as a 400 naming the field (``temperature``, ``messages[0].role``)."""
    errors = exc.errors()
    if not errors:
        return ApiError(400, "invalid request body")
    err = errors[0]
    if err.get("type") == "json_invalid":
        return ApiError(400, f"the body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}")
    if err.get("type") == "missing" and tuple(err.get("loc", ())) == ("body",):
        return ApiError(400, "the request body is missing (send a JSON object)")
    param = _param_name(err.get("loc", ()))
    if err.get("type") == "extra_forbidden":
        return ApiError(400, f"Unrecognized request argument supplied: {param}", param=param)
    if err.get("type") == "missing":
        return ApiError(400, f"{param} is required", param=param)
    return ApiError(400, f"{param}: {err.get('msg')} (got {err.get('input')!r})"[:500], param=param)


# pydantic's labels of a union's branches without brackets (others look like "list[int]", "function-after[...]");
# matched whole, so a field whose name starts with one ("stream", "stop") keeps its name
_BRANCH_LABELS = {"str", "int", "float", "bool", "none", "bytes", "list", "dict"}


def _param_name(loc: tuple[Any, ...]) -> str:
    """('body', 'messages', 0, 'role') -> 'messages[0].role'; drops pydantic's union-branch labels."""
    name = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif any(c in str(part) for c in "[],") or str(part).startswith("function-") or part in _BRANCH_LABELS:
            continue
        else:
            name += f".{part}" if name else str(part)
    return name or "body"


# -- tokenmill serve --------------------------------------------------------------------------------

def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The server-only flags of ``tokenmill serve`` (engine flags come from cli.add_engine_arguments)."""
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (default: env TOKENMILL_API_KEY)")
    g.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                   help="requests allowed to wait for each engine; more get 429")
    g.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES, metavar="N",
                   help="largest request body accepted; larger ones get 413 unread")
    g.add_argument("--protect-metrics", action="store_true",
                   help="with --api-key, /metrics needs the key too (default: open, like /health, for Prometheus)")
    g.add_argument("models", nargs="*", metavar="MODEL", default=[],
                   help="model(s) to serve, like --model; several: one engine (and KV cache budget) each")
    g.add_argument("--served-model-name", action="append", default=None, dest="served_model_names",
                   help="the name a model answers to in the API (repeat once per model, in order; with one "
                   "model, names after the first are aliases)")
    g.add_argument("--playground-tokenizer", action="append", default=None, dest="playground_tokenizers",
                   metavar="PATH", help="a tokenizer for the playground to compare (GGUF file, tokenizer.json "
                   "or HF folder); repeatable")


def run_server(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM; returns 0 after a graceful shutdown, 1 if the model failed to load."""
    import uvicorn

    from tokenmill.cli import engine_config_from_args, replica_config_from_args

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_request_bytes < 1:
        raise ValueError(f"--max-request-bytes must be >= 1, got {args.max_request_bytes}")
    models = [*args.models, *(args.model or [])] or [DEFAULT_MODEL]
    configs = [engine_config_from_args(argparse.Namespace(**{**vars(args), "model": m})) for m in models]
    api_key = args.api_key or os.environ.get("TOKENMILL_API_KEY") or None
    options = {"api_key": api_key, "max_queue": args.max_queue, "model_names": {models[0]},
               "served_model_names": args.served_model_names, "playground_tokenizers": args.playground_tokenizers,
               "max_request_bytes": args.max_request_bytes, "protect_metrics": args.protect_metrics}
    replicas = replica_config_from_args(args)
    if replicas is not None:  # Ray is imported only here
        from tokenmill.server.ray_serve import run_replicated_server
        return run_replicated_server(configs, replicas, options, args.host, args.port)
    server: uvicorn.Server | None = None

    def stop() -> None:
        if server is not None:
            server.should_exit = True

    app = create_app(configs if len(configs) > 1 else configs[0], on_load_error=stop, **options)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                                           timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S))
    print(f"tokenmill: serving {', '.join(models)} on http://{args.host}:{args.port} (loading...)", flush=True)
    # uvicorn re-raises the signal that stopped it once it is done; our no-op handlers make that
    # a clean exit (code 0) instead of a kill by SIGTERM or a KeyboardInterrupt.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 1 if app.state.tokenmill.load_error else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m tokenmill.server.app``: the same as ``tokenmill serve``."""
    from tokenmill.cli import add_engine_arguments

    parser = argparse.ArgumentParser(prog="tokenmill serve")
    add_engine_arguments(parser, several_models=True)
    add_serve_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_server(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
