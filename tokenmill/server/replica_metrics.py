"""/metrics for a server of engine replicas: the replicas' stats summed, and each replica labelled.

Every chunk a replica sends carries its ``EngineStats``; ``ReplicaStatsBook`` keeps each replica's
newest snapshot and feeds their sum to the server's ``EngineMetrics``, so the DESIGN.md names
(``tokenmill_num_requests_running``, ``tokenmill_prefix_cache_hits_total`` ...) mean the whole
deployment. The counters stay monotonic when a replica dies and Ray starts a new one (a new name,
totals from zero): a dead replica's last totals stay in the sum. Beside them, gauges labelled
``replica`` show each live replica (``tokenmill_replica_num_requests_running{replica="..."}``).
Gauges are as of the last chunk each replica sent (an idle replica sends none).
"""

from __future__ import annotations

import dataclasses
import threading

from prometheus_client import Counter, Gauge

from tokenmill.engine.info import EngineStats
from tokenmill.engine.metrics import EngineMetrics

# Snapshots, not totals: summed over live replicas only.
GAUGE_FIELDS = ("num_running", "num_waiting", "kv_blocks_used", "kv_blocks_total", "kv_blocks_cached_free",
                "tokens_prefilled_last_step", "tokens_decoded_last_step")


class ReplicaStatsBook:
    """The newest stats of each replica, their sum recorded into ``metrics`` after each update."""

    def __init__(self, metrics: EngineMetrics) -> None:
        self.metrics = metrics
        self._lock = threading.Lock()
        self._latest: dict[str, tuple[float, EngineStats]] = {}
        self._retired = _zero()  # totals of replicas that are gone
        r = metrics.registry
        self.running = Gauge("tokenmill_replica_num_requests_running", "Requests being decoded, per replica.",
                             labelnames=["replica"], registry=r)
        self.waiting = Gauge("tokenmill_replica_num_requests_waiting", "Requests waiting, per replica.",
                             labelnames=["replica"], registry=r)
        self.kv_usage = Gauge("tokenmill_replica_kv_cache_usage_ratio", "KV cache blocks in use, per replica.",
                              labelnames=["replica"], registry=r)
        self.cache_hits = Gauge("tokenmill_replica_prefix_cache_hit_tokens",
                                "Prompt tokens found in the prefix cache since the replica started.",
                                labelnames=["replica"], registry=r)
        self.routed = Counter("tokenmill_replica_requests_routed", "Requests each replica took.",
                              labelnames=["replica"], registry=r)

    def routed_to(self, replica: str) -> None:
        self.routed.labels(replica=replica).inc()

    def update(self, replica: str, stats: EngineStats, sent_at: float) -> None:
        """Record a snapshot; an older one than already seen (chunks of different requests may
        arrive out of order) is dropped."""
        with self._lock:
            seen = self._latest.get(replica)
            if seen is not None and seen[0] >= sent_at:
                return
            self._latest[replica] = (sent_at, stats)
            self.running.labels(replica=replica).set(stats.num_running)
            self.waiting.labels(replica=replica).set(stats.num_waiting)
            self.kv_usage.labels(replica=replica).set(stats.kv_cache_usage)
            self.cache_hits.labels(replica=replica).set(stats.prefix_cache_hits_total)
            self.metrics.record_stats(self._total())

    def retire(self, replica: str) -> None:
        """The replica is gone: its totals stay in the sum, its gauges leave."""
        with self._lock:
            seen = self._latest.pop(replica, None)
            if seen is None:
                return
            self._retired = _add(self._retired, _totals_only(seen[1]))
            for gauge in (self.running, self.waiting, self.kv_usage, self.cache_hits):
                gauge.remove(replica)
            self.metrics.record_stats(self._total())

    def replicas(self) -> list[str]:
        with self._lock:
            return list(self._latest)

    def total(self) -> EngineStats:
        with self._lock:
            return self._total()

    def _total(self) -> EngineStats:
        total = self._retired
        for _, stats in self._latest.values():
            total = _add(total, stats)
        return total


def _zero() -> EngineStats:
    return EngineStats(**{f.name: 0 for f in dataclasses.fields(EngineStats)})


def _add(a: EngineStats, b: EngineStats) -> EngineStats:
    return EngineStats(**{f.name: getattr(a, f.name) + getattr(b, f.name) for f in dataclasses.fields(EngineStats)})


def _totals_only(stats: EngineStats) -> EngineStats:
    return dataclasses.replace(stats, **dict.fromkeys(GAUGE_FIELDS, 0))
