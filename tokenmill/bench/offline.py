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
from tqdm import tqdm

from tokenmill.bench.dataset import BenchPrompt
from tokenmill.bench.metrics import BenchResult, RequestRecord, SpecDecodeStats, summarize
from tokenmill.engine.kv_cache import bytes_per_block
from tokenmill.sampling_params import SamplingParams

if TYPE_CHECKING:
    from tokenmill.engine.llm_engine import LLMEngine


def bench_params(output_len: int) -> SamplingParams:
    """Greedy decoding of exactly ``output_len`` tokens: EOS is ignored so every run does the same work."""
    return SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.0)


def run_offline(engine: LLMEngine, prompts: list[BenchPrompt], concurrency: int | None = None,
                progress: bool = True, warmup: int = 1) -> BenchResult:
    """Run ``prompts`` through ``engine`` with at most ``concurrency`` in flight (None: all at once)."""
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if warmup:
        _warm_up(engine, prompts[:warmup])
    stats_before = engine.stats()
    device = engine.info.device
    _reset_gpu_peak(device)
    limit = concurrency or len(prompts)
    pending = deque(enumerate(prompts))
    in_flight: dict[str, RequestRecord] = {}
    records: list[RequestRecord] = []
    bar = tqdm(total=len(prompts), desc=f"bench c={concurrency or 'all'}", disable=not progress, leave=False)
    start = time.perf_counter()
    while pending or in_flight:
        while pending and len(in_flight) < limit:
            i, prompt = pending.popleft()
            now = time.perf_counter()
            record = RequestRecord(prompt_tokens=len(prompt.token_ids), start_time=now)
            request_id = engine.add_request(prompt.token_ids, bench_params(prompt.output_len),
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


def _step(engine: LLMEngine, in_flight: dict[str, RequestRecord], bar: tqdm) -> None:
    outputs = engine.step()
    now = time.perf_counter()
    for out in outputs:
        record = in_flight.get(out.request_id)
        if record is None:
            continue
        record.add_chunk(now, sum(len(c.delta_token_ids) for c in out.outputs))
        if out.finished:
            record.end_time = now
            record.cached_tokens = out.num_cached_tokens
            reason = out.outputs[0].finish_reason if out.outputs else None
            if reason == "abort":
                record.error = "aborted by the engine"
            del in_flight[out.request_id]
            bar.update(1)


def _warm_up(engine: LLMEngine, prompts: list[BenchPrompt]) -> None:
    """Run a few short requests first, so one-time costs (allocator, kernels) stay out of the numbers."""
    for i, prompt in enumerate(prompts):
        engine.add_request(prompt.token_ids, bench_params(min(prompt.output_len, 4)), request_id=f"warmup-{i}")
    while engine.has_unfinished():
        engine.step()


def kv_cache_info(engine: LLMEngine) -> dict[str, Any]:
    """Size of the engine's paged KV cache: blocks, tokens it can hold, and MiB."""
    blocks = engine.stats().kv_blocks_total
    block_size = engine.info.block_size
    size = blocks * bytes_per_block(engine.info.model_config, block_size, engine.info.dtype)
    return {"blocks": blocks, "block_size": block_size, "tokens": blocks * block_size, "size_mb": size / 2**20}


def _reset_gpu_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _gpu_peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


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
