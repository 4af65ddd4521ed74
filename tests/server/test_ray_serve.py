"""Two engine replicas (1 thread each) on a local Ray Serve instance behind one endpoint.

One deployment for the module, shut down at the end with every Ray process it started. The test that
kills a replica runs last. Outputs are compared with the one-process server of tests/server/conftest.py
(the same engine settings).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import ENGINE, RunningServer, free_port
from tokenmill.cli import main
from tokenmill.config import ReplicaConfig
from tokenmill.engine.async_engine import EngineDeadError
from tokenmill.engine.info import EngineStats
from tokenmill.sampling_params import SamplingParams
from tokenmill.server import ray_serve
from tokenmill.server.protocol import ApiError
from tokenmill.server.routing import REPLICA_HEADER, ReplicaChunk
from tokenmill.server.serving import ServerState, check_admission

ray_serve.import_ray(local=True)  # before anything imports ray: the local instance then binds the loopback
from ray.exceptions import ActorDiedError  # noqa: E402

from tokenmill.server.replicas import ReplicaPool  # noqa: E402

REPLICA_TITLE = "ray::ServeReplica:tokenmill:EngineReplica"  # the process title Ray gives each replica
TIMEOUT_S = 300


@dataclass
class Deployment:
    url: str

    def metrics(self) -> dict[str, float]:
        return RunningServer.metrics(self)  # type: ignore[arg-type] - it only reads .url


def _processes() -> dict[int, str]:
    """pid -> command line of every process of this user (Ray's included)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == os.getuid():
                    found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            except OSError:
                continue
    return found


def _ray_processes(session: str) -> list[int]:
    return [pid for pid, cmd in _processes().items() if session in cmd]


def _replica_pids() -> list[int]:
    return [pid for pid, cmd in _processes().items() if cmd.startswith(REPLICA_TITLE)]


@pytest.fixture(scope="module")
def replicas() -> Iterator[Deployment]:
    port = free_port()
    ray_serve.deploy(ENGINE, ReplicaConfig(num_replicas=2, threads_per_replica=1), {"max_queue": 64},
                     port=port, log_to_driver=False)
    import ray

    session = ray._private.worker._global_node.session_name  # on the command line of every Ray process
    try:
        yield Deployment(f"http://127.0.0.1:{port}")
    finally:
        ray_serve.shutdown()
        deadline = time.monotonic() + 60
        while _ray_processes(session) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _ray_processes(session), "Ray processes outlived ray.shutdown()"


def _post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=TIMEOUT_S)


def _stream_text(url: str, path: str, body: dict) -> tuple[str, str | None, list[dict]]:
    """The concatenated text of an OpenAI stream, its replica header and its error events."""
    text, errors = "", []
    with httpx.stream("POST", f"{url}{path}", json={**body, "stream": True}, timeout=TIMEOUT_S) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                errors.append(event)
                continue
            for choice in event["choices"]:
                text += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
        return text, r.headers.get(REPLICA_HEADER), errors


GREEDY = [("/v1/completions", {"prompt": "The three primary colors are", "max_tokens": 12, "temperature": 0}),
          ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Name a fruit."}], "max_tokens": 10,
                                    "temperature": 0}),
          ("/v1/completions", {"prompt": "Once upon a time, in a small village,", "max_tokens": 10, "temperature": 0.9,
                               "seed": 7})]


def _text(response: httpx.Response) -> str:
    choice = response.json()["choices"][0]
    return choice["text"] if "text" in choice else choice["message"]["content"]


def test_outputs_equal_the_one_process_server(replicas, server):
    for path, body in GREEDY:
        expected = _post(server.url, path, body)
        got = _post(replicas.url, path, body)
        assert got.status_code == 200, got.text
        assert _text(got) == _text(expected), (path, body)
        assert got.headers[REPLICA_HEADER]
        if path == "/v1/chat/completions":  # streamed too: the same text in deltas
            streamed, _, errors = _stream_text(replicas.url, path, body)
            assert not errors and streamed == _text(expected)


