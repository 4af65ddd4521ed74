"""Request bodies -> SamplingParams (protocol.py), model-free: what each API's fields become, and a
bad value as a 400 whose ``param`` is the body's own name for the field."""

from __future__ import annotations

import json

import pytest
from pydantic import BaseModel

from tokenmill.sampling_params import SamplingParams
from tokenmill.server.protocol import (
    ApiError,
    BeamRequest,
    ChatCompletionRequest,
    CompletionRequest,
    StepsRequest,
    TgiParameters,
)

MESSAGES = [{"role": "user", "content": "hi"}]


def parse(model: type[BaseModel], body: dict) -> BaseModel:
    """The body as the route gets it: parsed from JSON."""
    return model.model_validate_json(json.dumps(body))


def rejected(model: type[BaseModel], body: dict) -> ApiError:
    with pytest.raises(ApiError) as info:
        parse(model, body).to_sampling_params()
    assert info.value.status == 400
    return info.value


# ---- OpenAI ------------------------------------------------------------------------------------------


def test_unset_openai_fields_take_the_sampling_params_defaults():
    assert parse(CompletionRequest, {"prompt": "x"}).to_sampling_params() == SamplingParams(max_tokens=16)
    assert parse(ChatCompletionRequest, {"messages": MESSAGES}).to_sampling_params() == SamplingParams(max_tokens=None)


def test_completion_fields_map_one_to_one():
    body = {"prompt": "x", "n": 2, "max_tokens": 7, "min_tokens": 1, "temperature": 0.5, "top_k": 40, "top_p": 0.9,
            "min_p": 0.05, "presence_penalty": 0.5, "frequency_penalty": -0.5, "repetition_penalty": 1.1,
            "logit_bias": {"13": -100}, "seed": 3, "stop": "\n", "stop_token_ids": [2], "ignore_eos": True,
            "include_stop_str_in_output": True, "logprobs": 4, "skip_special_tokens": False, "best_of": 2}
    assert parse(CompletionRequest, body).to_sampling_params() == SamplingParams(
        n=2, max_tokens=7, min_tokens=1, temperature=0.5, top_k=40, top_p=0.9, min_p=0.05, presence_penalty=0.5,
        frequency_penalty=-0.5, repetition_penalty=1.1, logit_bias={13: -100.0}, seed=3, stop=["\n"],
        stop_token_ids=[2], ignore_eos=True, include_stop_str_in_output=True, logprobs=4,
        skip_special_tokens=False)


def test_completion_beam_fields():
    body = {"prompt": "x", "n": 2, "num_beams": 3, "length_penalty": 0.5, "early_stopping": "never", "temperature": 0}
    assert parse(CompletionRequest, body).to_sampling_params() == SamplingParams(
        n=2, num_beams=3, length_penalty=0.5, early_stopping="never", temperature=0.0)


@pytest.mark.parametrize(("extra", "logprobs"), [({}, None), ({"logprobs": True}, 0),
                                                 ({"logprobs": True, "top_logprobs": 3}, 3),
                                                 ({"logprobs": False}, None)])
def test_chat_logprobs_and_top_logprobs_become_logprobs(extra, logprobs):
    assert parse(ChatCompletionRequest, {"messages": MESSAGES, **extra}).to_sampling_params().logprobs == logprobs


def test_chat_max_completion_tokens_wins_over_max_tokens():
    body = parse(ChatCompletionRequest, {"messages": MESSAGES, "max_tokens": 9, "max_completion_tokens": 4})
    assert body.to_sampling_params().max_tokens == 4 and body.max_tokens_field == "max_completion_tokens"
    body = parse(ChatCompletionRequest, {"messages": MESSAGES, "max_tokens": 9})
    assert body.to_sampling_params().max_tokens == 9 and body.max_tokens_field == "max_tokens"


# ---- TGI ---------------------------------------------------------------------------------------------


def test_tgi_defaults_are_greedy_with_no_seed():
    assert parse(TgiParameters, {}).to_sampling_params() == SamplingParams(max_tokens=100, temperature=0.0)


def test_tgi_without_do_sample_ignores_the_seed_and_stays_greedy():
    params = parse(TgiParameters, {"seed": 5, "repetition_penalty": 1.2}).to_sampling_params()
    assert params == SamplingParams(max_tokens=100, temperature=0.0, repetition_penalty=1.2)


@pytest.mark.parametrize("controls", [{"do_sample": True}, {"temperature": 0.5}, {"top_k": 10}, {"top_p": 0.8}])
def test_tgi_any_sampling_control_samples_with_a_reported_seed(controls):
    params = parse(TgiParameters, {**controls, "seed": 11}).to_sampling_params()
    assert params.temperature == controls.get("temperature", 1.0) and params.seed == 11
    unseeded = parse(TgiParameters, controls).to_sampling_params()
    assert isinstance(unseeded.seed, int)  # random, reported in details so the client can replay it


def test_tgi_fields_map_to_sampling_params():
    body = {"do_sample": True, "seed": 1, "max_new_tokens": 5, "top_k": 3, "top_p": 0.7, "frequency_penalty": 0.2,
            "stop": ["."], "details": True, "top_n_tokens": 2, "decoder_input_details": True}
    assert parse(TgiParameters, body).to_sampling_params() == SamplingParams(
        max_tokens=5, temperature=1.0, top_k=3, top_p=0.7, frequency_penalty=0.2, seed=1, stop=["."], logprobs=2,
        prompt_logprobs=0)
    assert parse(TgiParameters, {"details": True}).to_sampling_params().logprobs == 0


