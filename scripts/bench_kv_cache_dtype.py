"""Decode speed of each --kv-cache-dtype, variants interleaved in one process (docs/memory.md).

One engine per KV type, all loaded up front; then rounds of `tokenmill bench`'s offline run (the same
prompts, greedy, EOS ignored) at each concurrency, cycling through the engines inside every round so that
machine load drifts hit every variant alike. Prints the median TPOT per variant and its ratio to float32.

    .venv/bin/python scripts/bench_kv_cache_dtype.py [--rounds 3] [--input-len 128] [--output-len 128]
"""

from __future__ import annotations

import argparse
import os
import statistics

from tokenmill.bench.dataset import synthetic_prompts
from tokenmill.bench.offline import run_offline
from tokenmill.config import EngineConfig
from tokenmill.engine.llm_engine import LLMEngine

VARIANTS = ("float32", "bfloat16", "float16", "int8")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--concurrency", default="1,32")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--quantization", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 on a busy shared machine)")
    args = p.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    variants = args.variants.split(",")
    engines = {v: LLMEngine(EngineConfig(kv_cache_dtype=v, kv_cache_memory_gb=0.4, quantization=args.quantization,
                                         threads=args.threads))
               for v in variants}
    tokenizer = next(iter(engines.values())).tokenizer
    tpot: dict[tuple[str, int], list[float]] = {(v, c): [] for v in variants for c in levels}
    for r in range(args.rounds):
        for c in levels:
            prompts = synthetic_prompts(tokenizer, c, args.input_len, args.output_len, seed=100 * r + c)
            for v in variants:
                result = run_offline(engines[v], prompts, c, progress=False)
                tpot[v, c].append(result.tpot_s.mean * 1000)
                print(f"round {r} c={c} {v:9s} TPOT mean {tpot[v, c][-1]:.1f} ms", flush=True)
    print(f"load average at the end: {os.getloadavg()}")
    for c in levels:
        base = statistics.median(tpot["float32", c]) if "float32" in variants else None
        for v in variants:
            m = statistics.median(tpot[v, c])
            ratio = f" ({m / base:.2f}x float32)" if base else ""
            print(f"c={c:<3d} {v:9s} TPOT (median of rounds) {m:6.1f} ms{ratio}")


if __name__ == "__main__":
    main()
