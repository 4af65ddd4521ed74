"""SamplingParams validation: a bad value raises SamplingParamsError naming its field in the message
and, as data, in ``param`` (the top-level field, which an API maps to its own name for it)."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from tokenmill.sampling_params import MAX_LOGPROBS, SamplingParams, SamplingParamsError

FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}

# (kwargs, the field at fault)
BAD = [
    ({"n": 0}, "n"),
    ({"n": 129}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 10, "max_tokens": 5}, "min_tokens"),
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_k": -2}, "top_k"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": "high"}, "top_p"),
    ({"min_p": 1.5}, "min_p"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3.0}, "frequency_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"logit_bias": {5: 200.0}}, "logit_bias"),
    ({"logit_bias": {-1: 1.0}}, "logit_bias"),
    ({"logit_bias": {"five": 1.0}}, "logit_bias"),
    ({"seed": "x"}, "seed"),
    ({"stop": [""]}, "stop"),
    ({"stop": ["a"] * 17}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"logprobs": MAX_LOGPROBS + 1}, "logprobs"),
    ({"prompt_logprobs": -1}, "prompt_logprobs"),
    ({"num_beams": 17}, "num_beams"),
    ({"early_stopping": "sometimes"}, "early_stopping"),
    ({"num_beams": 2, "temperature": 0.7}, "temperature"),
    ({"num_beams": 2, "top_k": 5}, "top_k"),
    ({"num_beams": 2, "top_p": 0.9}, "top_p"),
    ({"num_beams": 2, "min_p": 0.1}, "min_p"),
    ({"num_beams": 2, "n": 3}, "n"),
]


@pytest.mark.parametrize(("kwargs", "param"), BAD, ids=[f"{i}-{p}" for i, (_, p) in enumerate(BAD)])
def test_bad_value_names_its_field_as_data_and_in_the_message(kwargs, param):
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(**kwargs)
    assert info.value.param == param and param in FIELDS
    assert param in str(info.value)
    assert isinstance(info.value, ValueError)  # callers that catch ValueError keep working


def test_messages_give_the_allowed_range():
    with pytest.raises(SamplingParamsError, match=r"^top_p must be in \(0, 1\], got 1.5$"):
        SamplingParams(top_p=1.5)
    with pytest.raises(SamplingParamsError, match=r"^logit_bias\[5\] must be in \[-100.0, 100.0\], got 200.0$") as info:
        SamplingParams(logit_bias={5: 200.0})
    assert info.value.param == "logit_bias"  # the field, not the entry the message points at


def test_good_values_are_accepted_and_normalized():
    params = SamplingParams(top_k=-1, stop="x", logit_bias={"7": 2}, num_beams=4, n=4, temperature=0)
    assert params.top_k == 0 and params.stop == ["x"] and params.logit_bias == {7: 2.0}


def test_the_error_survives_pickling():
    error = pickle.loads(pickle.dumps(SamplingParamsError("n must be in [1, 128], got 0", "n")))
    assert isinstance(error, SamplingParamsError) and str(error) == "n must be in [1, 128], got 0"
    assert error.param == "n"
