"""Structured outputs and tool calls over HTTP: the ``openai`` client (response_format, guided_*, tools with
tool_choice, streamed and not), the ``text-generation`` client (TGI grammar), and a 400 for each bad input."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest
from text_generation import Client
from text_generation.types import Grammar, GrammarType

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "population"], "properties": {
    "city": {"type": "string", "maxLength": 20}, "population": {"type": "integer", "minimum": 0, "maximum": 10**8}}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"], "properties": {
        "city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "additionalProperties": False, "required": ["zone"],
                                       "properties": {"zone": {"enum": ["UTC", "CET", "PST"]}}}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)


def test_response_format_json_schema_on_chat_and_completions(client, server):
    response_format = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}}
    chat = client.chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": "Give a city as JSON."}], n=2, seed=1,
        temperature=1.0, max_tokens=60, response_format=response_format)
    for choice in chat.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    text = client.completions.create(model=server.model, prompt="A JSON object:", max_tokens=40, temperature=0,
                                     extra_body={"response_format": {"type": "json_object"}}).choices[0].text
    assert isinstance(json.loads(text), dict)


def test_guided_regex_and_choice_through_extra_body(client, server):
    date = r"20\d{2}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"
    out = client.completions.create(model=server.model, prompt="Today is", max_tokens=20, temperature=1.0, seed=4,
                                    extra_body={"guided_regex": date})
    assert re.fullmatch(date, out.choices[0].text)
    chat = client.chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": "Is the sky blue?"}], max_tokens=5, n=3,
        temperature=1.0, extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert all(c.message.content in ("yes", "no") for c in chat.choices)


def test_tool_choice_required_returns_tool_calls(client, server):
    # one call: with parallel calls allowed a 135M model greedily repeats the same call until max_tokens
    out = client.chat.completions.create(model=server.model, messages=ASK, tools=[WEATHER, TIME],
                                         tool_choice="required", parallel_tool_calls=False, temperature=0,
                                         max_tokens=60)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls
    assert calls and all(c.type == "function" and c.id.startswith("call_") for c in calls)
    for call in calls:
        tool = WEATHER if call.function.name == "get_weather" else TIME
        jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def test_streamed_tool_calls_assemble_to_the_non_streamed_ones(client, server):
    kwargs = {"model": server.model, "messages": ASK, "tools": [WEATHER, TIME], "temperature": 0, "max_tokens": 60,
              "parallel_tool_calls": False}
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        full = client.chat.completions.create(**kwargs, tool_choice=choice).choices[0]
        calls: dict[int, dict[str, str]] = {}
        finish = None
        for chunk in client.chat.completions.create(**kwargs, tool_choice=choice, stream=True):
            for c in chunk.choices:
                finish = c.finish_reason or finish
                assert not c.delta.content
                for d in c.delta.tool_calls or []:
                    call = calls.setdefault(d.index, {"name": "", "arguments": ""})
                    call["name"] += d.function.name or ""
                    call["arguments"] += d.function.arguments or ""
        assert finish == full.finish_reason == "tool_calls"
        assert [calls[i] for i in sorted(calls)] == [
            {"name": t.function.name, "arguments": t.function.arguments} for t in full.message.tool_calls]
    assert json.loads(full.message.tool_calls[0].function.arguments)["unit"] in ("celsius", "fahrenheit")


def test_tool_history_and_tool_choice_none(client, server):
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"}]
    out = client.chat.completions.create(model=server.model, messages=history, tools=[WEATHER], tool_choice="none",
                                         temperature=0, max_tokens=20)
    assert out.choices[0].message.tool_calls is None
    assert out.choices[0].message.content


def test_tgi_grammar_through_the_text_generation_client(server):
    tgi = Client(server.url, timeout=300)
    out = tgi.generate("A city as JSON:", max_new_tokens=60, grammar=Grammar(type=GrammarType.Json, value=SCHEMA))
    jsonschema.validate(json.loads(out.generated_text), SCHEMA)
    text = "".join(r.token.text for r in tgi.generate_stream(
        "Year:", max_new_tokens=8, grammar=Grammar(type=GrammarType.Regex, value=r"(19|20)\d\d")) if not r.token.special)
    assert re.fullmatch(r"(19|20)\d\d", text)


@pytest.mark.parametrize("path, body, param, message", [
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "strnig"}}}}, "response_format", "strnig"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "if": {}}}}}, "response_format", "if"),
    ("/v1/chat/completions", {"response_format": {"type": "xml"}}, "response_format", "xml"),
    ("/v1/completions", {"guided_regex": "a(b"}, "guided_regex", "unclosed group"),
    ("/v1/completions", {"guided_grammar": "start: nothing_here"}, "guided_grammar", "nothing_here"),
    ("/v1/completions", {"guided_json": "{oops"}, "guided_json", "not valid JSON"),
    ("/v1/completions", {"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "at most one"),
    ("/v1/completions", {"guided_choice": ["a"], "num_beams": 2, "temperature": 0}, "guided_choice", "beam"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "a b"}}]},
     "tools[0].function.name", "letters"),
    ("/v1/chat/completions", {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
     "tool_choice", "no tool named"),
    ("/v1/chat/completions", {"tool_choice": "required"}, "tool_choice", "needs tools"),
    ("/v1/chat/completions", {"tools": [WEATHER], "tool_choice": "required", "guided_regex": "a"}, "tool_choice",
     "cannot be combined"),
    ("/generate", {"parameters": {"grammar": {"type": "json", "value": {"type": "strnig"}}}}, "grammar", "strnig"),
    ("/generate", {"parameters": {"grammar": {"type": "cfg", "value": "x"}}}, "grammar", "grammar must be"),
])
def test_bad_input_gets_a_400_naming_the_field(server, path, body, param, message):
    if path == "/generate":
        body = {"inputs": "x", **body}
    elif path == "/v1/completions":
        body = {"model": server.model, "prompt": "x", "max_tokens": 2, **body}
    else:
        body = {"model": server.model, "messages": ASK, "max_tokens": 2, **body}
    r = httpx.post(f"{server.url}{path}", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param
    assert message in error["message"]


def test_playground_steps_mark_the_tokens_the_grammar_masked(server):
    body = {"prompt": "What year did the war end?", "max_tokens": 6, "temperature": 0, "top_n": 8,
            "structured_outputs": {"regex": r"(19|20)\d\d"}}
    with httpx.stream("POST", f"{server.url}/v1/playground/steps", json=body, timeout=300) as resp:
        assert resp.status_code == 200
        events = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
    tokens = [e for e in events if e["type"] == "token"]
    assert re.fullmatch(r"(19|20)\d\d", "".join(e["text"] for e in tokens))
    for e in tokens:
        assert 0 < e["grammar_allowed"] < 1000
        assert not next(c for c in e["raw_top"] if c["id"] == e["id"])["masked"]
    assert any(c["masked"] for e in tokens for c in e["raw_top"])  # the model wanted words, not digits
