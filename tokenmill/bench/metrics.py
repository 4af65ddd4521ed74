"""Benchmark metrics: per-request timestamps in, latency percentiles and throughput out.

Every benchmark (offline engine, HTTP server, transformers) records the same thing per
request: when it was sent and when each streamed chunk of tokens arrived (perf_counter
seconds). From those timestamps alone:

- TTFT  = first chunk - start
- TPOT  = (last chunk - first chunk) / (output tokens - 1): the first token is excluded,
          because it pays for the prefill; requests with one output token have no TPOT
- ITL   = the gaps between consecutive chunks (one sample per gap, over all requests)
- e2e   = end - start, where end is the last chunk (or the finish time when later)

The prefix-cache hit rate is the share of the input tokens of completed requests that the
server reported as cached (RequestOutput.num_cached_tokens, or usage.prompt_tokens_details
.cached_tokens over HTTP); unknown (None) when no request reported it.

Speculative decoding (when the engine drafts): the acceptance rate is accepted / verified draft
tokens, and the mean accepted length is the tokens one verification yields, 1 + accepted / drafts
(vLLM's definition), from the engine's counters before and after the run.
"""

from __future__ import annotations

import math
import resource
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    """What one benchmark request did, as timestamps (time.perf_counter seconds)."""

    prompt_tokens: int
    start_time: float
    chunk_times: list[float] = field(default_factory=list)  # arrival of each chunk holding >= 1 token
    output_tokens: int = 0
    end_time: float | None = None
    error: str | None = None
    cached_tokens: int | None = None  # prompt tokens served from the prefix cache; None: not reported

    def add_chunk(self, when: float, num_tokens: int) -> None:
        """Record that ``num_tokens`` new tokens arrived at ``when``; empty chunks are ignored."""
        if num_tokens > 0:
            self.chunk_times.append(when)
            self.output_tokens += num_tokens

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.chunk_times)

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.start_time if self.chunk_times else None

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first; None with fewer than two tokens."""
        if len(self.chunk_times) < 1 or self.output_tokens < 2:
            return None
        return (self.chunk_times[-1] - self.chunk_times[0]) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        times = self.chunk_times
        return [b - a for a, b in zip(times, times[1:], strict=False)]

    @property
    def e2e(self) -> float | None:
        if not self.chunk_times:
            return None
        end = self.chunk_times[-1] if self.end_time is None else max(self.end_time, self.chunk_times[-1])
        return end - self.start_time


@dataclass
class LatencyStats:
    """Mean and percentiles of one latency, in seconds (None when there were no samples)."""

    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None

    @classmethod
    def of(cls, samples: list[float]) -> LatencyStats:
        if not samples:
            return cls(None, None, None, None)
        ordered = sorted(samples)
        p50, p90, p99 = (percentile(ordered, q) for q in PERCENTILES)
        return cls(math.fsum(ordered) / len(ordered), p50, p90, p99)


def percentile(ordered: list[float], q: float) -> float:
    """The q-th percentile (0..100) of sorted samples, linear between closest ranks (numpy's default)."""
    if not ordered:
        raise ValueError("percentile of an empty list")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    pos = (len(ordered) - 1) * q / 100
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


@dataclass
class SpecDecodeStats:
    """Speculative decoding over one run: drafts verified and how many of their tokens were kept."""

    num_drafts: int  # sequence steps that verified drafts
    draft_tokens: int
    accepted_tokens: int
    acceptance_rate: float | None  # accepted_tokens / draft_tokens
    mean_accepted_length: float | None  # tokens per verification: 1 + accepted_tokens / num_drafts

    @classmethod
    def of(cls, num_drafts: int, draft_tokens: int, accepted_tokens: int) -> SpecDecodeStats:
        return cls(num_drafts, draft_tokens, accepted_tokens,
                   accepted_tokens / draft_tokens if draft_tokens else None,
                   1 + accepted_tokens / num_drafts if num_drafts else None)


@dataclass
class BenchResult:
    """The summary of one benchmark run; ``to_dict`` is the ``--json`` schema."""

    backend: str  # "tokenmill" | "transformers" | "http"
    num_requests: int
    completed: int
    failed: int
    concurrency: int | None  # None: all requests in flight at once
    request_rate: float  # requests/s offered; inf: all at once
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    ttft_s: LatencyStats
    tpot_s: LatencyStats
    itl_s: LatencyStats
    e2e_s: LatencyStats
    request_throughput: float
    output_throughput: float
    total_throughput: float
    peak_rss_mb: float
    peak_gpu_memory_mb: float | None = None
    kv_cache: dict[str, Any] | None = None  # dtype, bytes_per_token, tokens, blocks, block_size, size_mb, ... (engine backends)
    cached_input_tokens: int | None = None  # of total_input_tokens, served from the prefix cache
    prefix_cache_hit_rate: float | None = None  # cached_input_tokens / total_input_tokens
    spec_decode: SpecDecodeStats | None = None  # when the engine speculated (and reports it)
    errors: list[str] = field(default_factory=list)  # first few error messages

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        # JSON has no infinity; an unlimited rate is written as null.
        if math.isinf(self.request_rate):
            data["request_rate"] = None
        return data


def summarize(records: list[RequestRecord], duration_s: float, *, backend: str, concurrency: int | None,
              request_rate: float = math.inf, peak_gpu_memory_mb: float | None = None,
              kv_cache: dict[str, Any] | None = None, spec_decode: SpecDecodeStats | None = None) -> BenchResult:
    """Fold the per-request records of one run (lasting ``duration_s``) into a BenchResult."""
    if duration_s <= 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    done = [r for r in records if r.ok]
    input_tokens = sum(r.prompt_tokens for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    reported = [r.cached_tokens for r in done if r.cached_tokens is not None]
    cached = sum(reported) if reported else None
    return BenchResult(
        backend=backend,
        num_requests=len(records),
        completed=len(done),
        failed=len(records) - len(done),
        concurrency=concurrency,
        request_rate=request_rate,
        duration_s=duration_s,
        total_input_tokens=input_tokens,
        total_output_tokens=output_tokens,
        ttft_s=LatencyStats.of([r.ttft for r in done if r.ttft is not None]),
        tpot_s=LatencyStats.of([r.tpot for r in done if r.tpot is not None]),
        itl_s=LatencyStats.of([gap for r in done for gap in r.itls]),
        e2e_s=LatencyStats.of([r.e2e for r in done if r.e2e is not None]),
        request_throughput=len(done) / duration_s,
        output_throughput=output_tokens / duration_s,
        total_throughput=(input_tokens + output_tokens) / duration_s,
        peak_rss_mb=peak_rss_mb(),
        peak_gpu_memory_mb=peak_gpu_memory_mb,
        kv_cache=kv_cache,
        spec_decode=spec_decode,
        cached_input_tokens=cached,
        prefix_cache_hit_rate=cached / input_tokens if cached is not None and input_tokens else None,
        errors=[r.error or "no tokens received" for r in records if not r.ok][:5],
    )


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
