"""The engine end to end: batch invariance, chunked prefill, preemption, abort, rejection, n > 1."""

import pytest

from tokenmill import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def prompts_of_lengths(lengths: list[int]) -> list[list[int]]:
    return [[(7 * i + 13 * n) % 1000 + 5 for i in range(n)] for n in lengths]


@pytest.fixture(scope="module")
def tiny_path(tiny_hf_model):
    return str(tiny_hf_model(arch="llama", tie=False))


def make_llm(path: str, **kw) -> LLM:
    kw.setdefault("kv_cache_memory_gb", 0.05)
    kw.setdefault("kv_cache_dtype", "float32")  # logprobs compared to 1e-4
    return LLM(model=path, **kw)


def token_lists(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def assert_no_blocks_in_use(llm: LLM) -> None:
    assert llm.engine.stats().kv_blocks_used == 0
    assert not llm.engine.has_unfinished()


def test_batch_gives_the_same_tokens_as_each_prompt_alone(tiny_path):
    llm = make_llm(tiny_path)
    prompts = prompts_of_lengths([3, 17, 5, 40, 1, 9, 23, 2, 31, 6, 12, 4, 19, 8, 27, 11])
    batched = token_lists(llm.generate(prompts, GREEDY, use_tqdm=False))
    alone = [token_lists(llm.generate([p], GREEDY, use_tqdm=False))[0] for p in prompts]
    assert batched == alone
    assert all(len(t) == 12 for t in batched)
    assert_no_blocks_in_use(llm)


def test_chunked_prefill_matches_unchunked(tiny_path):
    prompt = prompts_of_lengths([70])
    whole = make_llm(tiny_path, max_num_batched_tokens=512)
    chunked = make_llm(tiny_path, max_num_batched_tokens=16)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, prompt_logprobs=1)
    a, b = whole.generate(prompt, params, use_tqdm=False)[0], chunked.generate(prompt, params, use_tqdm=False)[0]
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
    for pa, pb in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
        token = next(iter(pa))
        assert pb[token].logprob == pytest.approx(pa[token].logprob, abs=1e-4)


def test_preemption_with_a_small_cache_gives_the_same_outputs(tiny_path):
    prompts = prompts_of_lengths([30, 25, 33, 28, 31, 27])
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    big = make_llm(tiny_path)
    # 10 blocks of 16 tokens: room for ~3 of these sequences at once
    small = make_llm(tiny_path, kv_cache_memory_gb=10 * 2 * 2 * 16 * 2 * 16 * 4 / 2**30)
    assert small.engine.info.num_blocks == 10
    expected = token_lists(big.generate(prompts, params, use_tqdm=False))
    got = token_lists(small.generate(prompts, params, use_tqdm=False))
    assert got == expected
    assert small.engine.stats().num_preemptions_total > 0
    assert_no_blocks_in_use(small)


def test_abort_mid_generation_frees_blocks(tiny_path):
    llm = make_llm(tiny_path)
    engine = llm.engine
    rid = engine.add_request(prompts_of_lengths([20])[0], SamplingParams(max_tokens=100, ignore_eos=True))
    other = engine.add_request(prompts_of_lengths([8])[0], SamplingParams(temperature=0, max_tokens=5))
    for _ in range(3):
        engine.step()
    assert engine.stats().kv_blocks_used > 0
    engine.abort(rid)
    outs = {o.request_id: o for o in engine.step()}
    assert outs[rid].finished and outs[rid].outputs[0].finish_reason == "abort"
    while engine.has_unfinished():
        engine.step()
    assert_no_blocks_in_use(llm)
    assert other not in engine.core.scheduler.requests


def test_request_that_can_never_fit_is_rejected_with_both_numbers(tiny_path):
    llm = make_llm(tiny_path, max_model_len=64)
    with pytest.raises(ValueError, match=r"prompt \(60 tokens\) \+ max_tokens \(10\).*64"):
        llm.generate(prompts_of_lengths([60]), SamplingParams(max_tokens=10), use_tqdm=False)
    assert_no_blocks_in_use(llm)


def test_bad_input_is_a_clear_error(tiny_path):
    llm = make_llm(tiny_path)
    with pytest.raises(ValueError, match="prompt must not be empty"):
        llm.generate("", SamplingParams(), use_tqdm=False)
    with pytest.raises(ValueError, match="max_tokens"):
        llm.generate("hi", SamplingParams(max_tokens=0), use_tqdm=False)
    with pytest.raises(ValueError, match="temperature"):
        llm.generate("hi", SamplingParams(temperature=-1), use_tqdm=False)
    with pytest.raises(ValueError, match="logit_bias"):
        llm.generate("hi", SamplingParams(logit_bias={10**7: 1.0}), use_tqdm=False)


