"""Benchmark output: a text table, a JSON object, and PNG plots (matplotlib, Agg backend)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tokenmill.bench.metrics import BenchResult, LatencyStats

LATENCIES = (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("itl_s", "ITL"), ("e2e_s", "E2E latency"))
THROUGHPUTS = (("request_throughput", "requests/s", 2), ("output_throughput", "output tokens/s", 1),
               ("total_throughput", "total tokens/s", 1))


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.2f}"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}x"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}"


def _label(result: BenchResult) -> str:
    return f"{result.backend} (c={result.concurrency or 'all'})"


def _rows(result: BenchResult) -> list[tuple[str, float | None, str]]:
    """(label, raw value, formatted) rows of one result, latencies in ms."""
    rows: list[tuple[str, float | None, str]] = []
    for key, name in LATENCIES:
        stats: LatencyStats = getattr(result, key)
        for stat in ("mean", "p50", "p90", "p99"):
            value = getattr(stats, stat)
            rows.append((f"{name} {stat} (ms)", value, _ms(value)))
    for key, name, digits in THROUGHPUTS:
        value = getattr(result, key)
        rows.append((name, value, f"{value:.{digits}f}"))
    if result.prefix_cache_hit_rate is not None:
        rows.append(("prefix cache hit rate (%)", result.prefix_cache_hit_rate * 100,
                     _pct(result.prefix_cache_hit_rate)))
    spec = result.spec_decode
    if spec is not None:
        rows.append(("draft acceptance rate (%)", None if spec.acceptance_rate is None else spec.acceptance_rate * 100,
                     _pct(spec.acceptance_rate)))
        rows.append(("mean accepted length (tokens)", spec.mean_accepted_length,
                     "-" if spec.mean_accepted_length is None else f"{spec.mean_accepted_length:.2f}"))
    rows.append(("peak RSS (MiB)", result.peak_rss_mb, f"{result.peak_rss_mb:.0f}"))
    if result.peak_gpu_memory_mb is not None:
        rows.append(("peak GPU memory (MiB)", result.peak_gpu_memory_mb, f"{result.peak_gpu_memory_mb:.0f}"))
    return rows


def _header(result: BenchResult) -> list[str]:
    rate = "inf" if math.isinf(result.request_rate) else f"{result.request_rate:g}/s"
    lines = [f"{_label(result)}: {result.completed}/{result.num_requests} requests in {result.duration_s:.2f} s, "
             f"request rate {rate}, {result.total_input_tokens} input + {result.total_output_tokens} output tokens"]
    if result.kv_cache:
        kv = result.kv_cache
        size = f", {kv['size_mb']:.1f} MiB" if "size_mb" in kv else ""
        kind = f"{kv['dtype']}, {kv['bytes_per_token']} bytes/token, " if "bytes_per_token" in kv else ""
        fit = (f"; {kv['max_len_requests_fit']} concurrent request(s) of {kv['max_model_len']} tokens fit"
               if "max_len_requests_fit" in kv else "")
        lines.append(f"KV cache: {kind}{kv['tokens']} tokens ({kv['blocks']} blocks of {kv['block_size']}){size}{fit}")
    if result.cached_input_tokens is not None:
        lines.append(f"prefix cache: {result.cached_input_tokens} of {result.total_input_tokens} input tokens "
                     f"cached ({_pct(result.prefix_cache_hit_rate)}%)")
    if result.spec_decode is not None:
        spec = result.spec_decode
        lines.append(f"speculative decoding: {spec.accepted_tokens} of {spec.draft_tokens} draft tokens accepted "
                     f"({_pct(spec.acceptance_rate)}%) in {spec.num_drafts} verifications")
    if result.failed:
        lines.append(f"{result.failed} requests failed; first errors: {result.errors}")
    return lines


def format_table(result: BenchResult, other: BenchResult | None = None) -> str:
    """A two-column metric table; with ``other``, a third column and the ratio result/other."""
    lines = _header(result) + (_header(other) if other else [])
    rows = _rows(result)
    if other is None:
        width = max(len(r[0]) for r in rows)
        lines += [f"{name:<{width}}  {text:>12}" for name, _, text in rows]
        return "\n".join(lines)
    other_rows = {name: (value, text) for name, value, text in _rows(other)}
    width = max(len(r[0]) for r in rows)
    ratio_head = f"{result.backend}/{other.backend}"
    rw = len(ratio_head)
    lines.append(f"{'metric':<{width}}  {result.backend:>12}  {other.backend:>12}  {ratio_head:>{rw}}")
    for name, value, text in rows:
        o_value, o_text = other_rows.get(name, (None, "-"))
        lines.append(f"{name:<{width}}  {text:>12}  {o_text:>12}  {_ratio(value, o_value):>{rw}}")
    return "\n".join(lines)


def format_sweep(results: list[BenchResult], others: list[BenchResult] | None = None) -> str:
    """One row per concurrency level: throughput and the median latencies (and the comparison's)."""
    head = f"{'concurrency':>11}  {'req/s':>7}  {'out tok/s':>9}  {'TTFT p50 ms':>11}  {'TPOT p50 ms':>11}  {'ITL p50 ms':>10}"
    hit_rates = any(r.prefix_cache_hit_rate is not None for r in results)
    if hit_rates:
        head += f"  {'cache hit %':>11}"
    if others:
        head += f"  {others[0].backend + ' out tok/s':>24}  {'ratio':>6}"
    lines = [f"{results[0].backend} concurrency sweep", head]
    for i, r in enumerate(results):
        line = (f"{r.concurrency or 'all'!s:>11}  {r.request_throughput:>7.2f}  {r.output_throughput:>9.1f}  "
                f"{_ms(r.ttft_s.p50):>11}  {_ms(r.tpot_s.p50):>11}  {_ms(r.itl_s.p50):>10}")
        if hit_rates:
            line += f"  {_pct(r.prefix_cache_hit_rate):>11}"
        if others:
            o = others[i]
            line += f"  {o.output_throughput:>24.1f}  {_ratio(r.output_throughput, o.output_throughput):>6}"
        lines.append(line)
    return "\n".join(lines)


def to_json(results: list[BenchResult], others: list[BenchResult] | None = None) -> dict[str, Any]:
    """The ``--json`` object. One run: its metrics at the top level (ttft_s, tpot_s, itl_s, e2e_s,
    request_throughput, output_throughput, total_throughput, peak_rss_mb, cached_input_tokens,
    prefix_cache_hit_rate, ...), plus
    ``compare`` (the transformers run and the ratios) when there is one. A sweep: ``{"sweep": [...]}``,
    each entry shaped like one run."""
    entries = []
    for i, result in enumerate(results):
        entry = result.to_dict()
        if others:
            other = others[i]
            entry["compare"] = {other.backend: other.to_dict(), "ratios": ratios(result, other)}
        entries.append(entry)
    return entries[0] if len(entries) == 1 else {"sweep": entries}


def ratios(result: BenchResult, other: BenchResult) -> dict[str, float | None]:
    """result / other for the headline numbers (above 1: result is slower for latencies, faster for throughput)."""
    pairs = {"ttft_p50": (result.ttft_s.p50, other.ttft_s.p50), "tpot_p50": (result.tpot_s.p50, other.tpot_s.p50),
             "e2e_p50": (result.e2e_s.p50, other.e2e_s.p50),
             "output_throughput": (result.output_throughput, other.output_throughput),
             "total_throughput": (result.total_throughput, other.total_throughput)}
    return {k: (a / b if a is not None and b else None) for k, (a, b) in pairs.items()}


def dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj, indent=2)


