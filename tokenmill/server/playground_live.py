"""The engine at work, for the playground's live panel: ``GET /v1/playground/live``.

Each call reads the engine's stats (the core process sends them after every step) and the
server's latency histograms (the ones /metrics exports), records a sample when the last one is at
least MIN_INTERVAL_S old (its rates and percentiles computed then, once), and returns the current
values with the points of the last HISTORY_S (``since``: only the newer ones, for a poller).
So the history grows while someone watches (the page polls every second); rates and percentiles
between two samples further apart are averages over the gap. Nothing runs in the background.

Tokens/s is the change of the engine's token totals between samples; TTFT / TPOT percentiles are
read from the Prometheus histograms over the last WINDOW_S, interpolated inside a bucket the way
Prometheus' ``histogram_quantile`` does (so they are as fine as the buckets). The histograms count
every model of the server; the other values are the chosen model's engine.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Query, Request
from prometheus_client import Histogram

from tokenmill.server.serving import get_state

router = APIRouter(tags=["playground"])

MIN_INTERVAL_S = 0.5
HISTORY_S = 600.0
WINDOW_S = 60.0
QUANTILES = (0.5, 0.9, 0.99)


@dataclass
class Sample:
    t: float  # unix time
    running: int
    waiting: int
    kv_used: int
    kv_cached_free: int  # unused blocks that still hold a cached prefix (reusable by the next request)
    kv_total: int
    kv_shared: int  # of the used blocks, those several sequences hold at once (prefix caching, forks)
    prompt_tokens: int  # totals since the engine started
    generation_tokens: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    ttft: list[float]  # cumulative bucket counts of the TTFT histogram (le = bounds, +Inf last)
    tpot: list[float]


def bucket_counts(histogram: Histogram) -> tuple[list[float], list[float]]:
    """(upper bounds, cumulative counts) of a prometheus_client Histogram, +Inf last."""
    bounds, counts = [], []
    for s in histogram.collect()[0].samples:
        if s.name.endswith("_bucket"):
            bounds.append(float(s.labels["le"]))
            counts.append(s.value)
    return bounds, counts


def quantile(q: float, bounds: list[float], counts: list[float]) -> float | None:
    """The q-quantile of cumulative bucket ``counts`` (None when empty), linear inside the bucket;
    in the +Inf bucket, the highest finite bound (as histogram_quantile does)."""
    total = counts[-1] if counts else 0
    if total <= 0:
        return None
    rank = q * total
    for i, (upper, cum) in enumerate(zip(bounds, counts, strict=True)):
        if cum >= rank:
            if upper == float("inf"):
                return bounds[i - 1] if i else None
            lower, below = (bounds[i - 1], counts[i - 1]) if i else (0.0, 0.0)
            inside = cum - below
            return upper if inside <= 0 else lower + (upper - lower) * (rank - below) / inside
    return bounds[-2] if len(bounds) > 1 else None


class LiveHistory:
    """Per served model, the samples of the last HISTORY_S, each with its point (computed once, when taken)."""

    def __init__(self) -> None:
        self.samples: dict[str, deque[tuple[Sample, dict[str, Any]]]] = {}

    def record(self, name: str, sample: Sample, metrics: Any) -> None:
        """Keep ``sample`` if the last one is at least MIN_INTERVAL_S old; drop the ones past HISTORY_S."""
        samples = self.samples.setdefault(name, deque())
        if samples and sample.t - samples[-1][0].t < MIN_INTERVAL_S:
            return
        previous = samples[-1][0] if samples else None
        # percentiles since the last sample at least WINDOW_S older (a shorter history: since the oldest)
        base = samples[0][0] if samples else None
        for old, _ in samples:
            if old.t > sample.t - WINDOW_S:
                break
            base = old
        samples.append((sample, point(sample, previous, base, metrics)))
        while sample.t - samples[0][0].t > HISTORY_S:
            samples.popleft()


def history(request: Request) -> LiveHistory:
    state = request.app.state
    if not hasattr(state, "playground_live"):
        state.playground_live = LiveHistory()
    return state.playground_live


def take_sample(engine: Any, metrics: Any) -> Sample:
    stats = engine.stats()
    _, ttft = bucket_counts(metrics.ttft)
    _, tpot = bucket_counts(metrics.tpot)
    if stats is None:  # no step yet: an empty cache
        return Sample(time.time(), 0, engine.num_waiting(), 0, 0, engine.info.num_blocks, 0, 0, 0, 0, 0, ttft, tpot)
    return Sample(time.time(), stats.num_running, stats.num_waiting, stats.kv_blocks_used, stats.kv_blocks_cached_free,
                  stats.kv_blocks_total, stats.kv_blocks_shared, stats.prompt_tokens_total, stats.generation_tokens_total,
                  stats.prefix_cache_queries_total, stats.prefix_cache_hits_total, ttft, tpot)


@router.get("/v1/playground/live")
async def live(request: Request, model: str | None = Query(None),
               since: float | None = Query(None, description="only history points after this unix time")
               ) -> dict[str, Any]:
    """Current engine values and their history (see the module docstring)."""
    state = get_state(request)
    state.check_model(model)
    engine, name = state.ready_engine(model), state.served_name(model)
    now = take_sample(engine, state.metrics)
    store = history(request)
    store.record(name, now, state.metrics)
    samples = store.samples[name]
    points = [p for _, p in samples if since is None or p["t"] > since]
    return {"model": name, "now": now.t, "window_s": WINDOW_S, "history_s": HISTORY_S,
            "block_size": engine.info.block_size, "current": {**samples[-1][1], **_gauges(now)}, "history": points}


def _gauges(s: Sample) -> dict[str, Any]:
    return {"t": s.t, "running": s.running, "waiting": s.waiting, "kv_used": s.kv_used, "kv_cached": s.kv_cached_free,
            "kv_free": s.kv_total - s.kv_used - s.kv_cached_free, "kv_total": s.kv_total, "kv_shared": s.kv_shared,
            "prefix_cache_hit_rate": s.prefix_cache_hits / s.prefix_cache_queries if s.prefix_cache_queries else None}


def point(s: Sample, previous: Sample | None, base: Sample | None, metrics: Any) -> dict[str, Any]:
    """A sample's gauges, tokens/s since ``previous`` and the latency percentiles since ``base``."""
    out = _gauges(s)
    dt = s.t - previous.t if previous is not None else 0.0
    out["tokens_per_s"] = (s.generation_tokens - previous.generation_tokens) / dt if dt else None
    out["prompt_tokens_per_s"] = (s.prompt_tokens - previous.prompt_tokens) / dt if dt else None
    out["finished_in_window"] = None
    for key, now, then in (("ttft", s.ttft, base.ttft if base else None), ("tpot", s.tpot, base.tpot if base else None)):
        bounds, _ = bucket_counts(getattr(metrics, key))
        delta = [a - b for a, b in zip(now, then, strict=True)] if then is not None else None
        for q in QUANTILES:
            out[f"{key}_p{round(q * 100)}"] = quantile(q, bounds, delta) if delta else None
        if key == "ttft" and delta:
            out["finished_in_window"] = delta[-1]
    return out
