"""`tokenmill bench` end to end: the default model offline, a tiny model with --compare and a sweep,
and the HTTP client against our own server."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from tokenmill.bench.dataset import synthetic_prompts
from tokenmill.bench.serving import run_serving
from tokenmill.cli import main
from tokenmill.config import EngineConfig
from tokenmill.server.app import create_app

LATENCY_KEYS = ("ttft_s", "tpot_s", "itl_s", "e2e_s")


def check_result(data: dict, num_prompts: int, input_len: int, output_len: int) -> None:
    """A finished run: every request done, the token counts exact, the latencies consistent."""
    assert (data["completed"], data["failed"]) == (num_prompts, 0), data["errors"]
    assert data["total_input_tokens"] == num_prompts * input_len
    assert data["total_output_tokens"] == num_prompts * output_len
    for key in LATENCY_KEYS:
        stats = data[key]
        assert set(stats) == {"mean", "p50", "p90", "p99"}
        assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"], (key, stats)
    assert data["e2e_s"]["p50"] >= data["ttft_s"]["p50"]
    assert data["e2e_s"]["p99"] <= data["duration_s"]
    # Every request generated output_len tokens within the run.
    assert data["output_throughput"] == pytest.approx(num_prompts * output_len / data["duration_s"])
    assert data["request_throughput"] == pytest.approx(num_prompts / data["duration_s"])
    assert data["peak_rss_mb"] > 50


def test_cli_bench_json_on_the_default_model() -> None:
    cmd = [sys.executable, "-m", "tokenmill", "bench", "--num-prompts", "4", "--input-len", "32",
           "--output-len", "8", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(proc.stdout)
    check_result(data, 4, 32, 8)
    assert data["backend"] == "tokenmill" and data["concurrency"] is None
    assert data["kv_cache"]["tokens"] == data["kv_cache"]["blocks"] * 16 and data["kv_cache"]["size_mb"] > 0


def test_compare_transformers_sweep_and_plot(tiny_hf_model, tmp_path: Path, capsys) -> None:
    png = tmp_path / "sweep.png"
    argv = ["bench", "--model", str(tiny_hf_model()), "--num-prompts", "4", "--input-len", "16", "--output-len",
            "5", "--concurrency", "1,4", "--compare", "transformers", "--plot", str(png), "--json", "--no-progress"]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert [run["concurrency"] for run in data["sweep"]] == [1, 4]
    for run in data["sweep"]:
        check_result(run, 4, 16, 5)
        theirs = run["compare"]["transformers"]
        check_result(theirs, 4, 16, 5)
        assert run["compare"]["ratios"]["output_throughput"] == pytest.approx(
            run["output_throughput"] / theirs["output_throughput"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def run_shared_prefix(tiny_hf_model, capsys) -> dict:
    """4 prompts of 32 shared + 8 own tokens through a tiny model, offline; the --json object."""
    argv = ["bench", "--model", str(tiny_hf_model()), "--num-prompts", "4", "--shared-prefix-len", "32",
            "--input-len", "8", "--output-len", "3", "--json", "--no-progress"]
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_shared_prefix_run_reports_a_hit_rate(tiny_hf_model, capsys) -> None:
    data = run_shared_prefix(tiny_hf_model, capsys)
    check_result(data, 4, 32 + 8, 3)
    assert isinstance(data["cached_input_tokens"], int)
    assert 0 <= data["cached_input_tokens"] <= data["total_input_tokens"]
    assert data["prefix_cache_hit_rate"] == pytest.approx(data["cached_input_tokens"] / (4 * 40))


def test_shared_prefix_is_served_from_the_cache(tiny_hf_model, capsys) -> None:
    # The warm-up request computes the 32 shared tokens (2 blocks of 16); every timed request reuses them.
    assert run_shared_prefix(tiny_hf_model, capsys)["cached_input_tokens"] >= 4 * 32


def test_compare_without_transformers_is_a_clear_error(monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    assert main(["bench", "--compare", "transformers", "--num-prompts", "1"]) == 2
    assert "needs the transformers package" in capsys.readouterr().err


def test_compare_without_llama_cpp_is_a_clear_error(monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    assert main(["bench", "--compare", "llama.cpp", "--num-prompts", "1"]) == 2
    assert "needs llama-cpp-python" in capsys.readouterr().err


def test_compare_llama_cpp_on_the_default_model(capsys) -> None:
    pytest.importorskip("llama_cpp")
    argv = ["bench", "--num-prompts", "2", "--input-len", "16", "--output-len", "8", "--concurrency", "1",
            "--compare", "llama.cpp", "--json", "--no-progress"]
    assert main(argv) == 0
    run = json.loads(capsys.readouterr().out)
    theirs = run["compare"]["llama.cpp"]
    assert theirs["completed"] == 2 and theirs["total_output_tokens"] == 16
    assert theirs["tpot_s"]["p50"] > 0


@pytest.mark.parametrize("argv, message", [
    (["--num-prompts", "0"], "--num-prompts must be >= 1"),
    (["--concurrency", "0"], "--concurrency: every level must be >= 1"),
    (["--request-rate", "5"], "--request-rate needs --url"),
    (["--url", "http://x", "--compare", "transformers"], "cannot be combined with --url"),
    (["--plot", "out.jpg"], "--plot must name a .png file"),
    (["--shared-prefix-len", "-1"], "--shared-prefix-len must be >= 0"),
    (["--shared-prefix-len", "8", "--dataset", "x.jsonl"], "cannot be combined with --dataset"),
])
def test_bad_flags_are_one_line_errors(argv: list[str], message: str, capsys) -> None:
    assert main(["bench", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    """Our server on the default model, in a thread on a free port, once it answers /health."""
    app = create_app(EngineConfig(max_model_len=256, max_num_seqs=8, kv_cache_memory_gb=0.05))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=10).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            pytest.fail("the server did not become ready")
        time.sleep(0.1)
    yield url
    server.should_exit = True
    thread.join(30)


def test_serving_bench_against_our_server(server_url: str, capsys) -> None:
    argv = ["bench", "--url", server_url, "--num-prompts", "8", "--input-len", "16", "--output-len", "4",
            "--concurrency", "4", "--json", "--no-progress"]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["backend"] == "http" and data["concurrency"] == 4
    # Token counts come from the server's usage chunk; the text windows re-encode to the same 16 tokens.
    check_result(data, 8, 16, 4)
    # So do the prefix-cache hits: tokenmill always sends usage.prompt_tokens_details.cached_tokens.
    assert isinstance(data["cached_input_tokens"], int) and data["prefix_cache_hit_rate"] is not None


def test_serving_bench_poisson_rate_and_server_errors(server_url: str) -> None:
    from tokenmill.model.source import load_tokenizer

    prompts = synthetic_prompts(load_tokenizer("smollm2-135m-instruct"), 3, 8, 2, seed=1)
    result = asyncio.run(run_serving(server_url, prompts, request_rate=20.0, progress=False))
    assert (result.completed, result.total_output_tokens) == (3, 6)
    bad = asyncio.run(run_serving(server_url, prompts, model="no-such-model", progress=False))
    assert (bad.completed, bad.failed) == (0, 3)
    assert bad.errors[0].startswith("HTTP 4"), bad.errors
