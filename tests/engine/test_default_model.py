"""The default model (SmolLM2-135M-Instruct, GGUF Q4_1) against transformers' greedy output on the same file."""

import json
from pathlib import Path

import pytest

from tokenmill import LLM, SamplingParams

GOLDEN = json.loads((Path(__file__).parents[1] / "data" / "golden_greedy.json").read_text())


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32", quantization="none", kv_cache_memory_gb=0.25, kv_cache_dtype="float32")


def test_greedy_batch_is_token_identical_to_transformers(llm):
    cases = GOLDEN["cases"]
    params = SamplingParams(temperature=0, max_tokens=GOLDEN["meta"]["max_new_tokens"], ignore_eos=True)
    outs = llm.generate([c["prompt_token_ids"] for c in cases], params, use_tqdm=False)
    for case, out in zip(cases, outs):
        assert out.outputs[0].token_ids == case["output_token_ids"], case["prompt"]


def test_each_prompt_alone_gives_the_batched_tokens(llm):
    cases = GOLDEN["cases"][:4]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    for case in cases:
        out = llm.generate([case["prompt_token_ids"]], params, use_tqdm=False)[0]
        assert out.outputs[0].token_ids == case["output_token_ids"]
    assert llm.engine.stats().kv_blocks_used == 0


def test_chat_answers_paris_and_stops_at_end_of_turn(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)[0]
    c = out.outputs[0]
    assert c.text == "The capital of France is Paris."
    assert c.finish_reason == "stop" and c.token_ids[-1] in llm.engine.eos_token_ids
    assert out.metrics.ttft > 0 and out.metrics.tpot > 0
    assert out.metrics.num_generated_tokens == len(c.token_ids)