def plot(results: list[BenchResult], path: str | Path, others: list[BenchResult] | None = None,
         title: str | None = None) -> None:
    """Write a PNG: latency percentiles and throughput for one run, or throughput and TPOT
    against concurrency for a sweep. ``others`` (transformers) are drawn alongside; ``title``
    (what was measured: model, quantization, concurrency, lengths) heads the figure."""
    import matplotlib.pyplot as plt

    fig = figure(results, others, title)
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def figure(results: list[BenchResult], others: list[BenchResult] | None = None, title: str | None = None) -> Any:
    """The matplotlib Figure that ``plot`` writes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    if len(results) == 1:
        _plot_single(left, right, results[0], others[0] if others else None)
    else:
        _plot_sweep(left, right, results, others)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def _plot_single(left: Any, right: Any, result: BenchResult, other: BenchResult | None) -> None:
    import matplotlib

    runs = [result] + ([other] if other else [])
    names = [name for _, name in LATENCIES]
    width = 0.8 / (3 * len(runs))
    for j, run in enumerate(runs):
        shades = matplotlib.colormaps[("Blues", "Oranges")[j]]
        for k, stat in enumerate(("p50", "p90", "p99")):
            values = [(getattr(getattr(run, key), stat) or 0.0) * 1000 for key, _ in LATENCIES]
            xs = [i + (j * 3 + k) * width - 0.4 for i in range(len(names))]
            left.bar(xs, values, width, align="edge", color=shades(0.45 + 0.2 * k), label=f"{run.backend} {stat}")
    left.set_xticks(range(len(names)), names)
    left.set_yscale("log")
    left.set_ylabel("ms (log scale)")
    left.set_title("latency percentiles")
    left.legend(fontsize=7)
    labels = [run.backend for run in runs]
    bars = right.bar(labels, [run.output_throughput for run in runs], color=["tab:blue", "tab:orange"][:len(runs)])
    right.bar_label(bars, fmt="%.1f")
    right.set_ylabel("output tokens/s")
    right.set_title(f"throughput (concurrency {result.concurrency or 'all'})")


def _plot_sweep(left: Any, right: Any, results: list[BenchResult], others: list[BenchResult] | None) -> None:
    n_total = results[0].num_requests
    levels = [r.concurrency or n_total for r in results]
    for runs, color in zip([results] + ([others] if others else []), ("tab:blue", "tab:orange"), strict=False):
        name = runs[0].backend
        left.plot(levels, [r.output_throughput for r in runs], marker="o", color=color, label=name)
        for level, run in zip(levels, runs, strict=False):  # each point's value, as on the single run's bars
            left.annotate(f"{run.output_throughput:.1f}", (level, run.output_throughput), textcoords="offset points",
                          xytext=(0, 6), ha="center", fontsize=7, color=color)
        right.plot(levels, [(r.tpot_s.p50 or 0.0) * 1000 for r in runs], marker="o", color=color, label=f"{name} p50")
        right.plot(levels, [(r.tpot_s.p90 or 0.0) * 1000 for r in runs], marker="x", linestyle="--", color=color,
                   label=f"{name} p90")
    for ax, title, ylabel in ((left, "throughput", "output tokens/s"), (right, "time per output token", "ms")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(level) for level in levels])
        ax.minorticks_off()
        ax.set_xlabel("concurrency (requests in flight)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
