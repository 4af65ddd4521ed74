"""The same prompts through llama.cpp (llama-cpp-python) on the same GGUF file, for a side-by-side.

llama-cpp-python's ``Llama`` decodes one sequence at a time, so this comparison is for a single
stream (``--concurrency 1``); for concurrent streams compare with ``llama-server`` over HTTP
(``tokenmill bench --url``, see docs/benchmarks.md). Each prompt is fed as token ids, decoded
greedily for exactly ``output_len`` tokens (EOS is given a -inf bias, like ignore_eos), and the
streamed chunks are timed like the engine's outputs, so TTFT, TPOT and ITL mean the same.
"""

from __future__ import annotations

import os
import time
from typing import Any

from tokenmill.bench.dataset import BenchPrompt
from tokenmill.bench.metrics import BenchResult, RequestRecord, summarize


def require_llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError:
        raise RuntimeError("--compare llama.cpp needs llama-cpp-python: pip install llama-cpp-python "
                           "(it builds llama.cpp from source, a few minutes)") from None
    return llama_cpp


def load_llama_cpp(gguf_path: str, context: int, threads: int | None) -> Any:
    """A llama.cpp model on the CPU with ``threads`` threads for decode and prompt processing."""
    llama_cpp = require_llama_cpp()
    threads = threads or os.cpu_count() or 1
    return llama_cpp.Llama(model_path=gguf_path, n_ctx=context, n_threads=threads, n_threads_batch=threads,
                           n_batch=512, verbose=False)


def run_llama_cpp(llm: Any, prompts: list[BenchPrompt], concurrency: int | None, warmup: int = 1) -> BenchResult:
    """Generate ``prompts`` one after the other (llama-cpp-python has no batching)."""
    if concurrency != 1:
        raise ValueError("--compare llama.cpp measures one stream (--concurrency 1): llama-cpp-python decodes "
                         "one sequence at a time; use llama-server with --url for concurrent streams")
    for p in prompts[:warmup]:
        _run_one(llm, BenchPrompt(p.text, p.token_ids, min(p.output_len, 4)))
    start = time.perf_counter()
    records = [_run_one(llm, p) for p in prompts]
    return summarize(records, time.perf_counter() - start, backend="llama.cpp", concurrency=1)


def _run_one(llm: Any, prompt: BenchPrompt) -> RequestRecord:
    llm.reset()  # no KV reuse from the previous prompt: every prompt is prefilled whole, as ours are
    record = RequestRecord(prompt_tokens=len(prompt.token_ids), start_time=time.perf_counter())
    stream = llm.create_completion(prompt=list(prompt.token_ids), max_tokens=prompt.output_len, temperature=0.0,
                                   top_k=1, stream=True, logit_bias={llm.token_eos(): float("-inf")})
    for _chunk in stream:
        record.add_chunk(time.perf_counter(), 1)
    return record
