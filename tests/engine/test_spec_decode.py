"""Speculative decoding: proposers, rejection sampling, and outputs equal to plain decoding."""

import math

import pytest
import torch

from tokenmill import LLM, SamplingParams
from tokenmill.config import EngineConfig, SpeculativeConfig
from tokenmill.engine.kv_cache_manager import KVCacheManager
from tokenmill.engine.request import Request
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.spec_decode import ngram_lookup, rejection_sample
from tokenmill.engine.step import DraftProposal, ModelRunnerOutput, SampledTokens

# ---- model-free ----------------------------------------------------------------------------


@pytest.mark.parametrize(("tokens", "k", "expected"), [
    ([1, 2, 3, 4, 9, 9, 2, 3], 3, [4, 9, 9]),  # "2 3" occurred before: propose what followed it
    ([5, 1, 2, 3, 7, 1, 2, 3, 8, 0, 1, 2, 3], 2, [8, 0]),  # the most recent of two occurrences
    ([1, 2, 3, 6, 7, 0, 2, 3, 5, 5, 1, 2, 3], 2, [6, 7]),  # the longest suffix (3 tokens) wins over 2
    ([1, 2, 3, 4, 5], 3, []),  # nothing repeats
    ([4, 4, 4, 4], 3, [4]),  # the continuation stops at the end of the sequence
    ([7, 8, 1, 7, 8], 0, []),
])
def test_ngram_lookup(tokens, k, expected):
    assert ngram_lookup(tokens, k, 2, 3) == expected


def test_ngram_lookup_respects_the_minimum_length():
    assert ngram_lookup([3, 1, 9, 9, 3], 2, 2, 4) == []  # only "3" recurs, n_min is 2
    assert ngram_lookup([3, 1, 9, 9, 3], 2, 1, 4) == [1, 9]


def test_ngram_draft_length_adapts_to_what_was_accepted():
    from tokenmill.engine.request import Sequence
    from tokenmill.engine.spec_decode import NgramProposer
    from tokenmill.engine.step import SpecCandidate

    proposer = NgramProposer(4, 1, 2)
    text = [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2]
    seq = Sequence(1, list(text), 3)
    propose = lambda: proposer.propose([SpecCandidate(seq, SamplingParams(), 32)], {1})[1].token_ids  # noqa: E731
    assert propose() == [3, 4, 5, 6]  # starts at k
    seq.token_ids += [3, 4, 9]  # 2 accepted, then another token: one draft fewer
    assert seq.token_ids[-1:] == [9] and propose() == [1, 2, 3]
    seq.token_ids += [1, 2, 3, 4]  # all 3 accepted (+ bonus): two more, up to k
    assert propose() == [9, 1, 2, 3]  # "3 4" last occurred before 9
    proposer.propose([], set())  # the sequence is gone: its state too
    assert not proposer._length and not proposer._last


