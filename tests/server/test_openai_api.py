"""The OpenAI routes through the official ``openai`` client, against the real server and model."""

from __future__ import annotations

import httpx
import openai
import pytest

PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "Name one color."}]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)


def _stream_texts(stream) -> tuple[dict[int, str], dict[int, str], object]:
    """Concatenated text and finish reason per choice index, and the usage chunk's usage."""
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            piece = c.text if hasattr(c, "text") else (c.delta.content or "")
            texts[c.index] = texts.get(c.index, "") + piece
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    return texts, finish, usage


def test_models_lists_the_served_model(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == [server.model]


def test_completion_greedy_stream_equals_non_stream_with_usage(client, server):
    kwargs = {"model": server.model, "prompt": PROMPT, "max_tokens": 5, "temperature": 0,
              "extra_body": {"ignore_eos": True}}
    full = client.completions.create(**kwargs)
    n_prompt = len(server.engine.info.tokenizer.encode(PROMPT))
    assert full.usage.prompt_tokens == n_prompt
    assert full.usage.completion_tokens == 5
    assert full.usage.total_tokens == n_prompt + 5
    assert full.choices[0].finish_reason == "length"
    assert full.choices[0].text.strip()
    texts, finish, usage = _stream_texts(client.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}))
    assert texts == {0: full.choices[0].text}
    assert finish == {0: "length"}
    assert usage.completion_tokens == 5 and usage.prompt_tokens == n_prompt


def test_completion_seed_reproducible_n2_and_stream_matches(client, server):
    kwargs = {"model": server.model, "prompt": PROMPT, "max_tokens": 5, "temperature": 1.0, "seed": 1234,
              "n": 2, "extra_body": {"ignore_eos": True}}
    a = client.completions.create(**kwargs)
    b = client.completions.create(**kwargs)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.usage.completion_tokens == 10
    texts, _, _ = _stream_texts(client.completions.create(**kwargs, stream=True))
    assert texts == {0: a.choices[0].text, 1: a.choices[1].text}
    other = client.completions.create(**{**kwargs, "seed": 99})
    assert [c.text for c in other.choices] != [c.text for c in a.choices]


def test_completion_logprobs_shape_and_greedy_choice(client, server):
    out = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=4, temperature=0,
                                    logprobs=3, extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == out.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(4)]
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert 1 <= len(top) <= 3
        assert chosen <= 0
        assert chosen == pytest.approx(max(top.values()))  # greedy picks the most likely token


def test_completion_stop_string_cuts_the_text(client, server):
    base = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=6, temperature=0,
                                     logprobs=0, extra_body={"ignore_eos": True})
    tokens = base.choices[0].logprobs.tokens
    stop = tokens[2].strip() or tokens[2]
    text = base.choices[0].text
    out = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=6, temperature=0, stop=[stop])
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].text == text[:text.index(stop)]


def test_completion_token_ids_and_several_prompts(client, server):
    ids = server.engine.info.tokenizer.encode(PROMPT)
    several = client.completions.create(model=server.model, prompt=[PROMPT, "Hello"], max_tokens=3,
                                        temperature=0)
    assert [c.index for c in several.choices] == [0, 1]
    from_ids = client.completions.create(model=server.model, prompt=ids, max_tokens=3, temperature=0)
    assert from_ids.choices[0].text == several.choices[0].text  # same tokens, same greedy continuation
    assert from_ids.usage.prompt_tokens == len(ids)
    assert several.usage.prompt_tokens == len(ids) + len(server.engine.info.tokenizer.encode("Hello"))


def test_completion_echo_prepends_the_prompt(client, server):
    out = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=2, temperature=0, echo=True)
    assert out.choices[0].text.startswith(PROMPT) and len(out.choices[0].text) > len(PROMPT)


def test_chat_stream_equals_non_stream_for_a_seed(client, server):
    kwargs = {"model": server.model, "messages": MESSAGES, "max_tokens": 5, "temperature": 0.8, "seed": 7}
    # each computes its prompt afresh (a prefix-cache hit computes the last rows in a smaller matmul, whose
    # float rounding may differ in the last bits: docs/determinism.md); stream or not must not matter
    full = client.chat.completions.create(**kwargs, extra_body={"cache_salt": "non-stream"})
    expected_prompt = server.engine.info.tokenizer.apply_chat_template(MESSAGES, tokenize=True)
    assert full.usage.prompt_tokens == len(expected_prompt)
    assert full.choices[0].message.role == "assistant"
    texts, finish, usage = _stream_texts(client.chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}, extra_body={"cache_salt": "stream"}))
    assert texts == {0: full.choices[0].message.content}
    assert finish == {0: full.choices[0].finish_reason}
    assert usage.total_tokens == full.usage.total_tokens


