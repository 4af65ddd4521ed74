"""``tokenmill serve`` as a real process: 503 while loading, graceful exit 0 on SIGTERM, exit 1 on a bad model.

Uses a tiny random model (tests/conftest.py) so the extra process loads in a second.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading

import httpx

from tests.server.conftest import free_port, wait_for_health


def _serve(model: str, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tokenmill.server.app", "--model", model, "--port", str(port),
           "--max-model-len", "256", "--kv-cache-memory", "0.02", "--threads", "1"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigterm_finishes_the_running_stream_then_exits_0(tiny_hf_model):
    port = free_port()
    proc = _serve(str(tiny_hf_model()), port)
    url = f"http://127.0.0.1:{port}"
    try:
        status = wait_for_health(proc, url, timeout=300)
        assert status == 200, proc.stdout.read() if proc.poll() is not None else "not ready"

        lines: list[str] = []
        first_token = threading.Event()

        def stream() -> None:
            body = {"prompt": "Hello", "max_tokens": 120, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        lines.append(line[6:])
                        first_token.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert first_token.wait(120)
        proc.send_signal(signal.SIGTERM)
        reader.join(120)
        assert proc.wait(120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(x) for x in lines[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"  # the request ran to its end


def test_a_model_that_cannot_load_exits_1(tmp_path):
    proc = _serve(str(tmp_path / "missing.gguf"), free_port())
    try:
        assert proc.wait(180) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