def chi_square_critical(df: int, z: float = 3.72) -> float:
    """Upper quantile of chi-square(df) at the normal quantile z (Wilson-Hilferty; 3.72: p = 1e-4)."""
    h = 2 / (9 * df)
    return df * (1 - h + z * math.sqrt(h)) ** 3


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic and degrees of freedom, merging cells expected below 5 into one."""
    expected = probs.double() * counts.sum()
    big = expected >= 5
    obs = torch.cat([counts[big].double(), counts[~big].double().sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum().item()
    return stat, int(keep.sum().item()) - 1


def test_rejection_sampling_keeps_the_target_distribution():
    gen = torch.Generator().manual_seed(0)
    vocab, draws = 12, 200_000
    p_logits = torch.randn(vocab, generator=gen) * 2
    q = torch.softmax(torch.randn(vocab, generator=gen) * 2, dim=-1)  # deliberately different from p
    p_logits[3] = -math.inf  # a token the target forbids (as top-k or a mask would)
    drafts = torch.multinomial(q, draws, replacement=True, generator=gen)
    uniforms = torch.rand(draws, generator=gen, dtype=torch.float64)
    tokens = rejection_sample(p_logits.expand(draws, vocab), uniforms, drafts, q.expand(draws, vocab))
    counts = torch.bincount(tokens, minlength=vocab)
    assert counts[3] == 0
    stat, df = chi_square(counts, torch.softmax(p_logits, dim=-1))
    assert stat < chi_square_critical(df)
    # accepted exactly when the output is the draft, at the rate sum(min(p, q))
    accept_rate = (tokens == drafts).double().mean().item()
    assert accept_rate == pytest.approx(torch.minimum(torch.softmax(p_logits, -1), q).sum().item(), abs=0.005)


def test_speculative_config_validation_names_the_field():
    assert SpeculativeConfig().method == "ngram"
    assert SpeculativeConfig(model="m").method == "draft_model"
    for bad, field in [({"num_speculative_tokens": 0}, "num_speculative_tokens"),
                       ({"method": "eagle"}, "method"),
                       ({"prompt_lookup_min": 5, "prompt_lookup_max": 3}, "prompt_lookup_min"),
                       ({"method": "draft_model"}, "model"),
                       ({"disable_by_batch_size": 0}, "disable_by_batch_size"),
                       ({"num_speculative_token": 3}, "unknown key")]:
        with pytest.raises(ValueError, match=field):
            EngineConfig(speculative_config=bad)
    config = EngineConfig(speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    assert isinstance(config.speculative_config, SpeculativeConfig)
    assert config.speculative_config.num_speculative_tokens == 3


def decoding_scheduler(num_requests: int, spec: SpeculativeConfig, **params) -> Scheduler:
    """A scheduler whose requests have each produced one token (so they decode next)."""
    sched = Scheduler(KVCacheManager(64, 4), 8, 256, [2], 128, speculative_config=spec)
    for i in range(num_requests):
        sched.add_request(Request(f"r{i}", [10 + i, 11, 12], SamplingParams(**params)))
    plan = sched.schedule()
    out = ModelRunnerOutput(sampled={s.seq.seq_id: [SampledTokens([20], [0.0])] for s in plan.scheduled})
    sched.update_from_output(plan, out)
    return sched


def test_candidates_respect_the_batch_size_limit_and_max_tokens():
    spec = SpeculativeConfig(num_speculative_tokens=4, disable_by_batch_size=2)
    sched = decoding_scheduler(2, spec, max_tokens=4, temperature=0)
    candidates = sched.speculation_candidates()
    assert [c.max_drafts for c in candidates] == [2, 2]  # 1 token out of 4: 2 drafts + 1 own token
    assert decoding_scheduler(3, spec, max_tokens=4, temperature=0).speculation_candidates() == []
    assert decoding_scheduler(1, spec, max_tokens=2, temperature=0).speculation_candidates() == []


def test_beam_search_never_speculates():
    spec = SpeculativeConfig(disable_by_batch_size=8)
    sched = decoding_scheduler(1, spec, temperature=0, max_tokens=8)
    assert len(sched.speculation_candidates()) == 1
    sched.running[0].params = SamplingParams(num_beams=2, max_tokens=8)  # the same sequence, as a beam
    assert sched.speculation_candidates() == []


def test_drafts_are_fed_with_lookahead_slots_and_dropped_rather_than_preempting():
    spec = SpeculativeConfig(disable_by_batch_size=8)
    sched = Scheduler(KVCacheManager(2, 4), 8, 256, [2], 128, speculative_config=spec)
    sched.add_request(Request("r", [10, 11, 12], SamplingParams(max_tokens=16, temperature=0)))
    plan = sched.schedule()
    sched.update_from_output(plan, ModelRunnerOutput(sampled={plan.scheduled[0].seq.seq_id:
                                                              [SampledTokens([20], [0.0])]}))
    seq = sched.running[0].seqs[0]
    sched.set_draft_tokens({seq.seq_id: DraftProposal([21, 22, 23])})
    plan = sched.schedule()  # 4 tokens computed + 4 fed = 8 slots: both blocks
    assert plan.scheduled[0].draft_token_ids == [21, 22, 23] and plan.scheduled[0].num_logit_rows == 4
    sched.update_from_output(plan, ModelRunnerOutput(sampled={seq.seq_id: [SampledTokens([21, 30], [0.0, 0.0])]}))
    assert seq.token_ids[-3:] == [20, 21, 30] and seq.num_computed_tokens == 5
    sched.set_draft_tokens({seq.seq_id: DraftProposal([31, 32, 33, 34])})
    plan = sched.schedule()  # 5 + 5 = 10 slots > 8: the drafts go, the request stays
    assert plan.scheduled[0].draft_token_ids == [] and not plan.preempted


def test_spec_decode_counters_follow_the_engine_totals():
    from prometheus_client.parser import text_string_to_metric_families

    from tokenmill.engine.info import EngineStats
    from tokenmill.engine.metrics import EngineMetrics

    metrics = EngineMetrics()
    for drafts, tokens, accepted in ((0, 0, 0), (10, 40, 25), (12, 48, 30)):
        metrics.record_stats(EngineStats(1, 0, 0, 2, 8, 10, 10, spec_decode_drafts_total=drafts,
                                         spec_decode_draft_tokens_total=tokens,
                                         spec_decode_accepted_tokens_total=accepted))
    text = metrics.render()[0].decode()
    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert values["tokenmill_spec_decode_draft_tokens_total"] == 48
    assert values["tokenmill_spec_decode_accepted_tokens_total"] == 30
    assert values["tokenmill_spec_decode_num_drafts_total"] == 12
    assert values["vllm:spec_decode_num_draft_tokens_total"] == 48
    assert values["vllm:spec_decode_num_accepted_tokens_total"] == 30


# ---- on tiny random models -------------------------------------------------------------------

REPETITIVE = [[5, 6, 7, 8, 9, 10, 5, 6, 7, 8, 9, 10, 5, 6, 7], [40, 41, 42, 43, 44, 40, 41, 42],
              [100, 3, 101, 3, 102, 3, 103, 3]]


def outputs(outs):
    return [[c.token_ids for c in o.outputs] for o in outs]


@pytest.fixture(scope="module")
def tiny_target(tiny_hf_model):
    return str(tiny_hf_model())


@pytest.fixture(scope="module")
def plain_tiny(tiny_target):
    return LLM(tiny_target, dtype="float32", kv_cache_dtype="float32", max_model_len=256)


@pytest.fixture(scope="module")
def ngram_tiny(tiny_target):
    return LLM(tiny_target, dtype="float32", kv_cache_dtype="float32", max_model_len=256,
               speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
                                   "disable_by_batch_size": 16})


MIXED = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
         SamplingParams(temperature=0.8, top_p=0.9, top_k=50, max_tokens=24, seed=11, ignore_eos=True),
         SamplingParams(temperature=1.0, min_p=0.05, repetition_penalty=1.2, frequency_penalty=0.3,
                        logit_bias={7: 2.0}, min_tokens=4, max_tokens=24, seed=3),
         SamplingParams(num_beams=2, max_tokens=12, ignore_eos=True),
         SamplingParams(n=2, temperature=0.7, max_tokens=16, seed=5, ignore_eos=True)]


def test_ngram_mixed_batch_equals_each_request_alone_without_speculation(plain_tiny, ngram_tiny):
    """Speculating sequences next to plain ones (beams, ones without a match) in one step; with
    one-hot n-gram drafts, even seeded sampled requests give exactly plain decoding's tokens."""
    prompts = [REPETITIVE[i % len(REPETITIVE)] for i in range(len(MIXED))]
    before = ngram_tiny.engine.stats()
    batched = ngram_tiny.generate(prompts, MIXED, use_tqdm=False)
    after = ngram_tiny.engine.stats()
    alone = [plain_tiny.generate([p], params, use_tqdm=False)[0] for p, params in zip(prompts, MIXED)]
    assert outputs(batched) == outputs(alone)
    assert after.spec_decode_draft_tokens_total > before.spec_decode_draft_tokens_total
    assert after.spec_decode_accepted_tokens_total > before.spec_decode_accepted_tokens_total
    assert after.kv_blocks_used == 0


