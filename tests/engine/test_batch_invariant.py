"""Batch-invariant mode on the default model with its default quantization: a request's tokens are the same
alone and beside 16 other streams of varied lengths and parameters (seeded sampling and greedy)."""

from __future__ import annotations

import pytest

from tokenmill import LLM, SamplingParams

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()
# 17 prompts from 4 to ~70 words: prefill lengths, chunk splits and decode contexts all differ
PROMPTS = [" ".join(WORDS[i % len(WORDS):] + WORDS * (i % 5)) + f" Story {i}:" for i in range(17)]
SEEDED = SamplingParams(temperature=0.8, seed=7, max_tokens=16, ignore_eos=True)
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(batch_invariant=True, max_num_seqs=32)


def _others(n: int) -> list[SamplingParams]:
    """Varied company: lengths 4..32 tokens, sampled with other temperatures, top_p and penalties."""
    return [SamplingParams(temperature=0.3 + 0.2 * (i % 4), top_p=0.9 if i % 2 else 1.0, seed=100 + i,
                           presence_penalty=0.5 * (i % 3), max_tokens=4 + 4 * (i % 8), ignore_eos=True)
            for i in range(n)]


def test_a_seeded_request_gives_the_same_tokens_alone_and_beside_16_streams(llm):
    alone = llm.generate(PROMPTS[0], SEEDED, use_tqdm=False)[0].outputs[0]
    batch = llm.generate(PROMPTS, [SEEDED, *_others(16)], use_tqdm=False)[0].outputs[0]
    assert batch.token_ids == alone.token_ids
    assert batch.text == alone.text


def test_greedy_batch_results_equal_each_prompt_alone(llm):
    chosen = [1, 9, 14]
    alone = [llm.generate(PROMPTS[i], GREEDY, use_tqdm=False)[0].outputs[0].token_ids for i in chosen]
    params = [GREEDY if i in chosen else p for i, p in zip(range(17), [GREEDY, *_others(16)], strict=True)]
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert [outs[i].outputs[0].token_ids for i in chosen] == alone
