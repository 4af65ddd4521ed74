"""EngineMetrics: the Prometheus counters follow the engine's running totals (model-free)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tokenmill.engine.llm_engine import EngineStats
from tokenmill.engine.metrics import EngineMetrics

COUNTERS = ("tokenmill_prompt_tokens_total", "tokenmill_prefix_cache_queries_total",
            "tokenmill_prefix_cache_hits_total", "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total")


def samples(metrics: EngineMetrics) -> dict[str, float]:
    text = metrics.render()[0].decode()
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
            if not s.labels}


def stats(prompt: int, queries: int, hits: int) -> EngineStats:
    return EngineStats(num_running=1, num_waiting=0, num_preemptions_total=0, kv_blocks_used=2, kv_blocks_total=8,
                       prompt_tokens_total=prompt, generation_tokens_total=0,
                       prefix_cache_queries_total=queries, prefix_cache_hits_total=hits)


def counters(metrics: EngineMetrics) -> tuple[float, ...]:
    m = samples(metrics)
    return tuple(m[name] for name in COUNTERS)


def test_prefix_cache_counters_advance_by_the_difference_of_the_totals() -> None:
    metrics = EngineMetrics()
    assert counters(metrics) == (0, 0, 0, 0, 0)  # exported from the start, so rate() has a baseline
    metrics.record_stats(stats(prompt=100, queries=100, hits=0))  # a first prompt: nothing cached yet
    assert counters(metrics) == (100, 100, 0, 100, 0)
    metrics.record_stats(stats(prompt=100, queries=100, hits=0))  # a step without new prompts
    assert counters(metrics) == (100, 100, 0, 100, 0)
    metrics.record_stats(stats(prompt=200, queries=200, hits=96))  # the same prompt again: 6 blocks reused
    assert counters(metrics) == (200, 200, 96, 200, 96)


def test_counters_never_go_back() -> None:
    metrics = EngineMetrics()
    metrics.record_stats(stats(prompt=50, queries=50, hits=32))
    metrics.record_stats(stats(prompt=10, queries=10, hits=0))  # a restarted engine starts its totals again
    assert counters(metrics) == (50, 50, 32, 50, 32)
    metrics.record_stats(stats(prompt=30, queries=30, hits=16))  # growth after the drop still counts
    assert counters(metrics) == (70, 70, 48, 70, 48)