@pytest.fixture(scope="module")
def draft_tiny(tiny_target, tiny_hf_model):
    draft = str(tiny_hf_model(num_hidden_layers=1, hidden_size=32, intermediate_size=64))
    return LLM(tiny_target, dtype="float32", kv_cache_dtype="float32", max_model_len=256,
               speculative_config={"model": draft, "num_speculative_tokens": 3, "disable_by_batch_size": 16})


def test_tiny_draft_model_greedy_equals_plain(plain_tiny, draft_tiny):
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    prompts = REPETITIVE + [[1, 200, 300, 400]]
    before = draft_tiny.engine.stats()
    spec = draft_tiny.generate(prompts, params, use_tqdm=False)
    after = draft_tiny.engine.stats()
    assert outputs(spec) == outputs(plain_tiny.generate(prompts, params, use_tqdm=False))
    assert after.spec_decode_draft_tokens_total > before.spec_decode_draft_tokens_total


def test_seeded_draft_model_sampling_is_reproducible(draft_tiny):
    params = SamplingParams(temperature=0.9, top_k=40, max_tokens=20, seed=123, ignore_eos=True)
    first = draft_tiny.generate(REPETITIVE, params, use_tqdm=False)
    again = draft_tiny.generate(REPETITIVE, params, use_tqdm=False)
    assert outputs(first) == outputs(again)


