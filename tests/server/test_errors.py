"""Bad input gets the documented status and an OpenAI-shaped message; the server keeps serving."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from tokenmill.server.app import create_app

LONG_PROMPT = list(range(1000, 1500))  # 500 token ids; the test server's context is 512

# (route, body: dict | raw bytes, status, text the message must contain, param)
CASES = [
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "valid number", "temperature"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "5"}, 400, "valid integer", "max_tokens"),
    ("/v1/completions", {"prompt": "x", "foo": 1}, 400, "Unrecognized request argument supplied: foo", "foo"),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p must be in (0, 1]", "top_p"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature must be >= 0", "temperature"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 3}, 400, "presence_penalty", "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "n": 100000}, 400, "n must be in [1, 128]", "n"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens must be >= 1", "max_tokens"),
    ("/v1/completions", {"prompt": "x", "seed": 1.5}, 400, "valid integer", "seed"),
    ("/v1/completions", {"prompt": "x", "stop": ["a"] * 20}, 400, "stop: at most 16", "stop"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"abc": 1}}, 400, "token ids", "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 200}}, 400, "logit_bias[5] must be in", "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"999999": 1}}, 400, "vocab size", None),
    ("/v1/completions", {"prompt": [999999]}, 400, "[0, 49152)", "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "empty", "prompt"),
    ("/v1/completions", {"prompt": LONG_PROMPT, "max_tokens": 100}, 400, "512 tokens", "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10**9}, 400, "1000000000", "max_tokens"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt is required", "prompt"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "gpt-4", "model"),
    ("/v1/completions", {"prompt": "x", "suffix": "y"}, 400, "suffix", "suffix"),
    ("/v1/completions", b"{not json", 400, "not valid JSON", None),
    ("/v1/completions", [1, 2], 400, "valid dictionary", "body"),
    ("/v1/chat/completions", {"messages": []}, 400, "at least one message", "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "valid list", "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "bot", "content": "x"}]}, 400, "'user'", "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "content is required", "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     400, "'image_url'", "messages[0].content[0].type"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
     400, "tools[0] must be", "tools[0]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "xml"}}, 400, "response_format", "response_format"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400,
     "requires logprobs", "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True,
                              "top_logprobs": 50}, 400, "logprobs must be in [0, 20]", "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_p": 2}, 400,
     "top_p must be in (0, 1]", "top_p"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, 400,
     "max_completion_tokens: max_tokens must be >= 1, got 0", "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 600},
     400, "600", "max_completion_tokens"),
    ("/generate", {"inputs": ""}, 400, "inputs must not be empty", "inputs"),
    ("/generate", {"inputs": "x", "parameters": {"max_new_tokens": "x"}}, 400, "valid integer",
     "parameters.max_new_tokens"),
    ("/generate", {"inputs": "x", "parameters": {"grammar": {"type": "yaml", "value": "{}"}}}, 400,
     "grammar", "grammar"),
    ("/generate", {"inputs": "x", "parameters": {"best_of": 2}}, 400, "needs sampling", "best_of"),
    ("/generate", {"inputs": "x", "parameters": {"top_p": 0}}, 400, "top_p", "top_p"),
    ("/generate", {"inputs": "x", "parameters": {"max_new_tokens": 0}}, 400, "max_tokens must be >= 1",
     "max_new_tokens"),
    ("/generate", {"inputs": "x", "parameters": {"top_n_tokens": 21}}, 400, "logprobs must be in [0, 20]",
     "top_n_tokens"),
    ("/generate", {"inputs": "x", "parameters": {"do_sample": True, "best_of": 200}}, 400, "n must be in [1, 128]",
     "best_of"),
    ("/v1/playground/steps", {"prompt": "x", "top_p": 2}, 400, "top_p must be in (0, 1]", "top_p"),
    ("/v1/playground/beam", {"prompt": "x", "num_beams": 17}, 400, "num_beams must be in [1, 16]", "num_beams"),
    ("/v1/nope", {}, 404, "Not Found", None),
]


@pytest.mark.parametrize(("route", "body", "status", "message", "param"), CASES,
                         ids=[f"{i}-{c[0]}" for i, c in enumerate(CASES)])
def test_bad_input_is_rejected_with_a_clear_error(server, route, body, status, message, param):
    if isinstance(body, bytes):
        r = httpx.post(server.url + route, content=body, headers={"content-type": "application/json"})
    else:
        r = httpx.post(server.url + route, json=body, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert message in error["message"]
    assert error["param"] == param


def test_server_still_answers_after_bad_input(server):
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=300)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_api_key_is_required_except_on_health_and_metrics(server, serve_app):
    secured = serve_app(create_app(server.engine, api_key="sekrit"))
    for method, route in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/generate"),
                          ("GET", "/info")):
        r = httpx.request(method, secured.url + route, json={"prompt": "x"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.request(method, secured.url + route, json={}, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
    assert httpx.get(secured.url + "/health").status_code == 200
    assert httpx.get(secured.url + "/metrics").status_code == 200
    client = openai.OpenAI(base_url=f"{secured.url}/v1", api_key="sekrit", max_retries=0, timeout=300)
    out = client.completions.create(model=server.model, prompt="Hi", max_tokens=2)
    assert out.usage.completion_tokens >= 1


def test_full_queue_answers_429(server, serve_app):
    limited = serve_app(create_app(server.engine, max_queue=3))
    # long enough that no holder finishes (and frees a seat) between the check and the request below
    body = {"prompt": "Count to a hundred:", "max_tokens": 450, "ignore_eos": True, "stream": True}

    async def main() -> None:
        release = asyncio.Event()

        async def hold() -> None:
            async with httpx.AsyncClient(timeout=300) as client, \
                    client.stream("POST", f"{server.url}/v1/completions", json=body) as response:
                assert response.status_code == 200
                await release.wait()  # leaving closes the stream, which aborts the request

        holders = [asyncio.ensure_future(hold()) for _ in range(12)]  # 8 run (max_num_seqs), 4 wait
        for _ in range(600):
            if server.engine.num_waiting() >= 4:
                break
            await asyncio.sleep(0.1)
        async with httpx.AsyncClient(timeout=60) as client:
            r = await client.post(f"{limited.url}/v1/completions", json={"prompt": "x", "max_tokens": 1})
        release.set()
        await asyncio.gather(*holders)
        assert r.status_code == 429, r.text
        assert r.json()["error"]["code"] == "queue_full"
        assert r.headers["retry-after"] == "1"  # seconds, as RFC 9110 asks

    asyncio.run(main())
    assert server.wait_until(lambda: server.engine.num_waiting() == 0, timeout=60)
    r = httpx.post(f"{limited.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, timeout=300)
    assert r.status_code == 200
