"""Command line: tokenmill generate | chat | serve | bench | tokenize.

Bad input prints one line (``tokenmill: error: ...``) and exits with code 2.

Flag defaults come from the dataclasses the flags fill (EngineConfig, SamplingParams), except
where the terminal wants its own (CLI_MAX_TOKENS, CLI_TEMPERATURE).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

from tokenmill.config import (
    DEFAULT_MODEL,
    DTYPES,
    KV_CACHE_DTYPES,
    QUANTIZATION_MODES,
    ROUTING_POLICIES,
    EngineConfig,
    ReplicaConfig,
)
from tokenmill.sampling_params import SamplingParams, StructuredOutputsParams

CLI_MAX_TOKENS = 256  # an answer in a terminal: longer than SamplingParams' 16
CLI_TEMPERATURE = 0.7  # sampled but focused; 0 (greedy) with --num-beams > 1
EARLY_STOPPING = {"true": True, "false": False, "never": "never"}


def _defaults(cls: type) -> dict[str, Any]:
    """Field name -> default of a dataclass (every field of EngineConfig and SamplingParams has one)."""
    return {f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default
            for f in dataclasses.fields(cls)}


ENGINE = _defaults(EngineConfig)
REPLICAS = _defaults(ReplicaConfig)
SAMPLING = _defaults(SamplingParams)


def add_engine_arguments(parser: argparse.ArgumentParser, several_models: bool = False) -> None:
    """Flags shared by every command that loads a model; each dest is the EngineConfig field it sets.
    ``several_models`` (serve): --model may repeat, and args.model is a list (None when not given)."""
    g = parser.add_argument_group("model and engine")
    if several_models:
        g.add_argument("--model", action="append", default=None,
                       help="alias, .gguf file, Hugging Face folder or hub id; repeat to serve several")
    else:
        g.add_argument("--model", default=ENGINE["model"], help="alias, .gguf file, Hugging Face folder or hub id")
    g.add_argument("--dtype", default=ENGINE["dtype"], choices=DTYPES)
    g.add_argument("--device", default=ENGINE["device"], help="auto, cpu, cuda, cuda:1 ...")
    g.add_argument("--quantization", default=ENGINE["quantization"], choices=QUANTIZATION_MODES)
    g.add_argument("--max-model-len", type=int, default=ENGINE["max_model_len"])
    g.add_argument("--max-num-seqs", type=int, default=ENGINE["max_num_seqs"])
    g.add_argument("--max-num-batched-tokens", type=int, default=ENGINE["max_num_batched_tokens"])
    g.add_argument("--block-size", type=int, default=ENGINE["block_size"])
    g.add_argument("--kv-cache-memory", dest="kv_cache_memory_gb", type=float,
                   default=ENGINE["kv_cache_memory_gb"], help="KV cache size in GiB")
    g.add_argument("--kv-cache-dtype", default=ENGINE["kv_cache_dtype"], choices=KV_CACHE_DTYPES,
                   help="K/V element type; auto: 16-bit (see docs/memory.md), int8: a scale per token and head")
    g.add_argument("--seed", type=int, default=ENGINE["seed"])
    g.add_argument("--threads", type=int, default=ENGINE["threads"])
    # serve compiles where it pays unless told (None: auto); the other commands only when asked
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None if several_models else False,
                   help="torch.compile the decode steps at start-up (~11 s with the compile cache warm, about a "
                        "minute the first time), then decode faster; serve's default: where it pays (packed "
                        "int4 projections on a CPU)")
    g.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
                   default=ENGINE["enable_prefix_caching"],
                   help="recompute every prompt instead of reusing the KV of prefixes seen before")
    g.add_argument("--batch-invariant", action="store_true", default=ENGINE["batch_invariant"],
                   help="a request's tokens never depend on what else runs (same text alone or in a batch); "
                        "slower, see docs/determinism.md")
    s = parser.add_argument_group("speculative decoding (off unless one of these is given)")
    s.add_argument("--speculative-config", type=_json_object, default=None, metavar="JSON",
                   help='vLLM\'s speculative_config, e.g. \'{"method": "ngram", "num_speculative_tokens": 4, '
                        '"prompt_lookup_min": 2, "prompt_lookup_max": 4}\' or \'{"model": "draft.gguf"}\'')
    for flag, key, kind in (("--num-speculative-tokens", "num_speculative_tokens", int),
                            ("--prompt-lookup-min", "prompt_lookup_min", int),
                            ("--prompt-lookup-max", "prompt_lookup_max", int),
                            ("--draft-model", "model", str),
                            ("--speculative-disable-batch-size", "disable_by_batch_size", int)):
        s.add_argument(flag, dest=f"spec_{key}", type=kind, default=None, metavar="PATH" if kind is str else "N",
                       help=f'sets "{key}" of --speculative-config (n-gram proposals unless --draft-model)')


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def speculative_config_from_args(args: argparse.Namespace) -> dict[str, Any] | None:
    """--speculative-config with the single-key flags merged in (they win); None when none is given."""
    config = dict(args.speculative_config or {})
    for key in ("num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max", "model", "disable_by_batch_size"):
        value = getattr(args, f"spec_{key}", None)
        if value is not None:
            config[key] = value
    return config or None


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """EngineConfig from every flag whose dest is one of its fields."""
    values = {name: getattr(args, name) for name in ENGINE if hasattr(args, name)}
    if "model" in values and not isinstance(values["model"], str):  # serve: a list of models, or none given
        models = [*getattr(args, "models", []), *(values["model"] or [])]
        values["model"] = models[0] if models else ENGINE["model"]
    if hasattr(args, "speculative_config"):
        values["speculative_config"] = speculative_config_from_args(args)
    return EngineConfig(**values)


def add_replica_arguments(parser: argparse.ArgumentParser) -> None:
    """``serve --replicas N``: N engine replicas on Ray Serve behind one endpoint (docs/scale_out.md)."""
    g = parser.add_argument_group("replicas (Ray Serve; pip install 'tokenmill[ray]')")
    g.add_argument("--replicas", type=int, default=None, metavar="N",
                   help="run N engines, each with its own KV cache and threads, behind this endpoint")
    g.add_argument("--threads-per-replica", type=int, default=REPLICAS["threads_per_replica"], metavar="T",
                   help="torch threads of each replica (default: the machine's cores / N)")
    g.add_argument("--routing", default=REPLICAS["routing"], choices=ROUTING_POLICIES,
                   help="prefix: a prompt goes to the replica holding its prefix unless it is overloaded")
    g.add_argument("--routing-imbalance", dest="imbalance", type=int, default=REPLICAS["imbalance"], metavar="N",
                   help="prefix routing passes over a prompt's replica once its queue is longer than the shortest "
                        "by more than N x the share of the prompt it holds")
    g.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="join a running Ray cluster ('auto' or host:port) instead of starting Ray on this machine")


def replica_config_from_args(args: argparse.Namespace) -> ReplicaConfig | None:
    """The ReplicaConfig of ``serve --replicas N ...``; None without --replicas (the one-process server)."""
    if getattr(args, "replicas", None) is None:
        for flag in ("threads_per_replica", "ray_address"):
            if getattr(args, flag, None) is not None:
                raise ValueError(f"--{flag.replace('_', '-')} needs --replicas N")
        return None
    return ReplicaConfig(num_replicas=args.replicas, threads_per_replica=args.threads_per_replica,
                         routing=args.routing, imbalance=args.imbalance, ray_address=args.ray_address)


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """Token selection flags; each dest is the SamplingParams field it sets."""
    g = parser.add_argument_group("token selection and stopping")
    g.add_argument("--max-tokens", type=int, default=CLI_MAX_TOKENS)
    g.add_argument("--min-tokens", type=int, default=SAMPLING["min_tokens"])
    g.add_argument("--temperature", type=float, default=None,
                   help=f"0 = greedy (default {CLI_TEMPERATURE}; 0 with beams)")
    g.add_argument("--top-k", type=int, default=SAMPLING["top_k"])
    g.add_argument("--top-p", type=float, default=SAMPLING["top_p"])
    g.add_argument("--min-p", type=float, default=SAMPLING["min_p"])
    g.add_argument("--presence-penalty", type=float, default=SAMPLING["presence_penalty"])
    g.add_argument("--frequency-penalty", type=float, default=SAMPLING["frequency_penalty"])
    g.add_argument("--repetition-penalty", type=float, default=SAMPLING["repetition_penalty"])
    g.add_argument("--stop", action="append", default=SAMPLING["stop"], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", default=SAMPLING["ignore_eos"])
    g.add_argument("--n", type=int, default=SAMPLING["n"], help="samples per prompt")
    g.add_argument("--num-beams", type=int, default=SAMPLING["num_beams"])
    g.add_argument("--length-penalty", type=float, default=SAMPLING["length_penalty"])
    g.add_argument("--early-stopping", default=str(SAMPLING["early_stopping"]).lower(),
                   choices=list(EARLY_STOPPING))
    g.add_argument("--logprobs", type=int, default=SAMPLING["logprobs"], help="top alternatives per token")


def sampling_params_from_args(args: argparse.Namespace) -> SamplingParams:
    """SamplingParams from every flag whose dest is one of its fields. ``--seed`` is such a flag:
    it seeds the request as well as the engine."""
    given = {name: getattr(args, name) for name in SAMPLING if hasattr(args, name)}
    given["early_stopping"] = EARLY_STOPPING[args.early_stopping]
    if args.temperature is None:
        given["temperature"] = 0.0 if args.num_beams > 1 else CLI_TEMPERATURE
    given["structured_outputs"] = structured_outputs_from_args(args)
    return SamplingParams(**given)


def add_structured_output_arguments(parser: argparse.ArgumentParser) -> None:
    """--json-schema FILE | --regex RE | --choice a,b,c | --grammar FILE (docs/structured_output.md)."""
    g = parser.add_argument_group("structured output (one at most)").add_mutually_exclusive_group()
    g.add_argument("--json-schema", metavar="FILE", help="the output is JSON valid under this JSON schema")
    g.add_argument("--regex", metavar="RE", help="the output matches this regular expression")
    g.add_argument("--choice", metavar="A,B,C", help="the output is one of these comma-separated strings")
    g.add_argument("--grammar", metavar="FILE", help="the output follows this Lark or GBNF grammar")


def structured_outputs_from_args(args: argparse.Namespace) -> StructuredOutputsParams | None:
    """The constraint the structured-output flags ask for (None without them); ValueError naming the flag."""
    if getattr(args, "json_schema", None):
        return StructuredOutputsParams(json=_read_flag_file("--json-schema", args.json_schema))
    if getattr(args, "grammar", None):
        return StructuredOutputsParams(grammar=_read_flag_file("--grammar", args.grammar))
    if getattr(args, "regex", None):
        return StructuredOutputsParams(regex=args.regex)
    if getattr(args, "choice", None):
        return StructuredOutputsParams(choice=[c for c in args.choice.split(",") if c])
    return None


def _read_flag_file(flag: str, path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as e:
        raise ValueError(f"{flag}: cannot read {path}: {e.strerror}") from None


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows the default of each flag that takes a value, also of flags without a help text."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if action.default in (None, argparse.SUPPRESS) or action.nargs == 0 or "%(default)" in help_text:
            return help_text
        return f"{help_text} (default: %(default)s)".lstrip()

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and self._get_help_string(action):  # argparse prints no help for help=None
            action = copy.copy(action)
            action.help = self._get_help_string(action)
        return super()._format_action(action)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser (and subcommand parsers, which take the parent's class) with _HelpFormatter."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    from tokenmill import __version__

    parser = _Parser(prog="tokenmill", description="LLM inference engine and server")
    parser.add_argument("--version", action="version", version=f"tokenmill {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text for one prompt, streamed")
    add_engine_arguments(gen)
    add_sampling_arguments(gen)
    gen.add_argument("--chat", action="store_true", help="apply the model's chat template")
    gen.add_argument("--system", default=None, help="system message (with --chat)")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    add_structured_output_arguments(gen)
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
    add_engine_arguments(serve, several_models=True)
    from tokenmill.server.app import add_serve_arguments
    add_serve_arguments(serve)
    add_replica_arguments(serve)

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
