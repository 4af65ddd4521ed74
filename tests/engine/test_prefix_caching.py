"""Prefix caching on the default model: the same outputs with it on and off, reuse, eviction, no leaks."""

import json
from pathlib import Path

import pytest

from tokenmill import LLM, SamplingParams
from tokenmill.engine.llm_engine import LLMEngine

GOLDEN = json.loads((Path(__file__).parents[1] / "data" / "golden_greedy.json").read_text())
PROMPTS = [c["prompt_token_ids"] for c in GOLDEN["cases"]]


@pytest.fixture(scope="module")
def cached():
    return LLM(dtype="float32", quantization="none", kv_cache_memory_gb=0.1, kv_cache_dtype="float32")


@pytest.fixture(scope="module")
def uncached():
    return LLM(dtype="float32", quantization="none", kv_cache_memory_gb=0.1, enable_prefix_caching=False,
               kv_cache_dtype="float32")


def completions(outs):
    return [[(c.token_ids, c.text, c.finish_reason) for c in o.outputs] for o in outs]


def assert_no_leak(engine: LLMEngine) -> None:
    stats = engine.stats()
    assert stats.kv_blocks_used == 0
    kv = engine.core.kv
    assert kv.num_free_blocks + kv.num_cached_free_blocks + kv.num_used_blocks == kv.num_blocks


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
    SamplingParams(temperature=0.8, top_p=0.9, max_tokens=12, seed=7, ignore_eos=True),
    SamplingParams(n=2, temperature=1.0, max_tokens=8, seed=3),
    SamplingParams(num_beams=3, n=2, max_tokens=8),
], ids=["greedy", "seeded", "n2", "beams"])
def test_outputs_are_identical_with_prefix_caching_on_and_off(cached, uncached, params):
    # a shared system-like prefix makes every prompt after the first hit the cache
    shared = PROMPTS[0] * 2  # 74 tokens: 4 full blocks
    prompts = [shared + p for p in PROMPTS[1:4]]
    reference = completions(uncached.generate(prompts, params, use_tqdm=False))
    first = cached.generate(prompts, params, use_tqdm=False)
    again = cached.generate(prompts, params, use_tqdm=False)  # now every prompt's full blocks are cached
    assert completions(first) == reference
    assert completions(again) == reference
    assert all(o.num_cached_tokens >= len(shared) // 16 * 16 for o in again)
    assert_no_leak(cached.engine)


def test_prompt_logprobs_are_identical_and_never_served_from_the_cache(cached, uncached):
    params = SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=2)
    prompt = PROMPTS[1] * 4
    reference = uncached.generate([prompt], params, use_tqdm=False)[0]
    cached.generate([prompt], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)  # warm the cache
    out = cached.generate([prompt], params, use_tqdm=False)[0]
    assert out.num_cached_tokens == 0
    assert out.outputs[0].token_ids == reference.outputs[0].token_ids
    for ours, theirs in zip(out.prompt_logprobs, reference.prompt_logprobs, strict=True):
        if theirs is None:
            assert ours is None
            continue
        assert ours.keys() == theirs.keys()
        for tid in ours:
            assert ours[tid].logprob == pytest.approx(theirs[tid].logprob, abs=1e-5)
            assert ours[tid].rank == theirs[tid].rank


def test_second_request_prefills_only_its_new_tokens_and_matches_the_cold_output(cached, uncached):
    engine = cached.engine
    prefix = [(7 * k) % 3000 + 100 for k in range(48)]  # 3 blocks of 16 nobody used before
    first, second = prefix + [11, 12, 13, 14, 15], prefix + [21, 22, 23]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    cold = uncached.generate([second], params, use_tqdm=False)[0]
    cached.generate([first], params, use_tqdm=False)
    before = engine.stats()
    engine.add_request(second, params, request_id="warm")
    prefilled = 0
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
        prefilled += engine.stats().tokens_prefilled_last_step
    warm = next(o for o in outs if o.finished)
    after = engine.stats()
    assert warm.num_cached_tokens == 48
    assert prefilled == 3  # only the 3 new prompt tokens were computed
    assert after.prefix_cache_hits_total - before.prefix_cache_hits_total == 48
    assert after.prefix_cache_queries_total - before.prefix_cache_queries_total == len(second)
    assert warm.outputs[0].token_ids == cold.outputs[0].token_ids
    assert_no_leak(engine)


def test_stop_string_ends_the_request_in_the_core_the_step_it_appears(cached):
    engine = cached.engine
    prompt = PROMPTS[2]
    text = cached.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                           use_tqdm=False)[0].outputs[0].text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert stop.strip()
    engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True, stop=[stop]),
                       request_id="stopper")
    while True:
        outs = [o for o in engine.step() if o.request_id == "stopper"]
        if outs and outs[0].finished:
            break
    c = outs[0].outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop and stop not in c.text
    assert len(c.token_ids) < 12
    # in that same step the core ended it and freed its blocks
    assert not engine.has_unfinished()
    assert_no_leak(engine)


def test_eviction_with_a_small_cache_many_prefixes(tiny_hf_model):
    llm = LLM(str(tiny_hf_model()), dtype="float32", kv_cache_memory_gb=40 * 16 * 2 * 2 * 2 * 16 * 4 / 2**30,
              max_model_len=256, kv_cache_dtype="float32")
    engine = llm.engine
    assert engine.info.num_blocks == 40
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    # 16 distinct 3-block prefixes: 48 cacheable blocks for a 40-block cache, so blocks get evicted
    prefixes = [[(31 * i + k) % 400 + 5 for k in range(48)] for i in range(16)]
    total_hits = 0
    for round_ in range(3):
        order = prefixes if round_ % 2 == 0 else prefixes[::-1]  # reversed: the most recent are hit
        for prefix in order:
            before = engine.stats().prefix_cache_hits_total
            out = llm.generate([prefix + [round_ + 1]], params, use_tqdm=False)[0]
            assert out.outputs[0].finish_reason == "length"
            hit = engine.stats().prefix_cache_hits_total - before
            assert hit == out.num_cached_tokens and hit % 16 == 0
            if round_ == 0:
                assert hit == 0
            total_hits += hit
            assert_no_leak(engine)
    assert total_hits > 0 and engine.stats().kv_blocks_cached_free > 0


def test_verified_draft_tokens_give_the_same_greedy_output_in_fewer_steps(tiny_hf_model):
    """A decode fed 1 + k tokens gets k + 1 logit rows back (the runner's multi-token path): with
    drafts taken from the true continuation (plus a wrong one), the output is unchanged."""
    llm = LLM(str(tiny_hf_model()), dtype="float32", max_model_len=256)
    engine = llm.engine
    prompt = list(range(3, 40))
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    reference = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    engine.add_request(prompt, params, request_id="drafted")
    steps, final = 0, None
    while engine.has_unfinished():
        request = engine.core.scheduler.requests.get("drafted")
        if request is not None and request.seqs[0].num_output_tokens:
            seq = request.seqs[0]
            done = seq.num_output_tokens
            wrong = (reference[done + 3] + 1) % 512 if done + 3 < len(reference) else 0
            seq.draft_token_ids = reference[done:done + 3] + [wrong]  # 3 right, then 1 wrong
        outs = engine.step()
        steps += 1
        final = next((o for o in outs if o.finished), final)
    assert final.outputs[0].token_ids == reference
    assert steps < 24 // 2
    assert_no_leak(engine)
