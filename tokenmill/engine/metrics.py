"""Prometheus collectors for the server: request latencies, engine gauges, token counters.

Each EngineMetrics owns its own CollectorRegistry (not prometheus_client's global one), so
several engines or apps in one process (tests) never collide. The engine thread records into
it: ``record_finished`` for each finished RequestOutput, ``record_stats`` after each step.

Every metric vLLM also has is exported under vLLM v1's name too (``vllm:time_to_first_token_seconds``,
``vllm:num_requests_running``, ``vllm:kv_cache_usage_perc``, ``vllm:request_success_total{finished_reason}``,
``vllm:prefix_cache_hits_total``, ``vllm:spec_decode_num_accepted_tokens_total``, ... see VLLM_NAMES), so
dashboards and alerts built for vLLM work unchanged. vLLM labels its metrics by ``model_name``; this
registry belongs to one engine and has no model name, so the aliases carry no such label.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from tokenmill.outputs import RequestOutput

# Seconds. Fine at the low end: a decode step is tens of ms on a CPU, a few ms on a GPU.
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0,
                   120.0, 240.0, 480.0)

FINISH_REASONS = ("stop", "length", "abort", "error")

# tokenmill's metric -> vLLM's name for the same quantity (counters without their "_total" suffix)
VLLM_NAMES = {
    "tokenmill_time_to_first_token_seconds": "vllm:time_to_first_token_seconds",
    "tokenmill_time_per_output_token_seconds": "vllm:time_per_output_token_seconds",
    "tokenmill_e2e_request_latency_seconds": "vllm:e2e_request_latency_seconds",
    "tokenmill_request_queue_time_seconds": "vllm:request_queue_time_seconds",
    "tokenmill_num_requests_running": "vllm:num_requests_running",
    "tokenmill_num_requests_waiting": "vllm:num_requests_waiting",
    "tokenmill_kv_cache_usage_ratio": "vllm:kv_cache_usage_perc",  # a fraction in vLLM too, despite "perc"
    "tokenmill_prompt_tokens": "vllm:prompt_tokens",
    "tokenmill_generation_tokens": "vllm:generation_tokens",
    "tokenmill_num_preemptions": "vllm:num_preemptions",
    "tokenmill_requests": "vllm:request_success",  # label finished_reason (vLLM's), not finish_reason
    "tokenmill_prefix_cache_queries": "vllm:prefix_cache_queries",
    "tokenmill_prefix_cache_hits": "vllm:prefix_cache_hits",
    "tokenmill_spec_decode_num_drafts": "vllm:spec_decode_num_drafts",
    "tokenmill_spec_decode_draft_tokens": "vllm:spec_decode_num_draft_tokens",
    "tokenmill_spec_decode_accepted_tokens": "vllm:spec_decode_num_accepted_tokens",
}


class EngineMetrics:
    """The Prometheus names of DESIGN.md, in a private registry; ``render()`` is /metrics."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("tokenmill_time_to_first_token_seconds",
                              "Arrival to first generated token.", buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("tokenmill_time_per_output_token_seconds",
                              "Mean time per output token after the first.", buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("tokenmill_e2e_request_latency_seconds",
                             "Arrival to finish.", buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("tokenmill_request_queue_time_seconds",
                                    "Arrival to first scheduled.", buckets=LATENCY_BUCKETS, registry=r)
        self.running = Gauge("tokenmill_num_requests_running", "Requests being decoded.", registry=r)
        self.waiting = Gauge("tokenmill_num_requests_waiting", "Requests waiting to be scheduled.", registry=r)
        self.kv_usage = Gauge("tokenmill_kv_cache_usage_ratio", "Fraction of KV cache blocks in use (0..1).",
                              registry=r)
        self.kv_bytes = Gauge("tokenmill_kv_cache_bytes", "Bytes of the KV cache tensors.", registry=r)
        self.kv_tokens = Gauge("tokenmill_kv_cache_tokens", "Tokens the KV cache can hold.", registry=r)
        # Counters are exposed with a "_total" suffix: tokenmill_prompt_tokens_total ...
        self.prompt_tokens = Counter("tokenmill_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("tokenmill_generation_tokens", "Tokens generated.", registry=r)
        self.preemptions = Counter("tokenmill_num_preemptions", "Requests preempted.", registry=r)
        self.requests = Counter("tokenmill_requests", "Finished requests by finish reason.",
                                labelnames=["finish_reason"], registry=r)
        self._vllm_requests = Counter(VLLM_NAMES["tokenmill_requests"], "Finished requests by finish reason.",
                                      labelnames=["finished_reason"], registry=r)
        for reason in FINISH_REASONS:  # export zeros so dashboards see every label
            self.requests.labels(finish_reason=reason)
            self._vllm_requests.labels(finished_reason=reason)
        self.prefix_cache_queries = Counter("tokenmill_prefix_cache_queries",
                                            "Prompt tokens looked up in the prefix cache.", registry=r)
        self.prefix_cache_hits = Counter("tokenmill_prefix_cache_hits",
                                         "Prompt tokens found in the prefix cache (KV reused).", registry=r)
        self.spec_drafts = Counter("tokenmill_spec_decode_num_drafts",
                                   "Speculative decoding: sequence steps that verified draft tokens.", registry=r)
        self.spec_draft_tokens = Counter("tokenmill_spec_decode_draft_tokens",
                                         "Speculative decoding: draft tokens verified.", registry=r)
        self.spec_accepted_tokens = Counter("tokenmill_spec_decode_accepted_tokens",
                                            "Speculative decoding: draft tokens accepted.", registry=r)
        # each unlabeled collector above that vLLM also has, and its copy under vLLM's name: updated together
        self._aliases = {c: _alias(c, r) for c in (
            self.ttft, self.tpot, self.e2e, self.queue_time, self.running, self.waiting, self.kv_usage,
            self.prompt_tokens, self.generation_tokens, self.preemptions, self.prefix_cache_queries,
            self.prefix_cache_hits, self.spec_drafts, self.spec_draft_tokens, self.spec_accepted_tokens)}
        # Each EngineStats total and the counter it advances (by the difference to the last record_stats).
        self._total_counters: dict[str, Counter] = {
            "prompt_tokens_total": self.prompt_tokens,
            "generation_tokens_total": self.generation_tokens,
            "num_preemptions_total": self.preemptions,
            "prefix_cache_queries_total": self.prefix_cache_queries,
            "prefix_cache_hits_total": self.prefix_cache_hits,
            "spec_decode_drafts_total": self.spec_drafts,
            "spec_decode_draft_tokens_total": self.spec_draft_tokens,
            "spec_decode_accepted_tokens_total": self.spec_accepted_tokens,
        }
        self._last_totals = dict.fromkeys(self._total_counters, 0)

    def record_finished(self, out: RequestOutput) -> None:
        """Record the latencies and finish reason of a request that just finished."""
        m = out.metrics
        if m.ttft is not None:
            self._update(self.ttft, "observe", m.ttft)
        if m.tpot is not None and any(len(c.token_ids) > 1 for c in out.outputs):
            self._update(self.tpot, "observe", m.tpot)
        if m.e2e_latency is not None:
            self._update(self.e2e, "observe", m.e2e_latency)
        if m.queue_time is not None:
            self._update(self.queue_time, "observe", m.queue_time)
        self._count_request(request_finish_reason(out))

    def record_failed(self) -> None:
        """A request the engine raised on."""
        self._count_request("error")

    def record_stats(self, stats: Any) -> None:
        """Set the gauges and advance the counters from an ``EngineStats``."""
        self._update(self.running, "set", stats.num_running)
        self._update(self.waiting, "set", stats.num_waiting)
        self._update(self.kv_usage, "set", stats.kv_cache_usage)
        self.kv_bytes.set(stats.kv_cache_bytes)
        self.kv_tokens.set(stats.kv_cache_tokens)
        for name, counter in self._total_counters.items():
            new = getattr(stats, name)
            if new > self._last_totals[name]:
                self._update(counter, "inc", new - self._last_totals[name])
            self._last_totals[name] = new

    def _update(self, collector: Any, method: str, value: float) -> None:
        """``collector.method(value)``, and the same on its vLLM-named copy."""
        getattr(collector, method)(value)
        getattr(self._aliases[collector], method)(value)

    def _count_request(self, reason: str) -> None:
        self.requests.labels(finish_reason=reason).inc()
        self._vllm_requests.labels(finished_reason=reason).inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _alias(collector: Any, registry: CollectorRegistry) -> Any:
    """A collector of the same kind (help text, buckets) as ``collector`` under its vLLM name."""
    family = collector.describe()[0]  # a counter's family name has no "_total"
    name = VLLM_NAMES[family.name]
    if isinstance(collector, Histogram):
        bounds = [float(s.labels["le"]) for s in collector.collect()[0].samples if s.name.endswith("_bucket")]
        return Histogram(name, family.documentation, buckets=bounds, registry=registry)
    return type(collector)(name, family.documentation, registry=registry)


def request_finish_reason(out: RequestOutput) -> str:
    """One reason per request: abort if any sample was aborted, else the first sample's."""
    reasons = [c.finish_reason for c in out.outputs if c.finish_reason]
    if "abort" in reasons:
        return "abort"
    return reasons[0] if reasons else "abort"