def test_chat_n2_logprobs_and_max_completion_tokens(client, server):
    out = client.chat.completions.create(model=server.model, messages=MESSAGES, n=2, max_completion_tokens=3,
                                         seed=3, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    assert [c.index for c in out.choices] == [0, 1]
    assert out.usage.completion_tokens == 6
    for choice in out.choices:
        assert choice.finish_reason == "length"
        content = choice.logprobs.content
        assert len(content) == 3
        assert "".join(t.token for t in content) == choice.message.content
        for t in content:
            assert len(t.top_logprobs) == 2
            assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
            assert t.bytes == list(t.token.encode())


def test_non_streaming_response_has_timing_headers(server):
    r = httpx.post(f"{server.url}/v1/completions", timeout=300,
                   json={"prompt": PROMPT, "max_tokens": 3, "ignore_eos": True, "temperature": 0})
    assert r.status_code == 200
    assert float(r.headers["x-time-to-first-token"]) > 0
    assert float(r.headers["x-time-per-output-token"]) > 0


# ~100 tokens that no other test sends, so the first request of a test starts cold.
LONG_PROMPT = ("Prefix caching keeps the key and value vectors of a prompt's full blocks after the request ends. "
               "When a later request starts with the same tokens, the engine reuses those blocks instead of "
               "running the prompt through the model again, so the time to first token drops and the cache "
               "serves a share of the prompt. The OpenAI usage object reports that share as cached tokens, and "
               "the server counts the tokens it looked up and found in two Prometheus counters.")


def _cached(usage) -> int:
    cached = usage.prompt_tokens_details.cached_tokens
    assert isinstance(cached, int) and 0 <= cached <= usage.prompt_tokens
    return cached


def test_usage_reports_cached_prompt_tokens(client, server):
    kwargs = {"model": server.model, "max_tokens": 2, "temperature": 0, "extra_body": {"ignore_eos": True}}
    _cached(client.completions.create(prompt=PROMPT, **kwargs).usage)
    _, _, usage = _stream_texts(client.completions.create(
        prompt=PROMPT, **kwargs, stream=True, stream_options={"include_usage": True}))
    _cached(usage)
    _cached(client.chat.completions.create(messages=MESSAGES, **kwargs).usage)
    _, _, usage = _stream_texts(client.chat.completions.create(
        messages=MESSAGES, **kwargs, stream=True, stream_options={"include_usage": True}))
    _cached(usage)
    m = server.metrics()
    for name in ("tokenmill_prefix_cache_queries_total", "tokenmill_prefix_cache_hits_total",
                 "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"):
        assert m[name] >= 0, name


def test_a_repeated_prompt_is_served_from_the_prefix_cache(client, server):
    kwargs = {"model": server.model, "prompt": LONG_PROMPT, "max_tokens": 2, "temperature": 0,
              "extra_body": {"ignore_eos": True}}
    first = client.completions.create(**kwargs).usage
    assert first.prompt_tokens >= 64  # at least a few full blocks to reuse
    before = server.metrics()
    second = client.completions.create(**kwargs).usage
    after = server.metrics()
    assert _cached(second) > 0
    hits = after["tokenmill_prefix_cache_hits_total"] - before["tokenmill_prefix_cache_hits_total"]
    assert hits >= _cached(second)
    assert after["vllm:prefix_cache_hits_total"] - before["vllm:prefix_cache_hits_total"] == hits
    # n=2 samples of one prompt: the prompt, and its cached tokens, count once.
    both = client.completions.create(**kwargs, n=2).usage
    assert both.prompt_tokens == second.prompt_tokens
    assert 0 < _cached(both) <= both.prompt_tokens


def test_cache_salt_keeps_prefixes_apart(client, server):
    kwargs = {"model": server.model, "max_tokens": 2, "temperature": 0}
    prompt = "Salted: " + LONG_PROMPT
    client.completions.create(prompt=prompt, **kwargs, extra_body={"ignore_eos": True, "cache_salt": "alice"})
    other = client.completions.create(prompt=prompt, **kwargs, extra_body={"ignore_eos": True, "cache_salt": "bob"})
    same = client.completions.create(prompt=prompt, **kwargs, extra_body={"ignore_eos": True, "cache_salt": "alice"})
    assert _cached(other.usage) == 0
    assert _cached(same.usage) > 0
    assert other.choices[0].text == same.choices[0].text
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(prompt=prompt, **kwargs, extra_body={"cache_salt": ""})
    assert err.value.body["param"] == "cache_salt"
