"""The TGI routes through the official ``text-generation`` client, against the real server and model."""

from __future__ import annotations

import httpx
import pytest
from text_generation import Client
from text_generation.errors import BadRequestError

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def client(server) -> Client:
    return Client(server.url, timeout=300)


def test_generate_with_details_matches_generate_stream(client, server):
    out = client.generate(PROMPT, max_new_tokens=4, decoder_input_details=True, top_n_tokens=2)
    d = out.details
    prompt_ids = server.engine.info.tokenizer.encode(PROMPT)
    assert d.generated_tokens == len(d.tokens) <= 4
    assert "".join(t.text for t in d.tokens) == out.generated_text
    assert [t.id for t in d.prefill] == prompt_ids
    assert d.prefill[0].logprob is None and all(t.logprob <= 0 for t in d.prefill[1:])
    assert len(d.top_tokens) == d.generated_tokens
    for token, top in zip(d.tokens, d.top_tokens, strict=True):
        assert top[0].id == token.id  # greedy: the chosen token is the most likely one
        assert token.logprob == pytest.approx(top[0].logprob)
    assert d.seed is None  # greedy

    events = list(client.generate_stream(PROMPT, max_new_tokens=4))
    assert "".join(e.token.text for e in events) == out.generated_text
    assert [e.token.id for e in events] == [t.id for t in d.tokens]
    assert events[-1].generated_text == out.generated_text
    assert events[-1].details.generated_tokens == d.generated_tokens
    assert all(e.details is None for e in events[:-1])


def test_sampling_reports_a_seed_that_reproduces(client):
    first = client.generate(PROMPT, max_new_tokens=4, do_sample=True, temperature=0.9)
    again = client.generate(PROMPT, max_new_tokens=4, do_sample=True, temperature=0.9, seed=first.details.seed)
    assert first.details.seed is not None
    assert again.generated_text == first.generated_text


def test_return_full_text_stop_and_finish_reason(client):
    base = client.generate(PROMPT, max_new_tokens=6)
    stop = base.details.tokens[2].text.strip() or base.details.tokens[2].text
    out = client.generate(PROMPT, max_new_tokens=6, stop_sequences=[stop], return_full_text=True)
    assert out.details.finish_reason == "stop_sequence"
    assert out.generated_text.startswith(PROMPT)
    assert stop not in out.generated_text[len(PROMPT):]
    assert base.details.finish_reason in ("length", "eos_token")


def test_generate_route_best_of_and_truncate(server):
    body = {"inputs": "one two three four five six", "parameters": {
        "max_new_tokens": 3, "best_of": 2, "do_sample": True, "details": True, "truncate": 3,
        "decoder_input_details": True}}
    r = httpx.post(f"{server.url}/generate", json=body, timeout=300)
    assert r.status_code == 200, r.text
    out = r.json()
    assert isinstance(out, dict)  # /generate returns an object; / returns a list
    assert len(out["details"]["best_of_sequences"]) == 1
    ids = server.engine.info.tokenizer.encode(body["inputs"])
    assert [t["id"] for t in out["details"]["prefill"]] == ids[-3:]
    best = out["details"]["tokens"]
    other = out["details"]["best_of_sequences"][0]["tokens"]
    assert sum(t["logprob"] for t in best) >= sum(t["logprob"] for t in other)  # the best one comes first


def test_watermark_and_best_of_stream_are_rejected(client, server):
    with pytest.raises(BadRequestError, match="watermark"):
        client.generate(PROMPT, max_new_tokens=2, watermark=True)
    r = httpx.post(f"{server.url}/generate_stream", json={"inputs": PROMPT, "parameters": {
        "best_of": 2, "do_sample": True}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "best_of"


def test_info_tokenize_and_health(server):
    info = httpx.get(f"{server.url}/info").json()
    assert info["model_id"] == server.model
    assert info["max_total_tokens"] == 512
    tokens = httpx.post(f"{server.url}/tokenize", json={"inputs": "Hello world"}).json()
    assert [t["id"] for t in tokens] == server.engine.info.tokenizer.encode("Hello world")
    assert "".join(t["text"] for t in tokens) == "Hello world"
    assert tokens[0]["start"] == 0 and tokens[-1]["stop"] == len("Hello world")
    assert httpx.get(f"{server.url}/health").status_code == 200
    # While the model loaded, /health answered 503.
    assert server.health_statuses[0] == 503 and server.health_statuses[-1] == 200
