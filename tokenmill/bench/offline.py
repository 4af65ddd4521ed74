"""Offline benchmark: drive an LLMEngine in this process and time every token as it arrives.

Requests are added up to the concurrency limit, then ``step()`` runs until all are done;
each request that is finished frees a slot for the next one. The time of a chunk is taken
right after the ``step()`` that produced it, which is when a streaming client would see it.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING, Any

import torch

from tokenmill.bench.dataset import BenchPrompt
from tokenmill.bench.metrics import BenchResult, RequestRecord, SpecDecodeStats, summarize
from tokenmill.bench.progress import TokenProgress
from tokenmill.sampling_params import SamplingParams, StructuredOutputsParams

if TYPE_CHECKING:
    from tokenmill.engine.llm_engine import LLMEngine


def bench_params(output_len: int, structured_outputs: StructuredOutputsParams | None = None) -> SamplingParams:
    """Greedy decoding of exactly ``output_len`` tokens: EOS is ignored so every run does the same work
    (with a structured-output constraint: until its document is complete, at most ``output_len``)."""
    return SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.0,
                          structured_outputs=structured_outputs)


def run_offline(engine: LLMEngine, prompts: list[BenchPrompt], concurrency: int | None = None,
                progress: bool = True, warmup: int = 1,
                structured_outputs: StructuredOutputsParams | None = None) -> BenchResult:
    """Run ``prompts`` through ``engine`` with at most ``concurrency`` in flight (None: all at once),
    every request constrained by ``structured_outputs`` when given."""
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if warmup:
        _warm_up(engine, prompts[:warmup])
    stats_before = engine.stats()
    device = torch.device(engine.info.device)
    _reset_gpu_peak(device)
    limit = concurrency or len(prompts)
    pending = deque(enumerate(prompts))
    in_flight: dict[str, RequestRecord] = {}
    records: list[RequestRecord] = []
    bar = TokenProgress(prompts, f"bench c={concurrency or 'all'}", progress)
    start = time.perf_counter()
    while pending or in_flight:
        while pending and len(in_flight) < limit:
            i, prompt = pending.popleft()
            now = time.perf_counter()
            record = RequestRecord(prompt_tokens=len(prompt.token_ids), start_time=now)
            request_id = engine.add_request(prompt.token_ids, bench_params(prompt.output_len, structured_outputs),
                                            request_id=f"bench-{i}", arrival_time=now)
            in_flight[request_id] = record
            records.append(record)
        _step(engine, in_flight, bar)
    duration = time.perf_counter() - start
    bar.close()
    return summarize(records, duration, backend="tokenmill", concurrency=concurrency,
                     peak_gpu_memory_mb=_gpu_peak_mb(device), kv_cache=kv_cache_info(engine),
                     spec_decode=_spec_decode(engine, stats_before))


def _spec_decode(engine: LLMEngine, before: Any) -> SpecDecodeStats | None:
    """What the run's speculation did (None when the engine does not speculate)."""
    if engine.info.config.speculative_config is None:
        return None
    after = engine.stats()
    return SpecDecodeStats.of(after.spec_decode_drafts_total - before.spec_decode_drafts_total,
                              after.spec_decode_draft_tokens_total - before.spec_decode_draft_tokens_total,
                              after.spec_decode_accepted_tokens_total - before.spec_decode_accepted_tokens_total)


def _step(engine: LLMEngine, in_flight: dict[str, RequestRecord], bar: TokenProgress) -> None:
    outputs = engine.step()
    now = time.perf_counter()
    for out in outputs:
        record = in_flight.get(out.request_id)
        if record is None:
            continue
        new_tokens = sum(len(c.delta_token_ids) for c in out.outputs)
        record.add_chunk(now, new_tokens)
        bar.add_tokens(new_tokens)
        if out.finished:
            record.end_time = now
            record.cached_tokens = out.num_cached_tokens
            reason = out.outputs[0].finish_reason if out.outputs else None
            if reason == "abort":
                record.error = "aborted by the engine"
            del in_flight[out.request_id]
            bar.request_done()


def _warm_up(engine: LLMEngine, prompts: list[BenchPrompt]) -> None:
    """Run a few short requests first, so one-time costs (allocator, kernels) stay out of the numbers."""
    for i, prompt in enumerate(prompts):
        engine.add_request(prompt.token_ids, bench_params(min(prompt.output_len, 4)), request_id=f"warmup-{i}")
    while engine.has_unfinished():
        engine.step()


def kv_cache_info(engine: LLMEngine) -> dict[str, Any]:
    """The engine's paged KV cache: element type, bytes per token, blocks, tokens it holds, MiB, and how
    many requests of the full context length (``max_model_len``) fit at once."""
    info = engine.info
    return {"dtype": info.kv_cache_dtype, "bytes_per_token": info.kv_bytes_per_token,
            "blocks": info.num_blocks, "block_size": info.block_size, "tokens": info.kv_cache_tokens,
            "size_mb": info.kv_cache_bytes / 2**20, "max_model_len": info.max_model_len,
            "max_len_requests_fit": info.kv_cache_tokens // info.max_model_len}


def _reset_gpu_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _gpu_peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
