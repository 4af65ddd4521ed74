"""The playground's endpoints (/v1/tokenize, /v1/playground/steps, /v1/playground/beam) on the real model.

They run against the session's server (tests/server/conftest.py: the default model behind the
real app). Greedy runs and the stop reasons are checked against the OpenAI route and against
the raw distribution the endpoint itself reports.
"""

from __future__ import annotations

import json
import math

import httpx
import pytest

from tokenmill.server.playground_api import token_pieces

EOS_PROMPT = "What is 2+2? Answer with just the number."  # greedy: "2 + 2 = 4<|im_end|>"
TIMEOUT = 300


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=TIMEOUT)


def steps(server, **body) -> tuple[dict, list[dict], dict]:
    """Run /v1/playground/steps; returns the start event, the token events and the done event."""
    with httpx.stream("POST", f"{server.url}/v1/playground/steps", json=body, timeout=TIMEOUT) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [line[len("data: "):] for line in resp.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    events = [json.loads(line) for line in lines[:-1]]
    assert [e["type"] for e in events] == ["start"] + ["token"] * (len(events) - 2) + ["done"], events[-1]
    return events[0], events[1:-1], events[-1]


# ---- /v1/tokenize ---------------------------------------------------------------------------------


def test_tokenize_matches_transformers_ids_and_spans_cover_the_text(server):
    text = "Hello world, naïve 東京 🦊"
    data = post(server, "/v1/tokenize", {"text": text}).json()
    # Reference: transformers' tokenizer read from the same GGUF file gives these ids (after the BOS it prepends).
    assert [t["id"] for t in data["tokens"]] == [19556, 905, 28, 15486, 46494, 17097, 247, 126, 16736, 122,
                                                 15107, 116, 228]
    assert data["text"] == text and data["count"] == 13 and data["num_chars"] == len(text)
    assert data["chars_per_token"] == pytest.approx(len(text) / 13)
    assert data["tokens"][1] == {"id": 905, "token": "Ġworld", "text": " world", "start": 5, "end": 11,
                                 "source": [5, 11], "added": False}
    # the tokenizer's own offsets into the input: the three byte tokens of " 東" all span its characters
    assert [t["source"] for t in data["tokens"][5:8]] == [[18, 20], [19, 20], [19, 20]]
    for t in data["tokens"]:
        assert text[t["start"]:t["end"]] == t["text"]
    # "東" is three byte tokens: the first two add no text, the third adds " 東".
    assert [t["text"] for t in data["tokens"][5:8]] == ["", "", " 東"]
    assert data["tokens"][-1]["end"] == len(text)


def test_tokenize_with_chat_template_matches_the_chat_route_prompt(server):
    data = post(server, "/v1/tokenize", {"text": "Name one color.", "chat_template": True}).json()
    assert data["text"].startswith("<|im_start|>") and data["text"].endswith("<|im_start|>assistant\n")
    assert "Name one color." in data["text"]
    special = [t for t in data["tokens"] if t["token"] == "<|im_start|>"]
    assert special and all(t["text"] == "<|im_start|>" for t in special)
    # The chat route prefills exactly these tokens: its usage counts them.
    chat = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Name one color."}],
                                                 "max_tokens": 1, "temperature": 0}).json()
    assert chat["usage"]["prompt_tokens"] == data["count"]
    plain = post(server, "/v1/tokenize", {"text": "Name one color."}).json()
    assert plain["count"] < data["count"]


def test_token_pieces_concatenate_to_the_decoded_text(server):
    tokenizer = server.engine.info.tokenizer
    text = "emoji 🦊🦊 and CJK 東京, tabs\tand\nnewlines"
    ids = tokenizer.encode(text)
    pieces = token_pieces(tokenizer, ids)
    assert "".join(p for p, _, _ in pieces) == tokenizer.decode(ids, skip_special_tokens=False) == text
    assert all(end - start == len(p) for p, start, end in pieces)


@pytest.mark.parametrize(("body", "param"), [({}, "text"), ({"text": "hi", "color": 1}, "color"),
                                              ({"text": "hi", "chat_template": "yes"}, "chat_template")])
def test_tokenize_rejects_bad_bodies_with_400_naming_the_field(server, body, param):
    resp = post(server, "/v1/tokenize", body)
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == param


# ---- /v1/playground/steps -------------------------------------------------------------------------


def test_greedy_steps_equal_the_completion_route_and_stop_at_eos(server):
    start, tokens, done = steps(server, prompt=EOS_PROMPT, temperature=0, max_tokens=20, top_n=5)
    assert start["prompt_text"].endswith("<|im_start|>assistant\n")
    assert len(start["prompt_token_ids"]) == len(start["prompt_tokens"])
    chat = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": EOS_PROMPT}],
                                                 "max_tokens": 20, "temperature": 0}).json()
    assert done["text"] == chat["choices"][0]["message"]["content"] == "2 + 2 = 4"
    assert done["finish_reason"] == "stop" and done["stop_kind"] == "eos" and done["stop_reason"] is None
    assert [t["id"] for t in tokens] == done["token_ids"]
    assert tokens[-1]["text"] == "<|im_end|>"
    for t in tokens:
        assert t["raw_top"][0]["id"] == t["id"] and t["rank"] == 1  # greedy = the raw argmax
        assert t["processed_top"] == [{"id": t["id"], "text": t["text"], "prob": 1.0}]
        probs = [c["prob"] for c in t["raw_top"]]
        assert probs == sorted(probs, reverse=True) and len(probs) == 5
        assert all(c["prob"] == pytest.approx(math.exp(c["logprob"])) for c in t["raw_top"])
    m = done["metrics"]
    assert m["generated_tokens"] == len(tokens) and m["ttft_s"] > 0 and m["tpot_s"] > 0 and m["tokens_per_s"] > 0
    assert m["prompt_tokens"] == len(start["prompt_token_ids"])


