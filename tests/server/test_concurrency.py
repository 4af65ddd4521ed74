"""Many clients at once, clients that go away, and the /metrics they leave behind."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "My favourite fruit is",
           "The sky is"]


def _request(i: int, model: str) -> tuple[str, dict]:
    """Client i's route and body: a mix of greedy, seeded sampling, n=2, penalties, chat and completions."""
    common = {"model": model, "max_tokens": 2 + i % 4, "seed": 100 + i,
              "extra_body": {"ignore_eos": True, "top_k": 0 if i % 2 else 20}}
    kind = i % 4
    if kind == 0:
        return "completions", {**common, "prompt": PROMPTS[i % 5], "temperature": 0}
    if kind == 1:
        return "chat", {**common, "messages": [{"role": "user", "content": PROMPTS[i % 5]}], "temperature": 0.7}
    if kind == 2:
        return "completions", {**common, "prompt": PROMPTS[i % 5], "n": 2, "top_p": 0.9}
    return "chat", {**common, "messages": [{"role": "user", "content": PROMPTS[i % 5]}],
                    "presence_penalty": 0.5, "frequency_penalty": 0.3, "temperature": 1.2}


async def _run(client: openai.AsyncOpenAI, route: str, body: dict, stream: bool) -> tuple[dict[int, str], int]:
    """Text per choice and completion tokens, streamed or not."""
    api = client.completions if route == "completions" else client.chat.completions
    if not stream:
        out = await api.create(**body)
        texts = {c.index: c.text if route == "completions" else c.message.content for c in out.choices}
        return texts, out.usage.completion_tokens
    texts: dict[int, str] = {}
    usage = None
    async for chunk in await api.create(**body, stream=True, stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        for c in chunk.choices:
            piece = c.text if route == "completions" else (c.delta.content or "")
            texts[c.index] = texts.get(c.index, "") + piece
    return texts, usage.completion_tokens


def test_twenty_concurrent_streams_match_their_non_streamed_twins(server):
    async def main() -> None:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=600)
        requests = [_request(i, server.model) for i in range(20)]
        streamed = await asyncio.gather(*(_run(client, r, b, stream=True) for r, b in requests))
        reference = await asyncio.gather(*(_run(client, r, b, stream=False) for r, b in requests))
        for (route, body), (texts, tokens), (ref_texts, ref_tokens) in zip(requests, streamed, reference,
                                                                          strict=True):
            n = body.get("n", 1)
            assert tokens == ref_tokens == n * body["max_tokens"], (route, body)
            assert texts == ref_texts, (route, body)
        await client.close()

    asyncio.run(main())
    assert server.wait_until(lambda: server.metrics()["tokenmill_num_requests_running"] == 0, timeout=60)


def test_clients_that_disconnect_free_their_kv_blocks(server):
    before = server.metrics()['tokenmill_requests_total{finish_reason="abort"}']
    body = {"prompt": "Tell me a long story about", "max_tokens": 300, "ignore_eos": True, "stream": True}

    async def disconnect_mid_stream() -> None:
        async with httpx.AsyncClient(timeout=300) as client, \
                client.stream("POST", f"{server.url}/v1/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: ") and '"text"' in line:
                    break  # leave after the first token: the context manager closes the connection

    async def main() -> None:
        await asyncio.gather(*(disconnect_mid_stream() for _ in range(5)))

    asyncio.run(main())
    # A non-streaming client that gives up is aborted too.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json={**body, "stream": False}, timeout=2.0)

    def idle() -> bool:
        m = server.metrics()
        return (m["tokenmill_kv_cache_usage_ratio"] == 0 and m["tokenmill_num_requests_running"] == 0
                and m["tokenmill_num_requests_waiting"] == 0)

    assert server.wait_until(idle, timeout=60)
    aborted = server.metrics()['tokenmill_requests_total{finish_reason="abort"}'] - before
    assert aborted == 6
    assert server.engine.stats().kv_blocks_used == 0


def test_metrics_after_traffic(server):
    httpx.post(f"{server.url}/v1/completions", timeout=300,
               json={"prompt": "Hello", "max_tokens": 3, "ignore_eos": True})
    m = server.metrics()
    for name in ("tokenmill_time_to_first_token_seconds", "tokenmill_time_per_output_token_seconds",
                 "tokenmill_e2e_request_latency_seconds", "tokenmill_request_queue_time_seconds"):
        assert m[f"{name}_count"] > 0, name
        assert m[f"{name}_sum"] > 0, name
    assert m["tokenmill_prompt_tokens_total"] > 0
    assert m["tokenmill_generation_tokens_total"] >= 3
    assert m['tokenmill_requests_total{finish_reason="length"}'] > 0
    assert m["tokenmill_kv_cache_usage_ratio"] == 0