def test_twenty_concurrent_mixed_streams_complete(replicas):
    async def one(client: httpx.AsyncClient, i: int) -> tuple[str, str]:
        prompt = f"Write item {i} of a shopping list:"
        if i % 4 == 0:  # TGI's route
            body = {"inputs": prompt, "parameters": {"max_new_tokens": 8, "seed": i, "do_sample": True}}
            async with client.stream("POST", f"{replicas.url}/generate_stream", json=body) as r:
                lines = [line async for line in r.aiter_lines() if line.startswith("data:")]
                assert r.status_code == 200 and '"details"' in lines[-1], lines[-1:]
                return "tgi", r.headers[REPLICA_HEADER]
        body = {"prompt": prompt, "max_tokens": 8, "temperature": 0.7, "seed": i, "stream": i % 2 == 1}
        if not body["stream"]:
            r = await client.post(f"{replicas.url}/v1/completions", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
            return "json", r.headers[REPLICA_HEADER]
        async with client.stream("POST", f"{replicas.url}/v1/completions", json=body) as r:
            lines = [line async for line in r.aiter_lines() if line.startswith("data:")]
            assert r.status_code == 200 and lines[-1] == "data: [DONE]"
            assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")
            return "sse", r.headers[REPLICA_HEADER]

    async def main() -> list[tuple[str, str]]:
        async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
            return await asyncio.gather(*(one(client, i) for i in range(20)))

    done = asyncio.run(main())
    assert len(done) == 20
    assert len({replica for _, replica in done}) == 2  # both replicas served


def test_a_conversation_stays_on_its_replica_and_hits_its_cache(replicas):
    messages = [{"role": "system", "content": "You are a patient tutor who explains things in plain words."},
                {"role": "user", "content": "Explain what a prime number is, with two examples."}]
    first = _post(replicas.url, "/v1/chat/completions", {"messages": messages, "max_tokens": 16, "temperature": 0})
    assert first.status_code == 200, first.text
    messages += [first.json()["choices"][0]["message"], {"role": "user", "content": "And a composite number?"}]
    before = replicas.metrics()
    second = _post(replicas.url, "/v1/chat/completions", {"messages": messages, "max_tokens": 8, "temperature": 0})
    assert second.status_code == 200, second.text
    replica = first.headers[REPLICA_HEADER]
    assert second.headers[REPLICA_HEADER] == replica
    cached = second.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= first.json()["usage"]["prompt_tokens"] - ENGINE.block_size
    after = replicas.metrics()
    key = f'tokenmill_replica_prefix_cache_hit_tokens{{replica="{replica}"}}'
    assert after[key] - before[key] == cached
    assert after["tokenmill_prefix_cache_hits_total"] - before["tokenmill_prefix_cache_hits_total"] == cached


def test_metrics_add_up_the_replicas(replicas):
    metrics = replicas.metrics()
    labelled = {k: v for k, v in metrics.items() if k.startswith("tokenmill_replica_requests_routed_total")}
    assert len(labelled) == 2 and all(v > 0 for v in labelled.values())
    finished = sum(v for k, v in metrics.items() if k.startswith("tokenmill_requests_total"))
    assert finished == sum(labelled.values())  # every routed request finished and was counted once
    assert metrics["tokenmill_generation_tokens_total"] > 0


def test_bench_url_works_unchanged(replicas, capsys):
    argv = ["bench", "--url", replicas.url, "--num-prompts", "4", "--concurrency", "4", "--input-len", "16",
            "--output-len", "4", "--warmup", "0", "--json", "--no-progress"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["completed"], result["failed"]) == (4, 0)
    assert result["ttft_s"]["p50"] > 0 and result["output_throughput"] > 0


def test_killing_a_replica_fails_only_its_requests(replicas):
    """SIGKILL one replica while both run streams: its requests end with a 503 (or a stream error event),
    every other request completes, requests sent meanwhile succeed, and Ray brings the replica back."""
    pids = _replica_pids()
    assert len(pids) == 2, pids

    async def one(client: httpx.AsyncClient, i: int) -> tuple[int, str | None, bool]:
        body = {"prompt": f"Tell story {i}:", "max_tokens": 48, "ignore_eos": True, "temperature": 0,
                "stream": i % 2 == 0}
        if body["stream"]:
            async with client.stream("POST", f"{replicas.url}/v1/completions", json=body) as r:
                lines = [line async for line in r.aiter_lines() if line.startswith("data:")]
                failed = any('"error"' in line for line in lines)
                if failed:
                    assert json.loads(next(x for x in lines if '"error"' in x)[6:])["error"]["type"] == \
                        "service_unavailable"
                return r.status_code, r.headers.get(REPLICA_HEADER), failed
        r = await client.post(f"{replicas.url}/v1/completions", json=body)
        return r.status_code, r.headers.get(REPLICA_HEADER), r.status_code != 200

    def routed() -> dict[str, float]:
        return {k: v for k, v in replicas.metrics().items() if k.startswith("tokenmill_replica_requests_routed_total")}

    async def main() -> tuple[list, list]:
        start = routed()
        async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
            before = [asyncio.ensure_future(one(client, i)) for i in range(8)]
            for _ in range(600):  # until both replicas have requests in flight
                now = await asyncio.to_thread(routed)
                if sum(now.values()) - sum(start.values()) == 8 and all(now[k] > start.get(k, 0) for k in now):
                    break
                await asyncio.sleep(0.1)
            os.kill(pids[0], signal.SIGKILL)
            meanwhile = [asyncio.ensure_future(one(client, 100 + i)) for i in range(4)]
            return await asyncio.gather(*before), await asyncio.gather(*meanwhile)

    before, meanwhile = asyncio.run(main())
    failed = {replica for status, replica, bad in before if bad}
    assert len(failed) == 1, before  # only the killed replica's requests failed ...
    assert all(status in (200, 503) for status, _, _ in before)
    assert all(status == 200 and not bad for status, replica, bad in before if replica not in failed)
    assert all(status == 200 and not bad for status, _, bad in meanwhile), meanwhile  # ... and no new one did
    assert _wait_for_two_running_replicas() and pids[0] not in _replica_pids()  # Ray started a new one ...
    served = set()
    for _ in range(16):  # ... and it serves (replicas with equal queues are picked at random)
        ok = _post(replicas.url, "/v1/completions", {"prompt": "Hello", "max_tokens": 2})
        assert ok.status_code == 200, ok.text
        served.add(ok.headers[REPLICA_HEADER])
        if served - {replica for _, replica, _ in before}:
            break
    assert served - {replica for _, replica, _ in before}, served


def _wait_for_two_running_replicas() -> bool:
    from ray import serve

    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        states = serve.status().applications["tokenmill"].deployments["EngineReplica"].replica_states
        if states.get("RUNNING") == 2 and len(_replica_pids()) == 2:
            return True
        time.sleep(0.5)
    return False


# ---- the pool's admission and failure paths, over a stand-in for Ray Serve's handle ------------------

class _Call:
    """One handle call: the replica's chunks, in order; an exception in the list is raised there."""

    def __init__(self, items: list, gate: asyncio.Event) -> None:
        self.items, self.gate, self.cancelled = list(items), gate, False

    def __aiter__(self) -> _Call:
        return self

    async def __anext__(self) -> ReplicaChunk:
        await self.gate.wait()
        if not self.items:
            raise StopAsyncIteration
        item = self.items.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        self.cancelled = True


class _Handle:
    """Stands in for DeploymentHandle.options(stream=True).generate: each call gets the next script."""

    def __init__(self, scripts: list[list], gate: asyncio.Event) -> None:
        self.scripts, self.gate, self.calls = scripts, gate, []

    def options(self, **_: object) -> _Handle:
        return self

    @property
    def generate(self) -> _Handle:
        return self

    def remote(self, request: object) -> _Call:
        self.calls.append(_Call(self.scripts.pop(0), self.gate))
        return self.calls[-1]


def test_pool_admission_retry_and_replica_death(server):
    """429 with Retry-After once max_queue requests wait for a replica; a replica that died before taking a
    request is retried on another; one that dies mid-request fails that request with EngineDeadError (503)."""
    stats = EngineStats(num_running=0, num_waiting=0, num_preemptions_total=0, kv_blocks_used=0, kv_blocks_total=8,
                        prompt_tokens_total=0, generation_tokens_total=0)
    accepted = ReplicaChunk("r2", [], stats, time.monotonic())

    async def main() -> None:
        gate = asyncio.Event()
        handle = _Handle([[accepted, ActorDiedError()], [ActorDiedError()], [accepted, ActorDiedError()]], gate)
        pool = ReplicaPool(handle, server.engine.info)
        pool.start()
        state = ServerState(metrics=pool.metrics, max_queue=2)
        state.add_engine("m", pool)
        params = SamplingParams(max_tokens=4)
        first = asyncio.ensure_future(pool.add_request([1, 2, 3], params))
        second = asyncio.ensure_future(pool.add_request([4, 5, 6], params))
        await asyncio.sleep(0.05)  # both wait for a replica with room
        assert pool.num_waiting() == 2
        with pytest.raises(ApiError) as full:
            check_admission(state, 1)
        assert full.value.status == 429 and full.value.headers == {"Retry-After": "1"}
        gate.set()
        streams = await asyncio.gather(first, second)  # the second's first replica died: taken on retry
        assert len(handle.calls) == 3 and pool.num_waiting() == 0
        for stream in streams:
            with pytest.raises(EngineDeadError, match="replica r2 died"):
                async for _ in stream:
                    pass
        assert "r2" not in pool.book.replicas()  # its gauges are gone

    asyncio.run(main())