@pytest.mark.parametrize("which", ["ngram", "draft"])
def test_aborts_mid_verification_leak_no_blocks(which, ngram_tiny, draft_tiny):
    llm = ngram_tiny if which == "ngram" else draft_tiny
    engine = llm.engine
    # greedy for n-gram drafts (a random model's samples seldom repeat), sampled with the draft model
    params = SamplingParams(temperature=0 if which == "ngram" else 0.8, max_tokens=40, ignore_eos=True, seed=1)
    ids = [engine.add_request(p, params) for p in REPETITIVE * 2]
    aborted = set()
    for _ in range(60):
        if not engine.has_unfinished():
            break
        engine.step()
        scheduler = engine.core.scheduler
        drafted = [r.request_id for r in scheduler.running if any(s.draft_token_ids for s in r.seqs)]
        for request_id in drafted[:1]:
            if request_id not in aborted and len(aborted) < 3:
                engine.abort(request_id)  # its drafts are set: the next step would verify them
                aborted.add(request_id)
    while engine.has_unfinished():
        engine.step()
    engine.step()  # an idle step: the draft model lets go of finished sequences
    assert len(aborted) == 3 and set(ids) >= aborted
    kv = engine.core.kv
    assert kv.num_used_blocks == 0
    assert kv.num_free_blocks + kv.num_cached_free_blocks == kv.num_blocks
    proposer = engine.core.proposer
    if which == "draft":
        assert proposer.num_tracked == 0 and proposer.kv.num_used_blocks == 0


def test_draft_model_with_another_tokenizer_is_refused(tiny_target, tiny_hf_model, tmp_path):
    import shutil

    from tokenizers import Tokenizer
    draft = tmp_path / "draft"
    shutil.copytree(tiny_hf_model(num_hidden_layers=1), draft)
    tok = Tokenizer.from_file(str(draft / "tokenizer.json"))
    tok.add_tokens(["<an-extra-token>"])
    tok.save(str(draft / "tokenizer.json"))
    with pytest.raises(ValueError, match="does not share the tokenizer"):
        LLM(tiny_target, dtype="float32", kv_cache_dtype="float32", max_model_len=256, speculative_config={"model": str(draft)})


