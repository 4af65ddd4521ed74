"""The token-selection pipeline against transformers' logits processors and hand references."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from tokenmill.engine.sampler import (
    _TOP_P_CANDIDATES,
    Sampler,
    SampleRow,
    SamplingBatch,
    TokenEntries,
    apply_frequency_presence,
    apply_min_p,
    apply_penalties,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    apply_truncation,
    token_logprobs,
)
from tokenmill.sampling_params import SamplingParams

CPU = torch.device("cpu")
VOCAB = 64
EOS = [2]
# Chi-square critical values at alpha = 0.001 by degrees of freedom.
CHI2_CRITICAL_001 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}


def _row(params: SamplingParams, prompt: list[int] | None = None, output: list[int] | None = None,
         seed: int | None = None) -> SampleRow:
    generator = torch.Generator().manual_seed(seed if seed is not None else (params.seed or 0))
    return SampleRow(params, prompt or [], output or [], generator)


def _logits(rows: int, vocab: int = VOCAB, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def _assert_same_distribution(ours: torch.Tensor, reference: torch.Tensor) -> None:
    torch.testing.assert_close(ours.softmax(-1), reference.softmax(-1), atol=1e-6, rtol=1e-5)
    assert torch.equal(torch.isinf(ours), torch.isinf(reference))


# ---- each step against transformers ----

def test_temperature_matches_transformers():
    logits = _logits(3)
    temps = [0.3, 1.0, 1.7]
    ours = apply_temperature(logits, torch.tensor(temps).unsqueeze(1))
    for i, t in enumerate(temps):
        _assert_same_distribution(ours[i:i + 1], TemperatureLogitsWarper(t)(None, logits[i:i + 1].clone()))


def test_top_k_matches_transformers_per_row():
    logits = _logits(4)
    ks = [1, 5, 0, 20]
    ours = apply_top_k(logits, torch.tensor(ks), max(ks))
    for i, k in enumerate(ks):
        expected = logits[i:i + 1] if k == 0 else TopKLogitsWarper(top_k=k)(None, logits[i:i + 1].clone())
        _assert_same_distribution(ours[i:i + 1], expected)
    assert (ours[1] > -math.inf).sum() == 5


@pytest.mark.parametrize(("candidates", "vocab", "tiers_exceeded"),
                         [(None, VOCAB, 0), (20, VOCAB, 0), (None, 5000, 1), (None, 50_000, 2)])
def test_top_p_matches_transformers_per_row(candidates, vocab, tiers_exceeded):
    """Large vocabularies: the flat row's kept set is larger than the first partial sort."""
    logits = _logits(4, vocab, seed=1)
    logits[0] *= 4  # peaky: its kept set fits in the first candidates
    ps = [0.9, 0.5, 0.95, 1.0]
    if candidates is not None:  # the partial-sort path is only valid after top_k
        logits = apply_top_k(logits, torch.full((4,), candidates), candidates)
    for size in _TOP_P_CANDIDATES[:tiers_exceeded]:  # row 2 really needs more than these partial sorts
        assert logits[2].softmax(-1).topk(size).values.sum() < ps[2]
    ours = apply_top_p(logits, torch.tensor(ps).unsqueeze(1), candidates)
    for i, p in enumerate(ps):
        _assert_same_distribution(ours[i:i + 1], TopPLogitsWarper(top_p=p)(None, logits[i:i + 1].clone()))
    assert (ours[1] > -math.inf).sum() < (ours[2] > -math.inf).sum()
    assert torch.equal(ours[3], logits[3])  # top_p 1 is off


def test_min_p_matches_transformers_per_row():
    logits = _logits(3, seed=2)
    ps = [0.05, 0.3, 0.0]
    ours = apply_min_p(logits, torch.tensor(ps).unsqueeze(1))
    for i, p in enumerate(ps):
        expected = logits[i:i + 1] if p == 0 else MinPLogitsWarper(min_p=p)(None, logits[i:i + 1].clone())
        _assert_same_distribution(ours[i:i + 1], expected)
    assert (ours[1] == -math.inf).any()


