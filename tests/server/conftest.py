"""The real server on the default model, started once per test session on a free port.

uvicorn runs in a thread of the test process, so tests reach both the HTTP API (``server.url``)
and the AsyncEngine behind it (``server.engine``). The model loads after startup; the fixture
polls /health and records the 503s it saw while loading.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from tokenmill.config import EngineConfig
from tokenmill.engine.async_engine import AsyncEngine
from tokenmill.server.app import create_app

# 8 sequences at a time: 20 concurrent clients exercise the waiting queue too. Float32 weights: the
# int4 kernels round activations to bf16, so a hidden state that differs in its last float32 bit
# between batch compositions (chunked prefill, padding of the decode batch) can move a logit by
# ~1e-3 and, now and then, a sampled token; the tests that compare seeded runs made in different
# batches need the float32 path, whose differences stay ~1e-7.
# float32 KV: a prefix-cache hit then rounds exactly like a fresh prompt, so repeated seeded requests repeat
# (a 16-bit cache needs --batch-invariant for that: docs/determinism.md); the default KV type is tested elsewhere
ENGINE = EngineConfig(max_model_len=512, max_num_seqs=8, kv_cache_memory_gb=0.1, seed=0,
                      dtype="float32", quantization="none", kv_cache_dtype="float32")
LOAD_TIMEOUT_S = 600  # the model loads in seconds, but the test machine's 2 cores are shared


@dataclass
class RunningServer:
    url: str
    app: FastAPI
    server: uvicorn.Server
    thread: threading.Thread
    health_statuses: list[int] = field(default_factory=list)

    @property
    def engine(self) -> AsyncEngine:
        return self.app.state.tokenmill.engine

    @property
    def model(self) -> str:
        return self.engine.info.model_name

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)

    @staticmethod
    def wait_until(predicate, timeout: float = 60.0, interval: float = 0.1) -> bool:
        """Poll ``predicate`` until it is true or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                return False
            time.sleep(interval)
        return True

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics, keyed like 'name{label="v"}'."""
        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return samples


def serve_in_thread(app: FastAPI) -> RunningServer:
    """Start uvicorn on a free port in a daemon thread; returns once it accepts connections."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    return RunningServer(f"http://127.0.0.1:{port}", app, server, thread)


def wait_until_ready(running: RunningServer) -> RunningServer:
    """Poll /health until the app's models are loaded (recording the statuses seen); fail the test if
    loading fails or takes longer than LOAD_TIMEOUT_S."""
    deadline = time.monotonic() + LOAD_TIMEOUT_S
    while True:
        status = httpx.get(f"{running.url}/health", timeout=30).status_code
        running.health_statuses.append(status)
        if status == 200:
            return running
        if time.monotonic() > deadline or running.app.state.tokenmill.load_error:
            running.stop()
            pytest.fail(f"the server did not become ready: {running.app.state.tokenmill.load_error}")
        time.sleep(0.1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_health(proc: subprocess.Popen, url: str, timeout: float) -> int | None:
    """Poll a server process's /health until it answers 200, the process exits or timeout passes;
    returns the last status seen (None if it never answered)."""
    deadline = time.monotonic() + timeout
    status = None
    while status != 200 and time.monotonic() < deadline and proc.poll() is None:
        try:
            status = httpx.get(f"{url}/health", timeout=10).status_code
        except httpx.TransportError:
            pass
        if status != 200:
            time.sleep(0.1)
    return status


@pytest.fixture(scope="session")
def server() -> Iterator[RunningServer]:
    running = wait_until_ready(serve_in_thread(create_app(ENGINE, max_queue=64)))
    yield running
    running.stop()


@pytest.fixture
def serve_app() -> Iterator:
    """Factory: serve another app (e.g. one sharing ``server.engine``) in a thread; stopped after the test."""
    started: list[RunningServer] = []

    def start(app: FastAPI) -> RunningServer:
        running = serve_in_thread(app)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()
