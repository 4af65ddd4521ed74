"""``tokenmill serve`` with its default settings, as a real process with its engine core in a child process:
it answers, and when the core process dies the server says so (503, streams end with an error) and exits 1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from tests.server.conftest import free_port, wait_for_health


def _core_pid(server_pid: int) -> int | None:
    """The server's child that runs the engine core (a multiprocessing spawn child)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if int(stat[1]) == server_pid and b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
            return int(entry.name)
    return None


@pytest.fixture(scope="module")
def default_server():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tokenmill.server.app", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    if wait_for_health(proc, url, timeout=600) != 200:
        proc.kill()
        pytest.fail(f"the server did not become ready: {proc.stdout.read()}")
    yield proc, url
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)


def test_default_settings_answer_paris(default_server):
    _, url = default_server
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    answer = client.chat.completions.create(
        model=client.models.list().data[0].id, temperature=0, max_tokens=32,
        messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in answer.choices[0].message.content


def test_a_json_schema_is_enforced_by_the_core_process(default_server):
    # the grammar's spec crosses to the core process, which compiles it and masks every step
    _, url = default_server
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    schema = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 20}},
              "required": ["capital"], "additionalProperties": False}
    answer = client.chat.completions.create(
        model=client.models.list().data[0].id, temperature=0, max_tokens=32,
        messages=[{"role": "user", "content": "What is the capital of France? Answer in JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
    assert set(json.loads(answer.choices[0].message.content)) == {"capital"}


def test_the_api_process_does_not_load_torch(default_server):
    # after requests that touch the API side's every use of the engine's types (validation, a grammar,
    # streamed logprobs, the playground's masked candidates), torch is mapped in the core process only
    proc, url = default_server
    model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    body = {"model": model, "prompt": "Give a number", "max_tokens": 3, "structured_outputs": {"regex": "[0-9]+"}}
    with httpx.stream("POST", f"{url}/v1/playground/steps", json=body, timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert [e["grammar_allowed"] for e in events if e["type"] == "token"][0] == 10  # the ten digits
    chunks = httpx.post(f"{url}/v1/completions", timeout=60, json={
        "model": model, "prompt": "Hello", "max_tokens": 4, "logprobs": 2, "stream": True}).text
    assert "[DONE]" in chunks

    def maps_torch(pid: int) -> bool:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()

    assert not maps_torch(proc.pid)
    assert maps_torch(_core_pid(proc.pid))


def test_core_process_death_gives_503_ends_streams_and_exits_1(default_server):
    proc, url = default_server
    core = _core_pid(proc.pid)
    assert core is not None, "no engine core child process"
    ended = threading.Event()
    lines: list[str] = []

    def stream() -> None:
        body = {"prompt": "Once upon a time", "max_tokens": 500, "ignore_eos": True, "stream": True}
        try:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
                lines.extend(r.iter_lines())
        except httpx.HTTPError as exc:
            lines.append(f"transport error: {exc}")
        ended.set()

    thread = threading.Thread(target=stream, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not any(line.startswith("data: {") for line in lines) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(core, signal.SIGKILL)
    assert ended.wait(60), "the stream hung after the engine core died"
    assert not any('"finish_reason": "length"' in line for line in lines)
    statuses = []
    while proc.poll() is None and time.monotonic() < deadline + 60:
        try:
            statuses.append(httpx.get(f"{url}/health", timeout=5).status_code)
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    assert proc.wait(60) == 1
    assert 200 not in statuses
    assert "engine core process died" in proc.stdout.read()