def test_repetition_penalty_matches_transformers():
    logits = _logits(2, seed=3)
    seen_ids = [[3, 7, 7, 10, 40], [0, 1, 63]]
    penalties = [1.3, 0.8]
    rows = [_row(SamplingParams(repetition_penalty=p), prompt=ids[:2], output=ids[2:])
            for ids, p in zip(seen_ids, penalties, strict=True)]
    ours = apply_repetition_penalty(logits, SamplingBatch.build(rows, VOCAB, EOS, CPU).repetition)
    for i, (ids, penalty) in enumerate(zip(seen_ids, penalties, strict=True)):
        expected = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([ids]), logits[i:i + 1].clone())
        torch.testing.assert_close(ours[i:i + 1], expected)


def test_frequency_presence_match_hand_reference():
    logits = _logits(2, seed=4)
    outputs = [[5, 5, 5, 9], [1, 2, 1]]
    freq, pres = [0.5, -1.0], [1.5, 0.25]
    rows = [_row(SamplingParams(frequency_penalty=f, presence_penalty=p), prompt=[5, 6, 7], output=ids)
            for ids, f, p in zip(outputs, freq, pres, strict=True)]
    entries = SamplingBatch.build(rows, VOCAB, EOS, CPU).frequency_presence
    assert isinstance(entries, TokenEntries)
    ours = apply_frequency_presence(logits, entries)
    expected = logits.clone()
    for i, ids in enumerate(outputs):
        for t in set(ids):
            expected[i, t] -= freq[i] * ids.count(t) + pres[i]
    torch.testing.assert_close(ours, expected)


def test_full_pipeline_matches_transformers_chain():
    """Mixed rows in one batch; each row equals transformers' chain with that row's settings."""
    logits = _logits(3, seed=5)
    settings = [dict(temperature=0.7, top_k=10, top_p=0.8, min_p=0.05, repetition_penalty=1.2),
                dict(temperature=1.3, top_p=0.6, repetition_penalty=0.9),
                dict(temperature=0.5, min_p=0.1)]
    prompt, output = [4, 8, 15], [16, 23, 42, 8]
    rows = [_row(SamplingParams(**s), prompt, output) for s in settings]
    batch = SamplingBatch.build(rows, VOCAB, EOS, CPU)
    ours = apply_truncation(apply_penalties(logits, batch), batch)
    for i, s in enumerate(settings):
        x = logits[i:i + 1].clone()
        x = RepetitionPenaltyLogitsProcessor(s.get("repetition_penalty", 1.0))(torch.tensor([prompt + output]), x)
        x = TemperatureLogitsWarper(s["temperature"])(None, x)
        if s.get("top_k"):
            x = TopKLogitsWarper(s["top_k"])(None, x)
        if s.get("top_p"):
            x = TopPLogitsWarper(s["top_p"])(None, x)
        if s.get("min_p"):
            x = MinPLogitsWarper(s["min_p"])(None, x)
        _assert_same_distribution(ours[i:i + 1], x)


# ---- greedy, masks, determinism ----

def test_greedy_fast_path_and_top_k_one_equal_argmax():
    logits = _logits(6, seed=6)
    argmax = logits.argmax(-1).tolist()
    greedy = SamplingBatch.build([_row(SamplingParams(temperature=0.0)) for _ in range(6)], VOCAB, EOS, CPU)
    assert greedy.all_greedy and not greedy.needs_processing
    assert Sampler()(logits, greedy).token_ids == argmax
    top1 = SamplingBatch.build([_row(SamplingParams(temperature=1.5, top_k=1), seed=i) for i in range(6)],
                               VOCAB, EOS, CPU)
    assert Sampler()(logits, top1).token_ids == argmax