def test_processed_top_is_the_raw_distribution_after_temperature_and_top_k(server):
    temperature, top_k = 0.5, 3
    _, tokens, done = steps(server, prompt="Write a story about a cat.", temperature=temperature, top_k=top_k,
                            max_tokens=6, top_n=5, seed=7)
    assert done["stop_kind"] == "length" and len(tokens) == 6
    for t in tokens:
        # After top-k only the k best raw tokens remain, reweighted by softmax(logprob / T).
        best = t["raw_top"][:top_k]
        weights = [math.exp(c["logprob"] / temperature) for c in best]
        # compared as maps: the default model's logits can tie exactly, and tied tokens have no set order
        expected = {c["id"]: w / sum(weights) for c, w in zip(best, weights, strict=True)}
        got = {c["id"]: c["prob"] for c in t["processed_top"]}
        assert got.keys() == expected.keys()
        assert [got[i] for i in expected] == pytest.approx(list(expected.values()), abs=1e-4)
        assert t["id"] in got  # the sample came from what the controls left
        assert t["metrics"]["generated_tokens"] == t["index"] + 1


def test_seeded_steps_repeat(server):
    body = {"prompt": "Tell me a joke.", "temperature": 1.0, "max_tokens": 5, "seed": 123, "top_n": 2}
    first = steps(server, **body)[2]["token_ids"]
    assert steps(server, **body)[2]["token_ids"] == first


def test_stop_string_ends_the_run_and_is_cut(server):
    _, tokens, done = steps(server, prompt=EOS_PROMPT, temperature=0, max_tokens=20, stop=["="], top_n=1)
    assert done["finish_reason"] == "stop" and done["stop_kind"] == "stop_string" and done["stop_reason"] == "="
    assert done["text"] == "2 + 2 "
    assert "".join(t.get("delta_text", "") for t in tokens) == done["text"]


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": "hi", "top_n": 0}, "top_n"),
    ({"prompt": "hi", "top_n": 21}, "top_n"),
    ({"prompt": "hi", "temperature": -1}, "temperature"),
    ({"prompt": "hi", "top_p": 0}, "top_p"),
    ({"prompt": "hi", "max_tokens": 100000}, "max_tokens"),
    ({"prompt": "hi", "logprobs": 3}, "logprobs"),
    ({"prompt": ""}, "prompt"),
])
def test_steps_rejects_bad_input_with_400_naming_the_field(server, body, param):
    resp = post(server, "/v1/playground/steps", {**body, "chat_template": False})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param


# ---- /v1/playground/beam --------------------------------------------------------------------------


def test_beam_returns_ranking_and_trace(server):
    body = {"prompt": "The capital of France is", "chat_template": False, "num_beams": 3, "max_tokens": 4}
    resp = post(server, "/v1/playground/beam", body)
    assert resp.status_code == 200, resp.text
    data = resp.json()
    ranking = data["ranking"]
    assert len(ranking) == 3 and [r["rank"] for r in ranking] == [1, 2, 3]
    reference = post(server, "/v1/completions", {"prompt": body["prompt"], "max_tokens": 4, "num_beams": 3,
                                                 "n": 3, "temperature": 0}).json()
    assert [r["text"] for r in ranking] == [c["text"] for c in reference["choices"]]
    trace = data["trace"]
    assert trace, "the engine reported no beam_trace"
    assert [s["step"] for s in trace] == list(range(1, len(trace) + 1)) and len(trace) <= 4
    live = {0}  # beam indexes a candidate may extend: the prompt at step 1
    for step in trace:
        cands = step["candidates"]
        assert {c["status"] for c in cands} <= {"kept", "pruned", "finished"}
        assert all(c["parent"] in live for c in cands)
        kept = sorted(c["beam"] for c in cands if c["status"] == "kept")
        assert kept == list(range(len(kept))) and len(kept) <= 3
        assert all(isinstance(c["text"], str) and isinstance(c["score"], float) for c in cands)
        live = set(kept)
    # The winner is a path through the trace: kept at every step, then finished.
    beam_index = 0
    for i, token in enumerate(ranking[0]["token_ids"]):
        node = [c for c in trace[i]["candidates"] if c["parent"] == beam_index and c["token_id"] == token]
        assert len(node) == 1, (i, token)
        last = i == len(ranking[0]["token_ids"]) - 1
        assert node[0]["status"] == ("finished" if last else "kept")
        beam_index = node[0]["beam"]
    assert node[0]["score"] == pytest.approx(ranking[0]["cumulative_logprob"])
    assert post(server, "/v1/playground/beam", {**body, "num_beams": 1}).json()["error"]["param"] == "num_beams"
