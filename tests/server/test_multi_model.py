"""Several models in one server: one engine (and KV cache) each, chosen by the request's ``model``.

The server here serves the default model as "smol" and a tiny random Llama (same tokenizer, different
weights) as "tiny", both loaded by the app from EngineConfigs (one engine core process each).
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Iterator

import httpx
import pytest

from tests.server.conftest import RunningServer, serve_in_thread, wait_until_ready
from tokenmill.config import EngineConfig
from tokenmill.server.app import add_serve_arguments, create_app

openai = pytest.importorskip("openai")

SMALL = dict(max_model_len=256, max_num_seqs=4, kv_cache_memory_gb=0.05, seed=0, dtype="float32",
             quantization="none")
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def two_models(tiny_hf_model) -> Iterator[RunningServer]:
    configs = [EngineConfig(**SMALL), EngineConfig(model=str(tiny_hf_model("llama")), **SMALL)]
    running = wait_until_ready(serve_in_thread(create_app(configs, served_model_names=["smol", "tiny"])))
    yield running
    running.stop()


def _complete(client, model: str, n: int = 12) -> tuple[str, str]:
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=n, temperature=0)
    return r.model, r.choices[0].text


def test_models_are_listed_and_each_has_its_own_engine(two_models):
    data = httpx.get(f"{two_models.url}/v1/models", timeout=30).json()["data"]
    assert [m["id"] for m in data] == ["smol", "tiny"]
    state = two_models.app.state.tokenmill
    assert state.engines["smol"] is not state.engines["tiny"] and state.engine is state.engines["smol"]


def test_two_models_answer_by_name_concurrently(two_models):
    sync = openai.OpenAI(base_url=f"{two_models.url}/v1", api_key="x")
    alone = {m: _complete(sync, m) for m in ("smol", "tiny")}
    assert alone["smol"][1] != alone["tiny"][1]  # different weights, different text
    client = openai.AsyncOpenAI(base_url=f"{two_models.url}/v1", api_key="x")

    async def ask(model: str) -> tuple[str, str]:
        r = await client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0)
        return r.model, r.choices[0].text

    async def both() -> list[tuple[str, str]]:
        return await asyncio.gather(*(ask(m) for m in ("smol", "tiny", "smol", "tiny")))

    results = asyncio.run(both())
    assert results == [("smol", alone["smol"][1]), ("tiny", alone["tiny"][1])] * 2
    chat = sync.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert chat.model == "tiny"


def test_no_model_means_the_first_and_unknown_is_a_404_naming_both(two_models):
    r = httpx.post(f"{two_models.url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}, timeout=60)
    assert r.status_code == 200 and r.json()["model"] == "smol"
    r = httpx.post(f"{two_models.url}/v1/completions", json={"model": "nope", "prompt": PROMPT, "max_tokens": 2},
                   timeout=60)
    assert r.status_code == 404
    error = r.json()["error"]
    assert error["code"] == "model_not_found" and "`smol`, `tiny`" in error["message"]
    # the playground's routes take the model too
    r = httpx.post(f"{two_models.url}/v1/tokenize", json={"model": "tiny", "text": "Hello"}, timeout=60)
    assert r.status_code == 200 and r.json()["model"] == "tiny"


def test_serve_arguments_take_several_models():
    from tokenmill.cli import add_engine_arguments

    parser = argparse.ArgumentParser()
    add_engine_arguments(parser, several_models=True)
    add_serve_arguments(parser)
    args = parser.parse_args(["a.gguf", "--model", "b", "--model", "c", "--served-model-name", "x"])
    assert (args.models, args.model, args.served_model_names) == (["a.gguf"], ["b", "c"], ["x"])


def test_bad_served_names_are_rejected():
    with pytest.raises(ValueError, match="2 models"):
        create_app([EngineConfig(), EngineConfig()], served_model_names=["only-one"])
    with pytest.raises(ValueError, match="distinct"):
        create_app([EngineConfig(), EngineConfig()])
