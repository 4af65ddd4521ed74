"""Benchmark prompts, the --json schema, the text tables and the PNG plots (model-free)."""

from __future__ import annotations

import argparse
import json
import struct
from pathlib import Path

import pytest

from tokenmill.bench.dataset import PROSE_PATH, BenchPrompt, load_jsonl_prompts, synthetic_prompts
from tokenmill.bench.main import parse_concurrency
from tokenmill.bench.metrics import RequestRecord, summarize
from tokenmill.bench.report import dumps, format_sweep, format_table, plot, to_json
from tokenmill.bench.serving import arrival_delays

JSON_KEYS = {"ttft_s", "tpot_s", "itl_s", "e2e_s", "request_throughput", "output_throughput",
             "total_throughput", "peak_rss_mb"}


class ByteTokenizer:
    """UTF-8 bytes as token ids: enough to check how prompts are cut."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def fake_result(backend: str, concurrency: int | None, step: float):
    records = []
    for i in range(4):
        r = RequestRecord(prompt_tokens=32, start_time=0.0)
        for k in range(8):
            r.add_chunk(0.1 * (i + 1) + step * k, 1)
        records.append(r)
    return summarize(records, duration_s=1.0 + 8 * step, backend=backend, concurrency=concurrency)


def test_shipped_prose_is_real_text() -> None:
    text = PROSE_PATH.read_text(encoding="utf-8")
    assert len(text) > 4000 and text.count(". ") > 40


def test_synthetic_prompts_have_the_exact_length_and_are_seeded() -> None:
    tok = ByteTokenizer()
    prompts = synthetic_prompts(tok, 5, 64, 8, seed=3)
    assert [len(p.token_ids) for p in prompts] == [64] * 5
    assert all(p.output_len == 8 for p in prompts)
    prose = PROSE_PATH.read_text(encoding="utf-8")
    assert all(p.text in prose + prose for p in prompts)  # windows of the real text, possibly wrapping
    assert [p.token_ids for p in synthetic_prompts(tok, 5, 64, 8, seed=3)] == [p.token_ids for p in prompts]
    assert [p.token_ids for p in synthetic_prompts(tok, 5, 64, 8, seed=4)] != [p.token_ids for p in prompts]
    # Longer than the whole corpus: the window wraps around.
    long = synthetic_prompts(tok, 1, 3 * PROSE_PATH.stat().st_size, 1)
    assert len(long[0].token_ids) == 3 * PROSE_PATH.stat().st_size


def test_synthetic_prompts_reject_bad_lengths() -> None:
    with pytest.raises(ValueError, match="input_len must be an integer >= 1"):
        synthetic_prompts(ByteTokenizer(), 2, 0, 8)
    with pytest.raises(ValueError, match="shared_prefix_len must be an integer >= 0"):
        synthetic_prompts(ByteTokenizer(), 2, 8, 8, shared_prefix_len=-1)


def test_shared_prefix_prompts_share_exactly_the_first_n_tokens() -> None:
    tok = ByteTokenizer()
    prompts = synthetic_prompts(tok, 6, 40, 8, seed=5, shared_prefix_len=100)
    assert [len(p.token_ids) for p in prompts] == [140] * 6
    prefix = prompts[0].token_ids[:100]
    assert all(p.token_ids[:100] == prefix for p in prompts)
    # The tails are each prompt's own: no two prompts share their 101st token onwards.
    tails = [p.token_ids[100:] for p in prompts]
    assert len({tuple(t) for t in tails}) == 6
    prose = PROSE_PATH.read_text(encoding="utf-8")
    assert bytes(prefix).decode() in prose + prose and all(bytes(t).decode() in prose + prose for t in tails)
    assert all(p.text == tok.decode(p.token_ids) for p in prompts)
    # Without a shared prefix the prompts are the ones earlier versions sent for the same seed.
    assert synthetic_prompts(tok, 3, 40, 8, seed=5, shared_prefix_len=0) == synthetic_prompts(tok, 3, 40, 8, seed=5)


def test_jsonl_dataset(tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "Hello there"}\n\n{"prompt": "Why?", "output_len": 3}\n')
    prompts = load_jsonl_prompts(path, ByteTokenizer(), 3, 16)
    assert [(p.text, p.output_len) for p in prompts] == [("Hello there", 16), ("Why?", 3), ("Hello there", 16)]
    assert prompts[1].token_ids == list(b"Why?")


@pytest.mark.parametrize("line, match", [
    ("not json", "line 1: not valid JSON"),
    ('{"text": "x"}', 'line 1: expected an object with a non-empty string "prompt"'),
    ('{"prompt": "x", "output_len": 0}', "line 1: output_len must be an integer >= 1"),
])
def test_jsonl_dataset_errors_name_the_line(tmp_path: Path, line: str, match: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=match):
        load_jsonl_prompts(path, ByteTokenizer(), 1, 4)


def test_parse_concurrency() -> None:
    assert parse_concurrency(None) == [None]
    assert parse_concurrency("8") == [8]
    assert parse_concurrency("1,4, 16,32") == [1, 4, 16, 32]
    for bad in ("0", "1,x", "-2"):
        with pytest.raises(ValueError, match="--concurrency"):
            parse_concurrency(bad)


def test_poisson_arrivals() -> None:
    assert arrival_delays(3, float("inf")) == [0.0, 0.0, 0.0]
    delays = arrival_delays(2000, 10.0, seed=1)
    assert delays == sorted(delays) and delays[0] == 0.0
    mean_gap = delays[-1] / (len(delays) - 1)
    assert 0.09 < mean_gap < 0.11  # exponential gaps of mean 1/rate
    assert delays == arrival_delays(2000, 10.0, seed=1)
    with pytest.raises(ValueError, match="request_rate"):
        arrival_delays(1, 0.0)


def test_json_single_compare_and_sweep() -> None:
    ours, theirs = fake_result("tokenmill", 4, 0.05), fake_result("transformers", 4, 0.1)
    single = json.loads(dumps(to_json([ours])))
    assert JSON_KEYS <= set(single)
    compared = json.loads(dumps(to_json([ours], [theirs])))
    assert JSON_KEYS <= set(compared) and JSON_KEYS <= set(compared["compare"]["transformers"])
    assert compared["compare"]["ratios"]["tpot_p50"] == pytest.approx(0.5)
    assert compared["compare"]["ratios"]["output_throughput"] == pytest.approx(theirs.duration_s / ours.duration_s)
    sweep = json.loads(dumps(to_json([fake_result("tokenmill", c, 0.05) for c in (1, 4)])))
    assert [entry["concurrency"] for entry in sweep["sweep"]] == [1, 4]


def test_text_tables() -> None:
    ours, theirs = fake_result("tokenmill", 4, 0.05), fake_result("transformers", 4, 0.1)
    table = format_table(ours)
    assert "TTFT p50 (ms)" in table and "output tokens/s" in table and "peak RSS" in table
    side = format_table(ours, theirs)
    tpot_line = next(line for line in side.splitlines() if line.startswith("TPOT p50"))
    assert tpot_line.split()[-3:] == ["50.00", "100.00", "0.50x"]
    assert "tokenmill/transformers" in side
    sweep = format_sweep([fake_result("tokenmill", c, 0.05) for c in (1, 4)])
    assert len(sweep.splitlines()) == 4


def cached_result(cached: list[int | None]):
    """Four requests of 32 prompt tokens; ``cached`` is what each reported as served from the prefix cache."""
    records = []
    for i, hit in enumerate(cached):
        r = RequestRecord(prompt_tokens=32, start_time=0.0, cached_tokens=hit)
        r.add_chunk(0.1 * (i + 1), 1)
        r.add_chunk(0.1 * (i + 1) + 0.05, 1)
        records.append(r)
    return summarize(records, duration_s=1.0, backend="tokenmill", concurrency=None)


def test_prefix_cache_hit_rate_is_summed_over_requests_and_rendered() -> None:
    result = cached_result([0, 16, 32, 16])
    assert (result.cached_input_tokens, result.total_input_tokens) == (64, 128)
    assert result.prefix_cache_hit_rate == pytest.approx(0.5)
    data = json.loads(dumps(to_json([result])))
    assert (data["cached_input_tokens"], data["prefix_cache_hit_rate"]) == (64, 0.5)
    table = format_table(result)
    assert "prefix cache: 64 of 128 input tokens cached (50.0%)" in table
    assert next(line for line in table.splitlines() if line.startswith("prefix cache hit rate")).split()[-1] == "50.0"
    # Next to a backend without a prefix cache (transformers) the row shows "-".
    side = format_table(result, fake_result("transformers", None, 0.1))
    assert next(line for line in side.splitlines() if line.startswith("prefix cache hit rate")).split()[-3:] == [
        "50.0", "-", "-"]
    sweep = format_sweep([result, cached_result([32, 32, 32, 32])]).splitlines()
    assert "cache hit %" in sweep[1]
    assert [line.split()[-1] for line in sweep[2:]] == ["50.0", "100.0"]


def test_hit_rate_is_unknown_when_no_request_reports_cached_tokens() -> None:
    result = cached_result([None, None, None, None])  # e.g. a server without prompt_tokens_details
    assert result.cached_input_tokens is None and result.prefix_cache_hit_rate is None
    assert json.loads(dumps(to_json([result])))["prefix_cache_hit_rate"] is None
    assert "prefix cache" not in format_table(result)
    assert "cache hit" not in format_sweep([result, result])
    partial = cached_result([None, 32, None, None])  # the requests that said nothing count as misses
    assert partial.prefix_cache_hit_rate == pytest.approx(0.25)


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plots_are_valid_pngs(tmp_path: Path) -> None:
    import matplotlib.image

    single = tmp_path / "single.png"
    plot([fake_result("tokenmill", None, 0.05)], single, [fake_result("transformers", None, 0.1)])
    sweep = tmp_path / "sweep.png"
    plot([fake_result("tokenmill", c, 0.01 * c) for c in (1, 4, 16, 32)], sweep)
    for path in (single, sweep):
        width, height = _png_size(path)
        assert width > 400 and height > 200
        assert matplotlib.image.imread(path).shape[:2] == (height, width)


def test_plot_title_names_the_run_and_throughput_bars_carry_their_numbers() -> None:
    import matplotlib.pyplot as plt

    from tokenmill.bench.main import add_bench_arguments, plot_title
    from tokenmill.bench.report import figure
    from tokenmill.cli import add_engine_arguments

    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    add_bench_arguments(parser)
    args = parser.parse_args(["--quantization", "int4", "--input-len", "64", "--output-len", "32"])
    title = plot_title(args, [1, 8])
    assert title == ("smollm2-135m-instruct | quantization int4, auto | concurrency 1, 8 | "
                     "input 64 / output 32 tokens | 32 requests")
    ours, theirs = fake_result("tokenmill", None, 0.05), fake_result("transformers", None, 0.1)
    fig = figure([ours], [theirs], title=title)
    assert fig.get_suptitle() == title
    assert [t.get_text() for t in fig.axes[1].texts] == [f"{r.output_throughput:.1f}" for r in (ours, theirs)]
    plt.close(fig)


def test_progress_moves_with_tokens() -> None:
    from tokenmill.bench.progress import TokenProgress

    prompts = [BenchPrompt(text="", token_ids=[1], output_len=n) for n in (5, 7)]
    progress = TokenProgress(prompts, "bench")  # draws on stderr (captured)
    progress.add_tokens(3)
    progress.add_tokens(0)
    progress.request_done()
    assert (progress.bar.n, progress.bar.total, progress.num_done) == (3, 12, 1)


def test_sse_lines_fill_the_record() -> None:
    from tokenmill.bench.serving import _handle_line

    record = RequestRecord(prompt_tokens=3, start_time=0.0)
    chunk = {"choices": [{"index": 0, "text": "Hi"}]}
    assert _handle_line("data: " + json.dumps(chunk), record) is None
    assert _handle_line(": keep-alive comment", record) is None
    assert _handle_line('data: {"choices": [{"index": 0, "text": ""}]}', record) is None  # no new text
    usage = {"prompt_tokens": 3, "completion_tokens": 2}
    assert _handle_line("data: " + json.dumps({"choices": [], "usage": usage}), record) == usage
    assert _handle_line("data: [DONE]", record) is None
    assert len(record.chunk_times) == 1 and record.error is None
    _handle_line('data: {"error": {"message": "queue full"}}', record)
    assert record.error == "queue full"
    _handle_line("data: {oops", record)
    assert record.error.startswith("not a JSON event")