def test_greedy_applies_penalties_and_bias_before_argmax():
    logits = torch.zeros(1, VOCAB)
    logits[0, 7], logits[0, 9] = 5.0, 4.0
    rows = [_row(SamplingParams(temperature=0.0, repetition_penalty=2.0), prompt=[7])]
    assert Sampler()(logits, SamplingBatch.build(rows, VOCAB, EOS, CPU)).token_ids == [9]
    rows = [_row(SamplingParams(temperature=0.0, logit_bias={30: 10.0}))]
    assert Sampler()(logits, SamplingBatch.build(rows, VOCAB, EOS, CPU)).token_ids == [30]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_min_tokens_masks_eos_and_stop_ids(temperature):
    logits = torch.zeros(3, VOCAB)
    logits[:, EOS[0]] = 50.0
    logits[:, 11] = 40.0  # a stop token id, the next most likely
    logits[:, 12] = 30.0
    params = SamplingParams(temperature=temperature, min_tokens=3, stop_token_ids=[11])
    rows = [_row(params, output=[5]), _row(params, output=[5, 6]), _row(params, output=[5, 6, 7])]
    out = Sampler()(logits, SamplingBatch.build(rows, VOCAB, EOS, CPU))
    assert out.token_ids == [12, 12, EOS[0]]  # masked while fewer than 3 tokens are out


def test_seeded_row_same_tokens_alone_and_in_batch_of_8():
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=1234)
    others = [SamplingParams(temperature=0.0), SamplingParams(top_k=5), SamplingParams(top_p=0.5, min_p=0.1),
              SamplingParams(temperature=1.2, repetition_penalty=1.3, frequency_penalty=0.5),
              SamplingParams(min_p=0.2, presence_penalty=1.0), SamplingParams(top_k=3, top_p=0.7),
              SamplingParams(logit_bias={3: 5.0}, min_tokens=4)]
    alone_gen, batch_gen = torch.Generator().manual_seed(1234), torch.Generator().manual_seed(1234)
    other_gens = [torch.Generator().manual_seed(i) for i in range(len(others))]
    alone, batched = [], []
    for step in range(30):
        logits = _logits(8, seed=100 + step, scale=1.0)  # flat enough that draws vary
        out = Sampler()(logits[3:4], SamplingBatch.build(
            [SampleRow(seeded, [1, 2], alone[:], alone_gen)], VOCAB, EOS, CPU))
        alone.append(out.token_ids[0])
        rows = [SampleRow(p, [1, 2], batched[:], g) for p, g in zip(others, other_gens, strict=True)]
        rows.insert(3, SampleRow(seeded, [1, 2], batched[:], batch_gen))
        batched.append(Sampler()(logits, SamplingBatch.build(rows, VOCAB, EOS, CPU)).token_ids[3])
    assert alone == batched
    assert len(set(alone)) > 5  # really sampled, not a constant


# ---- sampling frequencies ----

def _expected_probs(logits: torch.Tensor, kind: str, value: float) -> torch.Tensor:
    """Hand reference: the kept set by definition, renormalized."""
    probs = logits.double().softmax(-1)
    order = probs.argsort(descending=True)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    if kind == "top_k":
        keep[order[:int(value)]] = True
    elif kind == "top_p":
        mass = 0.0
        for t in order.tolist():
            if mass >= value:
                break
            keep[t], mass = True, mass + probs[t].item()
    else:
        keep = probs >= value * probs.max()
    kept = torch.where(keep, probs, 0.0)
    return kept / kept.sum()


@pytest.mark.parametrize(("kind", "value"), [("top_k", 3), ("top_p", 0.7), ("min_p", 0.2)])
def test_draw_frequencies_match_expected_probabilities(kind, value):
    logits = torch.tensor([2.0, 1.5, 1.2, 0.9, 0.5, 0.0, -0.5, -1.0])
    draws = 10_000
    params = SamplingParams(**{kind: value})
    generator = torch.Generator().manual_seed(7)  # rows share it: one uniform each, in order
    rows = [SampleRow(params, [], [], generator) for _ in range(draws)]
    out = Sampler()(logits.expand(draws, -1), SamplingBatch.build(rows, 8, [], CPU))
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=8).double()
    expected = _expected_probs(logits, kind, value) * draws
    kept = expected > 0
    assert counts[~kept].sum() == 0, "a truncated token was drawn"
    chi2 = (((counts - expected) ** 2)[kept] / expected[kept]).sum().item()
    assert 2 <= kept.sum() and chi2 < CHI2_CRITICAL_001[int(kept.sum()) - 1], chi2


