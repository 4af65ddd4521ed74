"""Token-level stop checks: EOS, stop ids, min/max tokens, context length."""

from __future__ import annotations

from tokenmill.engine.request import FinishReason, Sequence
from tokenmill.engine.stopping import check_stop
from tokenmill.sampling_params import SamplingParams

EOS = [2, 3]
PROMPT = [10, 11, 12]


def _seq(output: list[int]) -> Sequence:
    return Sequence(seq_id=0, token_ids=PROMPT + output, num_prompt_tokens=len(PROMPT))


def test_eos_stops_without_stop_reason():
    for eos in EOS:
        assert check_stop(_seq([5, eos]), SamplingParams(), EOS, 100) == (FinishReason.STOP, None)


def test_ignore_eos_keeps_going():
    assert check_stop(_seq([5, 2]), SamplingParams(ignore_eos=True), EOS, 100) is None


def test_stop_token_id_is_the_stop_reason_even_with_ignore_eos():
    params = SamplingParams(stop_token_ids=[7], ignore_eos=True)
    assert check_stop(_seq([5, 7]), params, EOS, 100) == (FinishReason.STOP, 7)
    assert check_stop(_seq([7, 5]), params, EOS, 100) is None


def test_eos_and_stop_ids_ignored_before_min_tokens():
    params = SamplingParams(min_tokens=2, stop_token_ids=[7])
    # Output index 0 and 1 are below min_tokens (the sampler masks them there too).
    assert check_stop(_seq([2]), params, EOS, 100) is None
    assert check_stop(_seq([5, 7]), params, EOS, 100) is None
    assert check_stop(_seq([5, 6, 2]), params, EOS, 100) == (FinishReason.STOP, None)
    assert check_stop(_seq([5, 6, 7]), params, EOS, 100) == (FinishReason.STOP, 7)


def test_max_tokens_is_length():
    params = SamplingParams(max_tokens=3)
    assert check_stop(_seq([5, 6]), params, EOS, 100) is None
    assert check_stop(_seq([5, 6, 7]), params, EOS, 100) == (FinishReason.LENGTH, None)


def test_eos_on_the_last_allowed_token_is_stop_not_length():
    assert check_stop(_seq([5, 2]), SamplingParams(max_tokens=2), EOS, 100) == (FinishReason.STOP, None)


def test_context_limit_is_length():
    params = SamplingParams(max_tokens=None)
    assert check_stop(_seq([5]), params, EOS, 5) is None
    assert check_stop(_seq([5, 6]), params, EOS, 5) == (FinishReason.LENGTH, None)
