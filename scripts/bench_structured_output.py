"""Structured output's cost: the same prompts with and without a JSON schema, interleaved in one run.

Runs ``tokenmill bench``'s in-process benchmark (``run_offline``) on one engine: for each round, the
unconstrained variant then the constrained one (every request with the same schema), at 32 streams
and at 1 stream; prints the throughput and TPOT ratios per round and their medians, then the grammar
compile time of the test schemas. The schema is an array that cannot end within the output length, so
both variants generate exactly --output-len tokens per request.

    .venv/bin/python scripts/bench_structured_output.py [--rounds 2] [--output-len 64] [--model M]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tokenmill.bench.dataset import synthetic_prompts  # noqa: E402
from tokenmill.bench.offline import run_offline  # noqa: E402
from tokenmill.config import DEFAULT_MODEL, EngineConfig  # noqa: E402
from tokenmill.engine.llm_engine import LLMEngine  # noqa: E402
from tokenmill.engine.structured_output import GrammarCompiler  # noqa: E402
from tokenmill.sampling_params import StructuredOutputsParams  # noqa: E402

# nested objects, strings, enums and bounded numbers, repeated: never complete within the output length
BENCH_SCHEMA = {"type": "array", "minItems": 1000, "items": {
    "type": "object", "additionalProperties": False, "required": ["name", "age", "tags", "address"],
    "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                   "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
                   "address": {"type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}}}}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    args = parser.parse_args()
    engine = LLMEngine(EngineConfig(model=args.model, seed=0))
    schema = StructuredOutputsParams(json=BENCH_SCHEMA)
    ratios: dict[str, list[float]] = {"throughput 32": [], "tpot 1": []}
    for r in range(args.rounds):
        for label, streams in (("throughput 32", args.streams), ("tpot 1", 1)):
            prompts = synthetic_prompts(engine.tokenizer, streams, args.input_len, args.output_len, seed=r)
            free = run_offline(engine, prompts, None, progress=False, warmup=1)
            constrained = run_offline(engine, prompts, None, progress=False, warmup=1, structured_outputs=schema)
            if label.startswith("throughput"):
                ratio = constrained.output_throughput / free.output_throughput
                detail = f"{free.output_throughput:.1f} -> {constrained.output_throughput:.1f} tok/s"
            else:
                ratio = constrained.tpot_s.mean / free.tpot_s.mean
                detail = f"{free.tpot_s.mean * 1e3:.1f} -> {constrained.tpot_s.mean * 1e3:.1f} ms"
            ratios[label].append(ratio)
            print(f"round {r} {label}: {detail} (constrained / unconstrained = {ratio:.3f}; "
                  f"{constrained.total_output_tokens} vs {free.total_output_tokens} tokens)", flush=True)
    for label, values in ratios.items():
        print(f"median {label} ratio (constrained / unconstrained): {statistics.median(values):.3f}")
    info = engine.info
    print_compile_times(GrammarCompiler(info.tokenizer, info.model_config.vocab_size, info.eos_token_ids))
    return 0


def print_compile_times(fresh: GrammarCompiler) -> None:
    """Each test schema compiled by a compiler with an empty cache."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "engine"))
    from test_structured_output import SCHEMAS

    for name, schema in {**SCHEMAS, "bench": BENCH_SCHEMA}.items():
        start = time.perf_counter()
        fresh.compile(StructuredOutputsParams(json=schema))
        print(f"compile {name}: {(time.perf_counter() - start) * 1e3:.2f} ms")


if __name__ == "__main__":
    sys.exit(main())
