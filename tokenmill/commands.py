"""The work behind `tokenmill generate`, `chat` and `tokenize` (argument parsing lives in cli.py)."""

from __future__ import annotations

import argparse
import json
import sys

from tokenmill.cli import engine_config_from_args, sampling_params_from_args
from tokenmill.outputs import RequestOutput


def generate(args: argparse.Namespace) -> int:
    """Stream one completion to stdout, then a metrics line (or one JSON object with --json)."""
    params = sampling_params_from_args(args)
    if not args.prompt:
        raise ValueError("prompt must not be empty")
    from tokenmill.engine.llm_engine import LLMEngine
    engine = LLMEngine(engine_config_from_args(args))
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
    """Interactive chat: each line you type is a user turn; an empty line or EOF ends it."""
    params = sampling_params_from_args(args)
    from tokenmill.engine.llm_engine import LLMEngine
    engine = LLMEngine(engine_config_from_args(args))
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("tokenmill chat: type a message, an empty line to quit.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        prompt = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        ids = engine.tokenizer.encode(prompt, add_special_tokens=False)
        final = _run_one(engine, ids, params, prompt, stream=True)
        print()
        print(_metrics_line(final), file=sys.stderr)
        messages.append({"role": "assistant", "content": final.outputs[0].text})
    return 0


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