def test_n_samples_share_the_prompt_blocks_and_differ(tiny_path):
    llm = make_llm(tiny_path)
    params = SamplingParams(n=4, temperature=1.0, max_tokens=8, seed=3, ignore_eos=True)
    engine = llm.engine
    engine.add_request(prompts_of_lengths([40])[0], params, request_id="r")
    engine.step()  # prefill + first tokens
    request = engine.core.scheduler.requests["r"]
    assert len(request.seqs) == 4
    tables = [engine.core.kv.block_table(s) for s in request.seqs]
    assert all(t[0] == tables[0][0] for t in tables)  # the first (full) prompt block is shared
    while engine.has_unfinished():
        engine.step()
    assert_no_blocks_in_use(llm)
    out = llm.generate(prompts_of_lengths([40]), params, use_tqdm=False)[0]
    assert len(out.outputs) == 4 and len({tuple(c.token_ids) for c in out.outputs}) > 1
    again = llm.generate(prompts_of_lengths([40]), params, use_tqdm=False)[0]
    assert token_lists([out]) == token_lists([again])  # seeded: reproducible


def test_logprobs_rank_the_chosen_token_and_the_alternatives(tiny_path):
    llm = make_llm(tiny_path)
    out = llm.generate(prompts_of_lengths([10]), SamplingParams(temperature=0, max_tokens=6, logprobs=3,
                                                                ignore_eos=True), use_tqdm=False)[0]
    c = out.outputs[0]
    assert len(c.logprobs) == len(c.token_ids) == 6
    for token, position in zip(c.token_ids, c.logprobs):
        assert position[token].rank == 1  # greedy picks the most likely token
        by_rank = sorted(position.values(), key=lambda lp: lp.rank)
        assert [lp.rank for lp in by_rank] == [1, 2, 3]
        assert all(a.logprob >= b.logprob for a, b in zip(by_rank, by_rank[1:]))
    assert c.cumulative_logprob == pytest.approx(sum(p[t].logprob for t, p in zip(c.token_ids, c.logprobs)))


def test_seeded_n_samples_do_not_depend_on_the_batch(tiny_path):
    llm = make_llm(tiny_path, max_num_seqs=5)
    target = SamplingParams(n=3, temperature=1.0, max_tokens=10, seed=106, ignore_eos=True)
    alone = llm.generate(prompts_of_lengths([12]), target, use_tqdm=False)[0]
    others = SamplingParams(temperature=0.8, max_tokens=10, ignore_eos=True)
    crowd = llm.generate(prompts_of_lengths([5, 9, 12, 7]), [others, others, target, others], use_tqdm=False)[2]
    assert token_lists([alone]) == token_lists([crowd])
    assert [c.token_ids for c in alone.outputs] == [c.token_ids for c in crowd.outputs]


def test_request_whose_samples_cannot_all_fit_the_cache_is_rejected(tiny_path):
    # 10 blocks of 16 tokens; 4 samples of 30 + 20 tokens need 4 blocks each once recomputed apart
    small = make_llm(tiny_path, kv_cache_memory_gb=10 * 2 * 2 * 16 * 2 * 16 * 4 / 2**30)
    with pytest.raises(ValueError, match=r"4 sequence\(s\) needs 16 KV blocks but the cache has only 10"):
        small.generate(prompts_of_lengths([30]), SamplingParams(n=4, max_tokens=20), use_tqdm=False)
    assert_no_blocks_in_use(small)


def test_compiled_decode_matches_eager(tiny_path):
    from torch._dynamo.utils import counters

    from tokenmill.engine.model_runner import CompiledDecode

    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=1)
    compiled_llm = make_llm(tiny_path, compile=True)
    assert isinstance(compiled_llm.engine.core.runner.decode_forward, CompiledDecode)
    graphs = counters["stats"]["unique_graphs"]  # start-up compiled one per decode shape class
    # one sequence, a padded batch, a batch of one length: the start-up graphs serve them all, no compile mid-run
    for lengths in ([9], [5, 12, 9], [7, 7, 7]):
        prompts = prompts_of_lengths(lengths)
        eager = make_llm(tiny_path).generate(prompts, params, use_tqdm=False)
        compiled = compiled_llm.generate(prompts, params, use_tqdm=False)
        assert token_lists(compiled) == token_lists(eager)
        for a, b in zip(eager, compiled):
            assert b.outputs[0].cumulative_logprob == pytest.approx(a.outputs[0].cumulative_logprob, abs=1e-4)
    assert counters["stats"]["unique_graphs"] == graphs


def test_compile_auto_picks_packed_int4_on_cpu(tiny_path, tiny_gguf_model):
    import torch

    from tokenmill.config import EngineConfig
    from tokenmill.engine.core import compile_decode_choice

    cpu = torch.device("cpu")
    cores = {}

    def choice(path, **kw):
        if path not in cores:  # each model loaded once
            cores[path] = make_llm(path).engine.core
        core = cores[path]
        config = EngineConfig(model=path, **kw)
        return compile_decode_choice(config, core.runner.model, core.info.model_config, cpu)[0]

    packed = str(tiny_gguf_model(ggml_type="Q4_0"))
    assert choice(packed, compile=None) is True  # what `tokenmill serve` passes by default
    assert choice(packed, compile=None, batch_invariant=True) is False
    assert choice(packed, compile=False) is False
    assert choice(tiny_path, compile=None) is False  # float weights: not measured to pay
    assert choice(tiny_path, compile=True) is True
    with pytest.raises(ValueError, match="compile cannot be combined with batch_invariant"):
        EngineConfig(compile=True, batch_invariant=True)
