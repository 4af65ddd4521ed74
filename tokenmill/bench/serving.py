"""Serving benchmark: the same workload over HTTP against any OpenAI-compatible server.

Each request is a streaming ``POST /v1/completions`` with ``stream_options.include_usage``,
so TTFT and inter-token gaps are measured at the client, network and server queue included.
Requests are released on a Poisson schedule (``request_rate`` per second; inf: all at once)
and at most ``concurrency`` are in flight. The token count of a request comes from the
server's final usage chunk when it sends one, else from the number of text chunks; so do the
prefix-cache hits (``usage.prompt_tokens_details.cached_tokens``, which tokenmill always sends).
The speculative-decoding acceptance comes from the server's ``GET /metrics`` counters before and
after the run (tokenmill's or vLLM's names), when it exports them.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from typing import Any

import httpx

from tokenmill.bench.dataset import BenchPrompt
from tokenmill.bench.metrics import BenchResult, RequestRecord, SpecDecodeStats, summarize
from tokenmill.bench.progress import TokenProgress


async def fetch_model_name(client: httpx.AsyncClient, base_url: str) -> str:
    """The first model the server lists at ``GET /v1/models``."""
    resp = await client.get(f"{base_url}/v1/models")
    resp.raise_for_status()
    data = resp.json().get("data") or []
    if not data:
        raise ValueError(f"{base_url}/v1/models lists no model; pass --served-model-name")
    return data[0]["id"]


def arrival_delays(num: int, request_rate: float, seed: int = 0) -> list[float]:
    """Seconds after the start at which each request is released: a Poisson process of ``request_rate``."""
    if not request_rate > 0:
        raise ValueError(f"request_rate must be > 0 (inf for all at once), got {request_rate}")
    if math.isinf(request_rate):
        return [0.0] * num
    rng = random.Random(seed)
    delays, t = [], 0.0
    for _ in range(num):
        delays.append(t)
        t += rng.expovariate(request_rate)
    return delays


async def run_serving(base_url: str, prompts: list[BenchPrompt], *, model: str | None = None,
                      concurrency: int | None = None, request_rate: float = math.inf, seed: int = 0,
                      api_key: str | None = None, timeout_s: float = 600.0, progress: bool = True) -> BenchResult:
    """Benchmark the server at ``base_url`` (e.g. http://127.0.0.1:8000) with ``prompts``."""
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    base_url = base_url.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency or len(prompts) or 1)
    async with httpx.AsyncClient(headers=headers, timeout=timeout_s, limits=limits) as client:
        model = model or await fetch_model_name(client, base_url)
        spec_before = await fetch_spec_counters(client, base_url)
        slots = asyncio.Semaphore(concurrency or len(prompts) or 1)
        bar = TokenProgress(prompts, f"bench {base_url}", progress)
        start = time.perf_counter()

        async def one(prompt: BenchPrompt, delay: float) -> RequestRecord:
            await asyncio.sleep(delay)
            async with slots:
                record = await _send(client, base_url, model, prompt, bar)
            bar.request_done()
            return record

        delays = arrival_delays(len(prompts), request_rate, seed)
        records = await asyncio.gather(*(one(p, d) for p, d in zip(prompts, delays, strict=True)))
        duration = time.perf_counter() - start
        bar.close()
        spec_after = await fetch_spec_counters(client, base_url)
    spec = None
    if spec_before is not None and spec_after is not None and spec_after[1] > spec_before[1]:
        spec = SpecDecodeStats.of(*(a - b for a, b in zip(spec_after, spec_before, strict=True)))
    return summarize(list(records), duration, backend="http", concurrency=concurrency, request_rate=request_rate,
                     spec_decode=spec)


# (drafts, draft tokens, accepted tokens) as tokenmill and vLLM name them on /metrics
SPEC_COUNTERS = (("tokenmill_spec_decode_num_drafts_total", "tokenmill_spec_decode_draft_tokens_total",
                  "tokenmill_spec_decode_accepted_tokens_total"),
                 ("vllm:spec_decode_num_drafts_total", "vllm:spec_decode_num_draft_tokens_total",
                  "vllm:spec_decode_num_accepted_tokens_total"))


async def fetch_spec_counters(client: httpx.AsyncClient, base_url: str) -> tuple[int, int, int] | None:
    """The server's speculative-decoding totals (drafts, draft tokens, accepted tokens), summed over
    label sets; None when it exports none."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        resp = await client.get(f"{base_url}/metrics")
        resp.raise_for_status()
        totals: dict[str, float] = {}
        for family in text_string_to_metric_families(resp.text):
            for sample in family.samples:
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    except (httpx.HTTPError, ValueError):
        return None
    for names in SPEC_COUNTERS:
        if all(name in totals for name in names):
            return tuple(int(totals[name]) for name in names)
    return None


def completion_body(model: str, prompt: BenchPrompt) -> dict[str, Any]:
    """The streaming /v1/completions request for one prompt (ignore_eos is understood by tokenmill,
    vLLM and llama.cpp; servers without it may stop early, which the token counts then show)."""
    return {"model": model, "prompt": prompt.text, "max_tokens": prompt.output_len, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}


async def _send(client: httpx.AsyncClient, base_url: str, model: str, prompt: BenchPrompt,
                bar: TokenProgress | None = None) -> RequestRecord:
    record = RequestRecord(prompt_tokens=len(prompt.token_ids), start_time=time.perf_counter())
    usage: dict[str, Any] | None = None
    try:
        async with client.stream("POST", f"{base_url}/v1/completions", json=completion_body(model, prompt)) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")
                record.error = f"HTTP {resp.status_code}: {body[:300]}"
                return record
            async for line in resp.aiter_lines():
                before = record.output_tokens
                usage = _handle_line(line, record) or usage
                if bar is not None:
                    bar.add_tokens(record.output_tokens - before)
    except httpx.HTTPError as e:
        record.error = f"{type(e).__name__}: {e}"
        return record
    record.end_time = time.perf_counter()
    if usage:
        # The server's counts are exact; a chunk may hold several tokens or none.
        record.prompt_tokens = usage.get("prompt_tokens", record.prompt_tokens)
        record.output_tokens = usage.get("completion_tokens", record.output_tokens)
        record.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    return record


def _handle_line(line: str, record: RequestRecord) -> dict[str, Any] | None:
    """Parse one SSE line into ``record``; returns the usage object when the line carries one."""
    if not line.startswith("data:"):
        return None
    payload = line[len("data:"):].strip()
    if payload == "[DONE]":
        return None
    try:
        event = json.loads(payload)
    except json.JSONDecodeError:
        record.error = f"not a JSON event: {payload[:200]!r}"
        return None
    if "error" in event:
        record.error = str(event["error"].get("message", event["error"]))
        return None
    choices = event.get("choices") or []
    if choices and choices[0].get("text"):
        record.add_chunk(time.perf_counter(), 1)
    return event.get("usage")