# ---- logprobs ----

def test_logprobs_and_ranks_are_raw_log_softmax():
    logits = _logits(3, seed=8)
    raw = logits.log_softmax(-1)
    rows = [_row(SamplingParams(logprobs=4, repetition_penalty=1.5, logit_bias={0: 3.0}), prompt=[1, 2, 3]),
            _row(SamplingParams(logprobs=0, temperature=0.0)),
            _row(SamplingParams(temperature=2.0), seed=3)]
    out = Sampler()(logits, SamplingBatch.build(rows, VOCAB, EOS, CPU))
    for i, token in enumerate(out.token_ids):
        assert out.logprobs[i] == pytest.approx(raw[i, token].item(), abs=1e-6)
        assert out.ranks[i] == 1 + int((raw[i] > raw[i, token]).sum())
    values, ids = raw[0].topk(4)
    assert list(out.top_logprobs[0]) == ids.tolist()
    assert list(out.top_logprobs[0].values()) == pytest.approx(values.tolist(), abs=1e-6)
    assert out.top_logprobs[1] == {} and out.top_logprobs[2] == {}
    assert out.ranks[1] == 1


def test_no_logprobs_asked_gives_none():
    out = Sampler()(_logits(2), SamplingBatch.build([_row(SamplingParams()) for _ in range(2)], VOCAB, EOS, CPU))
    assert out.top_logprobs is None and out.ranks is None and out.processed_top is None
    assert len(out.logprobs) == 2


def test_processed_top_is_distribution_after_controls():
    logits = _logits(2, seed=9)
    rows = [_row(SamplingParams(temperature=0.5, top_k=3, return_processed_topk=5)),
            _row(SamplingParams(temperature=0.0, return_processed_topk=5))]
    out = Sampler()(logits, SamplingBatch.build(rows, VOCAB, EOS, CPU))
    values, ids = (logits[0] / 0.5).topk(3)
    assert [t for t, _ in out.processed_top[0]] == ids.tolist()
    assert [p for _, p in out.processed_top[0]] == pytest.approx(values.softmax(-1).tolist(), abs=1e-6)
    assert out.processed_top[1] == [(out.token_ids[1], 1.0)]


def test_prompt_logprobs_match_log_softmax():
    prompt = [5, 9, 2, 33]
    logits = _logits(3, seed=10)
    raw = logits.log_softmax(-1)
    entries = [None] + token_logprobs(logits, prompt[1:], 2)
    assert len(entries) == 4
    for pos in range(1, 4):
        token = prompt[pos]
        lp, rank = entries[pos][token]
        assert lp == pytest.approx(raw[pos - 1, token].item(), abs=1e-6)
        assert rank == 1 + int((raw[pos - 1] > raw[pos - 1, token]).sum())
        top_ids = raw[pos - 1].topk(2).indices.tolist()
        assert [entries[pos][t][1] for t in top_ids if t != token] == [r for r, t in enumerate(top_ids, 1)
                                                                        if t != token]


# ---- bad input ----

@pytest.mark.parametrize(("field", "value"), [
    ("temperature", -0.5), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2), ("min_p", 1.5),
    ("presence_penalty", 2.5), ("frequency_penalty", -3.0), ("repetition_penalty", 0.0),
    ("logprobs", 21), ("max_tokens", 0), ("min_tokens", -1), ("n", 0), ("seed", "x"),
    ("stop", [""]), ("stop_token_ids", [-1]), ("logit_bias", {5: 200.0}),
])
def test_invalid_params_raise_value_error_naming_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens_rejected():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=10, max_tokens=5)


def test_logit_bias_outside_vocab_rejected():
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingBatch.build([_row(SamplingParams(logit_bias={VOCAB: 1.0}))], VOCAB, EOS, CPU)
