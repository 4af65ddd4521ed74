"""The command line: generate (streamed and --json), tokenize, one-line errors with exit code 2, and
flags whose defaults and values are the EngineConfig and SamplingParams fields they set."""

import io
import json
import re
import subprocess
import sys
import time

import pytest

from tokenmill.cli import (
    CLI_MAX_TOKENS,
    CLI_TEMPERATURE,
    build_parser,
    engine_config_from_args,
    sampling_params_from_args,
)
from tokenmill.config import EngineConfig
from tokenmill.sampling_params import SamplingParams


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


def test_chat_keeps_the_conversation_takes_commands_and_ends_on_an_empty_line():
    turns = ["What is the capital of France?", "/help", "/set top_k 1", "/set top_p 2", "/set nope 1", "/show",
             "And of Germany?", "/reset", ""]
    r = subprocess.run([sys.executable, "-m", "tokenmill", "chat", "--temperature", "0", "--max-tokens", "24"],
                       input="\n".join(turns) + "\n", capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout and "Berlin" in r.stdout
    assert r.stderr.count("TTFT") == 2
    assert "/reset" in r.stderr and "(top_k = 1)" in r.stderr and "top_k=1 " in r.stderr
    assert "top_p must be in (0, 1], got 2.0" in r.stderr and "usage: /set NAME VALUE" in r.stderr
    assert "(conversation cleared)" in r.stderr


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_loading_shows_a_spinner_on_a_terminal_only(monkeypatch):
    from tokenmill.commands import _loading

    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with _loading("some-model"):
        time.sleep(0.25)
    text = terminal.getvalue()
    assert "\rLoading some-model |" in text and "\rLoading some-model /" in text  # the spinner turned
    assert re.search(r"\r\033\[KLoaded some-model in \d+\.\d s\n$", text)
    pipe = io.StringIO()
    monkeypatch.setattr(sys, "stderr", pipe)
    with pytest.raises(ValueError), _loading("bad-model"):
        raise ValueError("no such model")
    assert pipe.getvalue() == ""  # on a pipe an error stays the only line


def test_version_and_help_show_defaults(capsys):
    from tokenmill import __version__

    for argv in (["--version"], ["generate", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args(argv)
        assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"tokenmill {__version__}" in out
    assert "(default: smollm2-135m-instruct)" in out and "(default: 256)" in out  # --model, --max-tokens


# ---- flags -> EngineConfig / SamplingParams (no model) ------------------------------------------


@pytest.mark.parametrize("argv", [["generate", "hi"], ["chat"], ["serve"], ["bench"]])
def test_engine_flag_defaults_are_engine_config_defaults(argv):
    # but serve's --compile: unless told, the server compiles its decode where that pays (compile=None: auto)
    expected = EngineConfig(compile=None) if argv == ["serve"] else EngineConfig()
    assert engine_config_from_args(build_parser().parse_args(argv)) == expected
    assert engine_config_from_args(build_parser().parse_args([*argv, "--no-compile"])).compile is False


def test_sampling_flag_defaults_are_sampling_params_defaults_but_length_and_temperature():
    args = build_parser().parse_args(["generate", "hi"])
    assert sampling_params_from_args(args) == SamplingParams(max_tokens=CLI_MAX_TOKENS, temperature=CLI_TEMPERATURE,
                                                             seed=EngineConfig().seed)
    beams = build_parser().parse_args(["generate", "--num-beams", "2", "hi"])
    assert sampling_params_from_args(beams).temperature == 0.0  # beam search is deterministic


def test_every_engine_flag_sets_its_field():
    args = build_parser().parse_args([
        "generate", "--model", "m.gguf", "--dtype", "float32", "--device", "cpu", "--quantization", "none",
        "--max-model-len", "256", "--max-num-seqs", "3", "--max-num-batched-tokens", "64", "--block-size", "8",
        "--kv-cache-memory", "0.5", "--seed", "9", "--threads", "2", "--compile", "--no-prefix-caching", "hi"])
    assert engine_config_from_args(args) == EngineConfig(
        model="m.gguf", dtype="float32", device="cpu", quantization="none", max_model_len=256, max_num_seqs=3,
        max_num_batched_tokens=64, block_size=8, kv_cache_memory_gb=0.5, seed=9, threads=2, compile=True,
        enable_prefix_caching=False)


def test_every_sampling_flag_sets_its_field():
    args = build_parser().parse_args([
        "generate", "--max-tokens", "5", "--min-tokens", "1", "--temperature", "0.5", "--top-k", "4",
        "--top-p", "0.9", "--min-p", "0.1", "--presence-penalty", "0.5", "--frequency-penalty", "-0.5",
        "--repetition-penalty", "1.2", "--stop", "a", "--stop", "b", "--ignore-eos", "--n", "2", "--seed", "7",
        "--logprobs", "3", "hi"])
    assert sampling_params_from_args(args) == SamplingParams(
        max_tokens=5, min_tokens=1, temperature=0.5, top_k=4, top_p=0.9, min_p=0.1, presence_penalty=0.5,
        frequency_penalty=-0.5, repetition_penalty=1.2, stop=["a", "b"], ignore_eos=True, n=2, seed=7, logprobs=3)
    beams = build_parser().parse_args(["chat", "--num-beams", "3", "--length-penalty", "0.5",
                                       "--early-stopping", "never"])
    assert sampling_params_from_args(beams) == SamplingParams(
        max_tokens=CLI_MAX_TOKENS, temperature=0.0, num_beams=3, length_penalty=0.5, early_stopping="never", seed=0)


def test_generate_with_a_json_schema_or_a_bad_regex(tmp_path):
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"],
              "additionalProperties": False}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    r = tokenmill("generate", "--json", "--chat", "--json-schema", str(tmp_path / "schema.json"),
                  "Is water wet? Answer in JSON.")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)["outputs"][0]
    assert json.loads(out["text"])["answer"] in ("yes", "no") and out["finish_reason"] == "stop"
    r = tokenmill("generate", "--regex", "a(b", "x")
    assert r.returncode == 2
    assert r.stderr.strip().startswith("tokenmill: error: structured_outputs.regex:") and "unclosed group" in r.stderr
    r = tokenmill("generate", "--json-schema", str(tmp_path / "missing.json"), "x")
    assert r.returncode == 2 and "--json-schema: cannot read" in r.stderr
