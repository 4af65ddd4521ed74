"""The work behind `tokenmill generate`, `chat` and `tokenize` (argument parsing lives in cli.py)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import sys
import threading
import time
from collections.abc import Iterator

from tokenmill.cli import engine_config_from_args, sampling_params_from_args
from tokenmill.config import EngineConfig
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams

# what `/set NAME VALUE` may change between chat turns
CHAT_SETTINGS = ("max_tokens", "min_tokens", "temperature", "top_k", "top_p", "min_p", "presence_penalty",
                 "frequency_penalty", "repetition_penalty", "seed", "stop")
CHAT_HELP = f"""commands:
  /help              this list
  /reset             forget the conversation (the system message stays)
  /set NAME VALUE    a sampling option for the next turns, e.g. /set temperature 0.2 (VALUE none: the default)
                     NAME: {", ".join(CHAT_SETTINGS)}
  /show              the current sampling options
  /exit              quit (so do an empty line and Ctrl-D)"""


def generate(args: argparse.Namespace) -> int:
    """Stream one completion to stdout, then a metrics line (or one JSON object with --json)."""
    params = sampling_params_from_args(args)
    if not args.prompt:
        raise ValueError("prompt must not be empty")
    engine = _load_engine(engine_config_from_args(args))
    prompt_ids = _prompt_ids(engine.tokenizer, args.prompt, args.chat, args.system)
    stream = not args.json and params.n == 1 and not params.use_beam_search
    final = _run_one(engine, prompt_ids, params, args.prompt, stream)
    if args.json:
        print(json.dumps(_as_json(final, params.logprobs is not None)))
        return 0
    if stream:
        print()
    else:  # n > 1 or beam search: each sample under its own header
        for c in final.outputs:
            score = f"score {c.cumulative_logprob:.3f} " if params.use_beam_search else ""
            print(f"--- [{c.index}] {score}" + "-" * 20)
            print(c.text)
    print(_metrics_line(final), file=sys.stderr)
    return 0


def chat(args: argparse.Namespace) -> int:
    """Interactive chat: each line you type is a user turn; /help lists the commands; an empty line,
    /exit or EOF ends it."""
    params = sampling_params_from_args(args)
    engine = _load_engine(engine_config_from_args(args))
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    print("tokenmill chat: type a message; /help for commands, an empty line to quit.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip() or line.strip() in ("/exit", "/quit"):
            break
        if line.startswith("/"):
            if line.strip() == "/reset":
                messages = list(system)
                print("(conversation cleared)", file=sys.stderr)
            else:
                params = _chat_command(line.strip(), params)
            continue
        messages.append({"role": "user", "content": line})
        prompt = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        ids = engine.tokenizer.encode(prompt, add_special_tokens=False)
        final = _run_one(engine, ids, params, prompt, stream=True)
        print()
        print(_metrics_line(final), file=sys.stderr)
        messages.append({"role": "assistant", "content": final.outputs[0].text})
    return 0


def _chat_command(line: str, params: SamplingParams) -> SamplingParams:
    """Run a chat command other than /exit and /reset; returns the sampling options for the next turns."""
    name, *rest = line[1:].split(maxsplit=2)
    if name == "help":
        print(CHAT_HELP, file=sys.stderr)
    elif name == "show":
        print(" ".join(f"{f}={getattr(params, f)!r}" for f in CHAT_SETTINGS), file=sys.stderr)
    elif name == "set" and len(rest) == 2 and rest[0] in CHAT_SETTINGS:
        try:
            params = dataclasses.replace(params, **{rest[0]: _setting_value(rest[0], rest[1])})
            print(f"({rest[0]} = {getattr(params, rest[0])!r})", file=sys.stderr)
        except ValueError as e:  # SamplingParams' own check: the option keeps its value
            print(f"error: {e}", file=sys.stderr)
    elif name == "set":
        print(f"usage: /set NAME VALUE with NAME one of {', '.join(CHAT_SETTINGS)}", file=sys.stderr)
    else:
        print(f"unknown command /{name}; /help lists them", file=sys.stderr)
    return params


def _setting_value(name: str, text: str) -> object:
    """The typed value of ``/set NAME TEXT``: none (the default), a string for stop, else a number."""
    default = next(f.default for f in dataclasses.fields(SamplingParams) if f.name == name)
    if text.lower() == "none":
        return default
    if name == "stop":
        return [text]
    kind = float if isinstance(default, float) else int
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{name} must be {'a number' if kind is float else 'an integer'}, got {text!r}") from None


@contextlib.contextmanager
def _loading(model: str) -> Iterator[None]:
    """On a terminal, a spinner on stderr while the model loads, then how long it took. Not on a pipe or
    a file, whose reader wants the output alone (and an error as its one line)."""
    stream = sys.stderr
    if not stream.isatty():
        yield
        return
    start, done, label = time.perf_counter(), threading.Event(), f"Loading {model}"

    def spin() -> None:
        for frame in itertools.cycle("|/-\\"):
            print(f"\r{label} {frame} {time.perf_counter() - start:.0f} s", end="", file=stream, flush=True)
            if done.wait(0.1):
                return

    spinner = threading.Thread(target=spin, daemon=True)
    spinner.start()
    try:
        yield
    finally:
        done.set()
        spinner.join()
        print("\r\033[K", end="", file=stream, flush=True)  # clear the spinner's line
    print(f"Loaded {model} in {time.perf_counter() - start:.1f} s", file=stream, flush=True)


def _load_engine(config: EngineConfig):
    from tokenmill.engine.llm_engine import LLMEngine

    with _loading(config.model):
        return LLMEngine(config)


def tokenize(args: argparse.Namespace) -> int:
    """Print the token ids of TEXT and the string of each token."""
    from tokenmill.model.source import load_tokenizer
    tokenizer = load_tokenizer(args.model)
    if args.chat:
        ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": args.text}]),
                               add_special_tokens=False)
    else:
        ids = tokenizer.encode(args.text)
    tokens = tokenizer.convert_ids_to_tokens(ids)
    if args.json:
        print(json.dumps({"ids": ids, "tokens": tokens, "count": len(ids)}))
        return 0
    print(f"{len(ids)} tokens")
    print("ids:", ids)
    for i, t in zip(ids, tokens):
        print(f"{i:>8}  {t!r}")
    return 0


def _prompt_ids(tokenizer, prompt: str, use_chat: bool, system: str | None) -> list[int]:
    if not use_chat:
        return tokenizer.encode(prompt)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True),
                            add_special_tokens=False)


def _run_one(engine, prompt_ids: list[int], params, prompt: str, stream: bool) -> RequestOutput:
    request_id = engine.add_request(prompt_ids, params, prompt=prompt)
    final = None
    while final is None:
        for out in engine.step():
            if out.request_id != request_id:
                continue
            if stream and out.outputs[0].delta_text:
                print(out.outputs[0].delta_text, end="", flush=True)
            if out.finished:
                final = out
    return final


def _metrics_line(out: RequestOutput) -> str:
    m = out.metrics
    total = m.e2e_latency or 0.0
    rate = m.num_generated_tokens / total if total > 0 else 0.0
    return (f"[TTFT {1000 * (m.ttft or 0):.1f} ms | TPOT {1000 * (m.tpot or 0):.1f} ms | {rate:.1f} tokens/s | "
            f"prompt {m.num_prompt_tokens} tokens, generated {m.num_generated_tokens} tokens | "
            f"finish: {out.outputs[0].finish_reason}]")


def _as_json(out: RequestOutput, with_logprobs: bool) -> dict:
    m = out.metrics
    total = m.e2e_latency or 0.0
    outputs = []
    for c in out.outputs:
        item = {"text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason, "cumulative_logprob": c.cumulative_logprob}
        if with_logprobs and c.logprobs is not None:
            item["logprobs"] = [{str(t): {"logprob": lp.logprob, "rank": lp.rank, "token": lp.decoded_token}
                                 for t, lp in pos.items()} for pos in c.logprobs]
        outputs.append(item)
    return {"outputs": outputs,
            "metrics": {"ttft_s": m.ttft, "tpot_s": m.tpot, "prompt_tokens": m.num_prompt_tokens,
                        "generated_tokens": m.num_generated_tokens,
                        "tokens_per_s": m.num_generated_tokens / total if total > 0 else 0.0}}
