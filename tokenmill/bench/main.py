"""``tokenmill bench``: flags and the command that runs the offline, serving and comparison benchmarks."""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from pathlib import Path
from typing import Any

from tokenmill.bench.dataset import BenchPrompt, load_jsonl_prompts, synthetic_prompts
from tokenmill.bench.metrics import BenchResult
from tokenmill.bench.report import dumps, format_sweep, format_table, plot, to_json


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Benchmark flags; the engine flags (--model, --dtype, --seed ...) come from add_engine_arguments."""
    g = parser.add_argument_group("benchmark")
    g.add_argument("--url", default=None,
                   help="benchmark a running OpenAI-compatible server (e.g. http://127.0.0.1:8000) "
                        "instead of an in-process engine")
    g.add_argument("--num-prompts", type=int, default=32, help="number of requests (default 32)")
    g.add_argument("--input-len", type=int, default=128, help="prompt tokens of synthetic prompts (default 128)")
    g.add_argument("--shared-prefix-len", type=int, default=0, metavar="N",
                   help="synthetic prompts all start with the same N tokens, then --input-len tokens of "
                        "their own: a workload for the prefix cache (default 0)")
    g.add_argument("--output-len", type=int, default=64,
                   help="tokens generated per request, EOS ignored (default 64)")
    g.add_argument("--concurrency", default=None,
                   help="requests in flight (default: all); a comma list such as 1,4,16,32 runs a sweep")
    g.add_argument("--request-rate", type=float, default=math.inf,
                   help="with --url: requests/s released on a Poisson schedule (default inf: all at once)")
    g.add_argument("--dataset", default=None,
                   help='JSONL file, one {"prompt": str, "output_len"?: int, "chat"?: bool} per line, or a '
                        "shipped one: input_grounded (answers copy from the prompt), open_ended (default: "
                        "synthetic prompts cut from prose shipped with tokenmill)")
    g.add_argument("--compare", choices=["transformers", "llama.cpp"], default=None,
                   help="also run the same prompts through transformers' generate() or llama.cpp "
                        "(llama-cpp-python, same GGUF, one stream) and show both")
    g.add_argument("--warmup", type=int, default=1, help="untimed warm-up requests before each run (default 1)")
    g.add_argument("--served-model-name", default=None,
                   help="with --url: the model name to request (default: the first of GET /v1/models)")
    g.add_argument("--api-key", default=None, help="with --url: sent as a Bearer token")
    g.add_argument("--timeout", type=float, default=600.0, help="with --url: seconds per request (default 600)")
    g.add_argument("--json-schema", default=None, metavar="FILE",
                   help="constrain every request's output to this JSON schema (in-process runs)")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    g.add_argument("--plot", default=None, metavar="FILE.png", help="write latency and throughput plots")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    try:
        g.add_argument("--seed", type=int, default=0, help="seed of the synthetic prompts and arrivals")
    except argparse.ArgumentError:
        pass  # the engine flags already define --seed; the benchmark uses the same value


def _validate(args: argparse.Namespace) -> list[int | None]:
    for name in ("num_prompts", "input_len", "output_len"):
        value = getattr(args, name)
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.shared_prefix_len < 0:
        raise ValueError(f"--shared-prefix-len must be >= 0, got {args.shared_prefix_len}")
    if args.shared_prefix_len and args.dataset:
        raise ValueError("--shared-prefix-len shapes synthetic prompts; it cannot be combined with --dataset")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    if not args.request_rate > 0:
        raise ValueError(f"--request-rate must be > 0 (inf for all at once), got {args.request_rate}")
    if args.url is None and not math.isinf(args.request_rate):
        raise ValueError("--request-rate needs --url (the offline benchmark sends requests as capacity allows)")
    if args.url is not None and args.compare:
        raise ValueError("--compare runs in-process; it cannot be combined with --url")
    if args.url is not None and args.json_schema:
        raise ValueError("--json-schema constrains in-process runs; it cannot be combined with --url")
    if args.plot is not None and not args.plot.lower().endswith(".png"):
        raise ValueError(f"--plot must name a .png file, got {args.plot!r}")
    return parse_concurrency(args.concurrency)


def build_prompts(args: argparse.Namespace, tokenizer: Any, level: int = 0) -> list[BenchPrompt]:
    """The prompts of the ``level``-th run of a sweep: from --dataset, or synthetic ones of
    --shared-prefix-len + --input-len tokens. Synthetic prompts differ from level to level (seed +
    level), so a level does not find the prompts of the one before it in the prefix cache."""
    if args.dataset:
        return load_jsonl_prompts(args.dataset, tokenizer, args.num_prompts, args.output_len)
    return synthetic_prompts(tokenizer, args.num_prompts, args.input_len, args.output_len,
                             seed=args.seed + level, shared_prefix_len=args.shared_prefix_len)


def run_bench(args: argparse.Namespace) -> int:
    """Run the benchmark the flags describe, print the report, and return the exit code."""
    levels = _validate(args)
    if args.compare:
        from tokenmill.bench.compare import require_transformers
        from tokenmill.bench.compare_llama_cpp import require_llama_cpp

        try:  # fail before the long part when the other engine is missing
            require_transformers() if args.compare == "transformers" else require_llama_cpp()
        except RuntimeError as e:
            print(f"tokenmill: error: {e}", file=sys.stderr)
            return 2
    if args.url is None:
        results, others = _run_offline(args, levels)
    else:
        results, others = _run_serving(args, levels), None
    if args.json:
        print(dumps(to_json(results, others)))
    elif len(results) == 1:
        print(format_table(results[0], others[0] if others else None))
        if others:
            print(f"(peak RSS is the process peak so far: the {args.compare} column includes the engine's)")
    else:
        print(format_sweep(results, others))
    if args.plot:
        plot(results, args.plot, others, title=plot_title(args, levels))
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0 if all(r.failed == 0 for r in results) else 1


def plot_title(args: argparse.Namespace, levels: list[int | None]) -> str:
    """What a plot shows: model, quantization, concurrency, prompt and output lengths, request count."""
    if args.url is None:
        model, quantization = args.model, f"quantization {args.quantization}, {args.dtype}"
    else:
        model, quantization = args.served_model_name or args.model, f"served by {args.url}"
    lengths = f"dataset {Path(args.dataset).name}" if args.dataset else \
        f"input {args.input_len} / output {args.output_len} tokens"
    concurrency = ", ".join(str(c or "all") for c in levels)
    return f"{model} | {quantization} | concurrency {concurrency} | {lengths} | {args.num_prompts} requests"


def _run_offline(args: argparse.Namespace,
                 levels: list[int | None]) -> tuple[list[BenchResult], list[BenchResult] | None]:
    from tokenmill.bench.offline import run_offline
    from tokenmill.cli import engine_config_from_args
    from tokenmill.engine.llm_engine import LLMEngine

    engine = LLMEngine(engine_config_from_args(args))
    prompt_sets = [build_prompts(args, engine.tokenizer, i) for i in range(len(levels))]
    progress = not args.no_progress
    constraint = None
    if args.json_schema:
        from tokenmill.cli import structured_outputs_from_args
        constraint = structured_outputs_from_args(args)
    results = [run_offline(engine, prompts, c, progress=progress, warmup=args.warmup, structured_outputs=constraint)
               for prompts, c in zip(prompt_sets, levels, strict=True)]
    if not args.compare:
        return results, None
    if args.compare == "llama.cpp":
        return results, _run_llama_cpp(args, prompt_sets, levels)
    import torch

    from tokenmill.bench.compare import load_transformers_model, run_transformers

    hf_model = load_transformers_model(args.model, getattr(torch, engine.info.dtype), torch.device(engine.info.device),
                                       progress=progress)
    pad = engine.eos_token_ids[0] if engine.eos_token_ids else 0
    others = [run_transformers(hf_model, prompts, c, pad_token_id=pad, warmup=args.warmup)
              for prompts, c in zip(prompt_sets, levels, strict=True)]
    return results, others


def _run_llama_cpp(args: argparse.Namespace, prompt_sets: list[list[BenchPrompt]],
                   levels: list[int | None]) -> list[BenchResult]:
    from tokenmill.bench.compare_llama_cpp import load_llama_cpp, run_llama_cpp
    from tokenmill.model.source import resolve_model

    path, fmt = resolve_model(args.model)
    if fmt != "gguf":
        raise ValueError(f"--compare llama.cpp needs a GGUF model, got {args.model!r} ({fmt})")
    context = max(len(p.token_ids) + p.output_len for prompts in prompt_sets for p in prompts)
    llm = load_llama_cpp(path, context, args.threads)
    return [run_llama_cpp(llm, prompts, c, warmup=args.warmup) for prompts, c in zip(prompt_sets, levels, strict=True)]


def _run_serving(args: argparse.Namespace, levels: list[int | None]) -> list[BenchResult]:
    from tokenmill.bench.serving import run_serving
    from tokenmill.model.source import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    return [asyncio.run(run_serving(args.url, build_prompts(args, tokenizer, i), model=args.served_model_name,
                                    concurrency=c, request_rate=args.request_rate, seed=args.seed,
                                    api_key=args.api_key, timeout_s=args.timeout, progress=not args.no_progress))
            for i, c in enumerate(levels)]


def parse_concurrency(value: str | None) -> list[int | None]:
    """``--concurrency`` as a list of levels: None -> [None] (all at once); "1,4,16" -> [1, 4, 16]."""
    if value is None or value == "":
        return [None]
    levels = []
    for part in value.split(","):
        part = part.strip()
        if part in ("all", "inf"):
            levels.append(None)
            continue
        try:
            level = int(part)
        except ValueError:
            raise ValueError(f"--concurrency: expected integers >= 1 separated by commas, got {value!r}") from None
        if level < 1:
            raise ValueError(f"--concurrency: every level must be >= 1, got {level}")
        levels.append(level)
    return levels
