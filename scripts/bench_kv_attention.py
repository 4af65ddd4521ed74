"""Decode attention alone, per KV cache type: CPU time of one step's 30 layers (the default model's shapes).

Thread CPU time rather than wall time, so that other work on a shared machine counts less; the variants
are interleaved and the median of 9 repetitions is printed (docs/memory.md).

    .venv/bin/python scripts/bench_kv_attention.py [--context 256]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tokenmill.config import ModelConfig
from tokenmill.engine.kv_cache import KVCacheTensors
from tokenmill.model.attention import AttentionMetadata, SeqSlice, TorchSDPABackend

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.int8}
CONFIG = ModelConfig("llama", 100, 576, 1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                     head_dim=64)  # SmolLM2-135M
BLOCK_SIZE, NUM_BLOCKS = 16, 1456


def random_caches() -> dict[str, KVCacheTensors]:
    caches = {}
    for name, dtype in DTYPES.items():
        cache = KVCacheTensors(CONFIG, NUM_BLOCKS, BLOCK_SIZE, dtype, torch.device("cpu"))
        for layer in cache.layers:
            for t in layer:
                t.copy_(torch.randint(-127, 128, t.shape, dtype=torch.int8) if t.dtype == torch.int8
                        else torch.rand(t.shape).to(t.dtype))
        caches[name] = cache
    return caches


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--context", type=int, default=256)
    args = p.parse_args()
    torch.set_num_threads(1)
    caches, backend = random_caches(), TorchSDPABackend()
    per_seq = args.context // BLOCK_SIZE + 1
    for batch in (1, 32):
        perm = torch.randperm(NUM_BLOCKS).tolist()
        seqs = [SeqSlice(perm[i * per_seq:(i + 1) * per_seq], args.context - 1, 1) for i in range(batch)]
        meta = AttentionMetadata.build(seqs, BLOCK_SIZE, "cpu")
        q, k, v = torch.randn(batch, 9, 64), torch.randn(batch, 3, 64), torch.randn(batch, 3, 64)
        times: dict[str, list[float]] = {n: [] for n in caches}
        for _ in range(9):
            for name, cache in caches.items():
                start = time.thread_time()
                for layer in cache.layers:
                    backend.forward(q, k, v, layer, meta, 0.125)
                times[name].append(time.thread_time() - start)
        for name, ts in times.items():
            print(f"{batch:2d} streams, context {args.context}: {name:9s} {statistics.median(ts) * 1e3:7.2f} ms")


if __name__ == "__main__":
    main()
