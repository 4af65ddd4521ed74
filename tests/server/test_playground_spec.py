"""A server with speculative decoding (n-gram drafts, tiny random model): the playground's decode view
marks the accepted draft tokens, and /metrics counts drafts."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tokenmill.config import EngineConfig
from tokenmill.server.app import create_app


@pytest.fixture(scope="module")
def spec_server(tiny_hf_model):
    from tests.server.conftest import serve_in_thread

    config = EngineConfig(model=str(tiny_hf_model()), dtype="float32", max_model_len=256, kv_cache_memory_gb=0.05,
                          speculative_config={"method": "ngram", "prompt_lookup_min": 1})
    running = serve_in_thread(create_app(config))
    deadline = time.monotonic() + 300
    while httpx.get(f"{running.url}/health", timeout=30).status_code != 200:
        assert time.monotonic() < deadline and not running.app.state.tokenmill.load_error
        time.sleep(0.1)
    yield running
    running.stop()


def test_steps_mark_accepted_draft_tokens_and_metrics_count_them(spec_server):
    body = {"prompt": "one two three one two three one two three", "chat_template": False, "temperature": 0,
            "max_tokens": 32}
    with httpx.stream("POST", f"{spec_server.url}/v1/playground/steps", json=body, timeout=120) as resp:
        assert resp.status_code == 200
        events = [json.loads(line[6:]) for line in resp.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    tokens = [e for e in events if e["type"] == "token"]
    assert len(tokens) == 32 and all(isinstance(e["drafted"], bool) for e in tokens)
    assert not tokens[0]["drafted"] and any(e["drafted"] for e in tokens)
    metrics = spec_server.metrics()
    assert metrics["tokenmill_spec_decode_accepted_tokens_total"] >= sum(e["drafted"] for e in tokens)
    assert metrics["tokenmill_spec_decode_draft_tokens_total"] >= metrics["tokenmill_spec_decode_accepted_tokens_total"]
