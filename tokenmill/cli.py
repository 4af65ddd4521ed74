"""Command line: tokenmill generate | chat | serve | bench | tokenize.

Bad input prints one line (``tokenmill: error: ...``) and exits with code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from tokenmill.config import DEFAULT_MODEL, DTYPES, QUANTIZATION_MODES, EngineConfig
from tokenmill.sampling_params import SamplingParams


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by every command that loads a model."""
    g = parser.add_argument_group("model and engine")
    g.add_argument("--model", default=DEFAULT_MODEL, help="alias, .gguf file, Hugging Face folder or hub id")
    g.add_argument("--dtype", default="auto", choices=DTYPES)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    g.add_argument("--quantization", default="auto", choices=QUANTIZATION_MODES)
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=64)
    g.add_argument("--max-num-batched-tokens", type=int, default=512)
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--kv-cache-memory", type=float, default=None, help="KV cache size in GiB")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, default=None)
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step: the first steps compile (about a minute), then decode is faster")
    g.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
                   help="recompute every prompt instead of reusing the KV of prefixes seen before")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model, dtype=args.dtype, device=args.device, quantization=args.quantization,
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
        kv_cache_memory_gb=args.kv_cache_memory, seed=args.seed, threads=args.threads, compile=args.compile,
        enable_prefix_caching=args.enable_prefix_caching)


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("token selection and stopping")
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--min-tokens", type=int, default=0)
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy (default 0.7; 0 with beams)")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--n", type=int, default=1, help="samples per prompt")
    g.add_argument("--num-beams", type=int, default=1)
    g.add_argument("--length-penalty", type=float, default=1.0)
    g.add_argument("--early-stopping", default="false", choices=["true", "false", "never"])
    g.add_argument("--logprobs", type=int, default=None, help="top alternatives per token")


def sampling_params_from_args(args: argparse.Namespace) -> SamplingParams:
    early = {"true": True, "false": False, "never": "never"}[args.early_stopping]
    temperature = args.temperature
    if temperature is None:
        temperature = 0.0 if args.num_beams > 1 else 0.7
    return SamplingParams(
        n=args.n, max_tokens=args.max_tokens, min_tokens=args.min_tokens, temperature=temperature,
        top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, repetition_penalty=args.repetition_penalty,
        seed=args.seed, stop=args.stop,
        ignore_eos=args.ignore_eos, num_beams=args.num_beams, length_penalty=args.length_penalty,
        early_stopping=early, logprobs=args.logprobs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenmill", description="LLM inference engine and server")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text for one prompt, streamed")
    add_engine_arguments(gen)
    add_sampling_arguments(gen)
    gen.add_argument("--chat", action="store_true", help="apply the model's chat template")
    gen.add_argument("--system", default=None, help="system message (with --chat)")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    gen.add_argument("prompt")

    chat = sub.add_parser("chat", help="interactive chat")
    add_engine_arguments(chat)
    add_sampling_arguments(chat)
    chat.add_argument("--system", default=None)

    tok = sub.add_parser("tokenize", help="show the token ids and strings of a text")
    tok.add_argument("--model", default=DEFAULT_MODEL)
    tok.add_argument("--chat", action="store_true", help="apply the chat template to TEXT as a user message")
    tok.add_argument("--json", action="store_true")
    tok.add_argument("text")

    serve = sub.add_parser("serve", help="start the HTTP server (OpenAI + TGI APIs, playground)")
    add_engine_arguments(serve)
    from tokenmill.server.app import add_serve_arguments
    add_serve_arguments(serve)

    bench = sub.add_parser("bench", help="measure TTFT, TPOT, throughput and memory")
    add_engine_arguments(bench)
    from tokenmill.bench.main import add_bench_arguments
    add_bench_arguments(bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # a server's log says what it loaded (model, KV cache size); one-shot commands stay quiet
    verbose = args.verbose or args.command == "serve"
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return _dispatch(args)
    except ValueError as e:
        print(f"tokenmill: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    from tokenmill import commands
    if args.command == "generate":
        return commands.generate(args)
    if args.command == "chat":
        return commands.chat(args)
    if args.command == "tokenize":
        return commands.tokenize(args)
    if args.command == "serve":
        from tokenmill.server.app import run_server
        return run_server(args)
    if args.command == "bench":
        from tokenmill.bench.main import run_bench
        return run_bench(args)
    raise ValueError(f"unknown command {args.command!r}")


if __name__ == "__main__":
    sys.exit(main())
