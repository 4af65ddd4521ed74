"""Benchmark metric computations on synthetic timestamps."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from tokenmill.bench.metrics import LatencyStats, RequestRecord, percentile, summarize


def make_record(start: float, chunks: list[tuple[float, int]], prompt_tokens: int = 10) -> RequestRecord:
    record = RequestRecord(prompt_tokens=prompt_tokens, start_time=start)
    for when, n in chunks:
        record.add_chunk(when, n)
    return record


@pytest.mark.parametrize("n", [1, 2, 7, 100])
@pytest.mark.parametrize("q", [0, 50, 90, 99, 100])
def test_percentile_matches_numpy(n: int, q: float) -> None:
    rng = random.Random(n)
    samples = sorted(rng.uniform(0, 5) for _ in range(n))
    assert percentile(samples, q) == pytest.approx(float(np.percentile(samples, q)))


def test_percentile_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="empty"):
        percentile([], 50)
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        percentile([1.0], 101)


def test_latency_stats_of_samples_and_empty() -> None:
    stats = LatencyStats.of([0.4, 0.1, 0.3, 0.2])
    assert stats.mean == pytest.approx(0.25)
    assert stats.p50 == pytest.approx(0.25)
    assert stats.p90 == pytest.approx(0.37)
    assert stats.p99 == pytest.approx(0.397)
    assert LatencyStats.of([]) == LatencyStats(None, None, None, None)


def test_ttft_tpot_itl_e2e_of_one_request() -> None:
    # Sent at 10.0; first token at 10.5 (prefill), then tokens 0.1 s apart, the last gap 0.3 s.
    r = make_record(10.0, [(10.5, 1), (10.6, 1), (10.7, 1), (11.0, 1)])
    assert r.ttft == pytest.approx(0.5)
    # TPOT excludes the first token: (11.0 - 10.5) / 3, not 1.0 / 4.
    assert r.tpot == pytest.approx(0.5 / 3)
    assert r.itls == pytest.approx([0.1, 0.1, 0.3])
    assert r.e2e == pytest.approx(1.0)


def test_chunks_with_several_tokens_and_empty_chunks() -> None:
    # A chunk of 3 tokens counts as 3 output tokens but one arrival; an empty chunk is not an arrival.
    r = make_record(0.0, [(1.0, 1), (1.5, 0), (2.0, 3)])
    assert r.output_tokens == 4
    assert r.chunk_times == [1.0, 2.0]
    assert r.tpot == pytest.approx(1.0 / 3)
    assert r.itls == pytest.approx([1.0])


def test_single_token_request_has_no_tpot_and_end_time_extends_e2e() -> None:
    r = make_record(0.0, [(0.2, 1)])
    r.end_time = 0.25
    assert r.tpot is None and r.itls == []
    assert r.e2e == pytest.approx(0.25)


def test_summarize_throughput_and_failures() -> None:
    records = [make_record(0.0, [(0.5, 1), (1.0, 1), (1.5, 1)], prompt_tokens=8),
               make_record(0.0, [(1.0, 1), (2.0, 1), (3.0, 1)], prompt_tokens=12)]
    failed = RequestRecord(prompt_tokens=5, start_time=0.0, error="HTTP 500: boom")
    result = summarize(records + [failed], duration_s=4.0, backend="tokenmill", concurrency=2)
    assert (result.num_requests, result.completed, result.failed) == (3, 2, 1)
    assert result.errors == ["HTTP 500: boom"]
    assert result.total_input_tokens == 20 and result.total_output_tokens == 6
    assert result.request_throughput == pytest.approx(0.5)
    assert result.output_throughput == pytest.approx(1.5)
    assert result.total_throughput == pytest.approx(26 / 4)
    assert result.ttft_s.mean == pytest.approx(0.75)
    assert result.tpot_s.p50 == pytest.approx(0.75)  # TPOTs 0.5 and 1.0
    # ITL pools the gaps of all requests: 0.5, 0.5, 1.0, 1.0
    assert result.itl_s.mean == pytest.approx(0.75) and result.itl_s.p90 == pytest.approx(1.0)
    assert result.e2e_s.p50 == pytest.approx(2.25)
    assert result.peak_rss_mb > 10


def test_to_dict_is_json_with_the_documented_keys() -> None:
    result = summarize([make_record(0.0, [(0.1, 1), (0.2, 1)])], 1.0, backend="http", concurrency=None,
                       request_rate=math.inf)
    data = json.loads(json.dumps(result.to_dict()))
    for key in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        assert set(data[key]) == {"mean", "p50", "p90", "p99"}
    for key in ("request_throughput", "output_throughput", "total_throughput", "peak_rss_mb"):
        assert isinstance(data[key], float)
    assert data["request_rate"] is None  # infinity is not JSON


def test_summarize_rejects_zero_duration() -> None:
    with pytest.raises(ValueError, match="duration_s"):
        summarize([], 0.0, backend="tokenmill", concurrency=None)