def test_draft_model_sampling_keeps_the_target_distribution(tiny_hf_model):
    """10,000 samples of the first and second generated tokens with k=3 drafts from a different
    draft model follow the plain sampler's distribution (target logits from transformers)."""
    import transformers

    from tokenmill.engine.sampler import SampleRow, SamplingBatch, apply_penalties, apply_truncation

    vocab = 32
    target = tiny_hf_model(vocab_size=vocab)
    draft = tiny_hf_model(vocab_size=vocab, num_hidden_layers=1, hidden_size=32, intermediate_size=64)
    llm = LLM(str(target), dtype="float32", max_model_len=64, max_num_seqs=512, max_num_batched_tokens=4096,
              kv_cache_dtype="float32",  # compared with transformers' float32 distribution
              speculative_config={"model": str(draft), "num_speculative_tokens": 3,
                                  "disable_by_batch_size": 10_000})
    prompt = [5, 9, 17, 3, 22]
    params = SamplingParams(n=50, temperature=0.9, top_k=20, repetition_penalty=1.3, max_tokens=5,
                            ignore_eos=True, seed=None)
    outs = llm.generate([prompt] * 200, params, use_tqdm=False)
    tokens = torch.tensor([c.token_ids[:2] for o in outs for c in o.outputs])  # [10000, 2]
    stats = llm.engine.stats()
    assert stats.spec_decode_draft_tokens_total >= 10_000  # the second tokens were all drafted

    # the plain sampler's distributions, on transformers' logits of the same weights
    hf = transformers.AutoModelForCausalLM.from_pretrained(target, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        first_logits = hf(torch.tensor([prompt])).logits[0, -1:]  # [1, V]
        second_logits = hf(torch.tensor([prompt + [t] for t in range(vocab)])).logits[:, -1]  # [V, V]

    def controlled(logits, outputs_so_far):
        rows = [SampleRow(params, prompt, out, None) for out in outputs_so_far]
        batch = SamplingBatch.build(rows, vocab, [2], torch.device("cpu"))
        return apply_truncation(apply_penalties(logits, batch), batch).softmax(dim=-1)

    p_first = controlled(first_logits, [[]])[0]
    p_second = p_first @ controlled(second_logits, [[t] for t in range(vocab)])  # marginal over the first
    for column, p in ((0, p_first), (1, p_second)):
        stat, df = chi_square(torch.bincount(tokens[:, column], minlength=vocab), p)
        assert stat < chi_square_critical(df), (column, stat, df)


# ---- the default model ---------------------------------------------------------------------

GROUNDED = [
    "Copy this sentence exactly: The committee will meet on Tuesday at 10 am in room 204 to review the budget.",
    "Rewrite in the past tense: I walk to the market, I buy apples and pears, and I carry them home in a bag.",
    "Extract the email addresses from this text: Contact alice@example.com for sales, bob@example.org for "
    "support, and carol@example.net for press.",
    "Add a docstring to this function and return it:\n\ndef area(width, height):\n    return width * height\n",
]
OPEN_ENDED = ["Write a short poem about the sea.", "What is the capital of France?",
              "Give me three ideas for a birthday party.", "Explain why the sky is blue."]


@pytest.fixture(scope="module")
def default_prompts(default_model_path):
    from tokenmill.model.gguf import read_gguf, tokenizer_from_gguf

    tokenizer = tokenizer_from_gguf(read_gguf(str(default_model_path)))
    return [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": text}]),
                             add_special_tokens=False) for text in GROUNDED + OPEN_ENDED]


@pytest.fixture(scope="module")
def default_plain(default_prompts):
    llm = LLM(dtype="float32", kv_cache_dtype="float32", quantization="none", kv_cache_memory_gb=0.1)
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    return outputs(llm.generate(default_prompts, params, use_tqdm=False))


@pytest.mark.parametrize("method", ["ngram", "self_draft"])
def test_default_model_greedy_speculation_is_token_identical(method, default_prompts, default_plain,
                                                             default_model_path):
    """8 prompts (4 that copy from their input, 4 open-ended) x 64 tokens, float32. The default model
    as its own draft proposes exactly what the target picks: every draft is accepted."""
    spec = {"method": "ngram", "disable_by_batch_size": 8} if method == "ngram" else \
        {"model": str(default_model_path), "num_speculative_tokens": 3, "disable_by_batch_size": 8}
    llm = LLM(dtype="float32", kv_cache_dtype="float32", quantization="none", kv_cache_memory_gb=0.1, speculative_config=spec)
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    assert outputs(llm.generate(default_prompts, params, use_tqdm=False)) == default_plain
    stats = llm.engine.stats()
    assert stats.spec_decode_draft_tokens_total > 100
    if method == "self_draft":
        assert stats.spec_decode_accepted_tokens_total == stats.spec_decode_draft_tokens_total
    assert stats.kv_blocks_used == 0


def test_completion_marks_the_accepted_draft_tokens(plain_tiny, ngram_tiny):
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    spec = ngram_tiny.generate(REPETITIVE, params, use_tqdm=False)
    plain = plain_tiny.generate(REPETITIVE, params, use_tqdm=False)
    for s, p in zip(spec, plain):
        c = s.outputs[0]
        assert len(c.drafted) == len(c.token_ids) and not c.drafted[0]  # the first token is never drafted
        assert s.metrics.num_token_steps == len(c.token_ids)  # TPOT stays per token, not per step
        assert p.outputs[0].drafted == [False] * len(p.outputs[0].token_ids)
    assert any(any(s.outputs[0].drafted) for s in spec)