def test_tgi_best_of_samples_n_unseeded_with_logprobs_to_rank_them():
    params = parse(TgiParameters, {"best_of": 3, "do_sample": True}).to_sampling_params()
    assert params.n == 3 and params.seed is None and params.logprobs == 0


# ---- playground --------------------------------------------------------------------------------------


def test_steps_defaults_and_controls():
    assert parse(StepsRequest, {"prompt": "x"}).to_sampling_params() == SamplingParams(
        max_tokens=32, temperature=0.7, logprobs=10, return_processed_topk=10)
    body = {"prompt": "x", "top_n": 3, "temperature": 0, "top_k": 5, "min_p": 0.1, "stop": ["a"], "seed": 2,
            "ignore_eos": True, "min_tokens": 2, "max_tokens": 4}
    assert parse(StepsRequest, body).to_sampling_params() == SamplingParams(
        max_tokens=4, min_tokens=2, temperature=0.0, top_k=5, min_p=0.1, stop=["a"], seed=2, ignore_eos=True,
        logprobs=3, return_processed_topk=3)


def test_beam_is_deterministic_beam_search_returning_every_beam():
    body = {"prompt": "x", "num_beams": 3, "length_penalty": 2.0, "early_stopping": True}
    assert parse(BeamRequest, body).to_sampling_params() == SamplingParams(
        n=3, num_beams=3, max_tokens=16, temperature=0.0, length_penalty=2.0, early_stopping=True,
        return_beam_trace=True)


# ---- bad values: param is the body's name for the field ----------------------------------------------

# (model, body, param, text the message must contain)
BAD = [
    (CompletionRequest, {"prompt": "x", "top_p": 2}, "top_p", "top_p must be in (0, 1], got 2"),
    (CompletionRequest, {"prompt": "x", "max_tokens": 0}, "max_tokens", "max_tokens must be >= 1, got 0"),
    (CompletionRequest, {"prompt": "x", "logprobs": 21}, "logprobs", "logprobs must be in [0, 20]"),
    (CompletionRequest, {"prompt": "x", "logit_bias": {"5": 101}}, "logit_bias", "logit_bias[5] must be in"),
    (CompletionRequest, {"prompt": "x", "logit_bias": {"five": 1}}, "logit_bias", "token ids"),
    (CompletionRequest, {"prompt": "x", "stop": [""]}, "stop", "non-empty string"),
    (CompletionRequest, {"prompt": "x", "num_beams": 2, "temperature": 0.7}, "temperature", "beam search"),
    (CompletionRequest, {"prompt": "x", "n": 2, "best_of": 3}, "best_of", "must equal n"),
    (CompletionRequest, {"prompt": "x", "min_tokens": 20}, "min_tokens", "min_tokens (20) must be <= max_tokens"),
    (ChatCompletionRequest, {"messages": MESSAGES, "top_p": 2}, "top_p", "top_p must be in (0, 1]"),
    (ChatCompletionRequest, {"messages": MESSAGES, "max_tokens": 0}, "max_tokens", "max_tokens must be >= 1"),
    (ChatCompletionRequest, {"messages": MESSAGES, "max_completion_tokens": 0}, "max_completion_tokens",
     "max_completion_tokens: max_tokens must be >= 1, got 0"),
    (ChatCompletionRequest, {"messages": MESSAGES, "logprobs": True, "top_logprobs": 21}, "top_logprobs",
     "logprobs must be in [0, 20], got 21"),
    (ChatCompletionRequest, {"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs", "requires logprobs"),
    (TgiParameters, {"max_new_tokens": 0}, "max_new_tokens", "max_new_tokens: max_tokens must be >= 1, got 0"),
    (TgiParameters, {"top_n_tokens": 21}, "top_n_tokens", "logprobs must be in [0, 20], got 21"),
    (TgiParameters, {"do_sample": True, "best_of": 200}, "best_of", "n must be in [1, 128], got 200"),
    (TgiParameters, {"best_of": 2}, "best_of", "needs sampling"),
    (TgiParameters, {"best_of": 2, "do_sample": True, "seed": 1}, "seed", "seed must not be set"),
    (TgiParameters, {"top_p": 0}, "top_p", "top_p must be in (0, 1], got 0"),
    (TgiParameters, {"repetition_penalty": 0}, "repetition_penalty", "repetition_penalty must be > 0"),
    (StepsRequest, {"prompt": "x", "top_n": 0}, "top_n", "top_n must be in [1, 20], got 0"),
    (StepsRequest, {"prompt": "x", "temperature": -1}, "temperature", "temperature must be >= 0"),
    (BeamRequest, {"prompt": "x", "num_beams": 1}, "num_beams", "num_beams must be in [2, 16] for beam search"),
    (BeamRequest, {"prompt": "x", "num_beams": 17}, "num_beams", "num_beams must be in [1, 16], got 17"),
]


@pytest.mark.parametrize(("model", "body", "param", "message"), BAD,
                         ids=[f"{i}-{m.__name__}-{p}" for i, (m, _, p, _) in enumerate(BAD)])
def test_bad_value_is_a_400_naming_the_body_field(model, body, param, message):
    error = rejected(model, body)
    assert error.param == param
    assert message in error.message
