"""The command line: generate (streamed and --json), tokenize, and one-line errors with exit code 2."""

import json
import subprocess
import sys

import pytest


def tokenmill(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tokenmill", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_generate_chat_answers_paris_and_prints_metrics():
    r = tokenmill("generate", "--chat", "--temperature", "0", "--max-tokens", "24",
                  "What is the capital of France?")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "TTFT" in r.stderr and "TPOT" in r.stderr and "tokens/s" in r.stderr


def test_generate_json_has_the_documented_shape():
    r = tokenmill("generate", "--json", "--temperature", "0", "--max-tokens", "8", "--logprobs", "2",
                  "The capital of France is")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    out = data["outputs"][0]
    assert set(out) >= {"text", "token_ids", "finish_reason", "cumulative_logprob"}
    assert len(out["token_ids"]) <= 8 and out["finish_reason"] in ("stop", "length")
    assert out["cumulative_logprob"] < 0
    assert len(out["logprobs"]) == len(out["token_ids"])
    assert set(data["metrics"]) == {"ttft_s", "tpot_s", "prompt_tokens", "generated_tokens", "tokens_per_s"}
    assert data["metrics"]["generated_tokens"] == len(out["token_ids"]) and data["metrics"]["ttft_s"] > 0


def test_tokenize_prints_ids_and_tokens():
    r = tokenmill("tokenize", "--json", "Hello, world!")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["count"] == len(data["ids"]) == len(data["tokens"]) > 1
    assert "".join(data["tokens"]).replace("Ġ", " ") == "Hello, world!"


@pytest.mark.parametrize("args, message", [
    (["--model", "/nonexistent/model.gguf", "hi"], "/nonexistent/model.gguf"),
    (["--max-tokens", "0", "hi"], "max_tokens"),
    (["--temperature", "-1", "hi"], "temperature"),
    (["--top-p", "1.5", "hi"], "top_p"),
    ([""], "prompt must not be empty"),
])
def test_bad_input_is_one_line_and_exit_code_2(args, message):
    r = tokenmill("generate", *args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tokenmill: error:") and message in lines[0]


def test_non_model_file_is_a_clear_error(tmp_path):
    bogus = tmp_path / "notes.gguf"
    bogus.write_text("not a model")
    r = tokenmill("generate", "--model", str(bogus), "hi")
    assert r.returncode == 2 and "notes.gguf" in r.stderr


def test_chat_keeps_the_conversation_and_ends_on_an_empty_line():
    r = subprocess.run([sys.executable, "-m", "tokenmill", "chat", "--temperature", "0", "--max-tokens", "24"],
                       input="What is the capital of France?\nAnd of Germany?\n\n", capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout and "Berlin" in r.stdout
    assert r.stderr.count("TTFT") == 2
