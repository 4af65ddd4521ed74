"""`tokenmill bench` with speculative decoding: acceptance rate and mean accepted length, and the
shipped input-grounded / open-ended datasets."""

from __future__ import annotations

import json

import pytest

from tokenmill.bench.dataset import SHIPPED_DATASETS, load_jsonl_prompts
from tokenmill.bench.metrics import SpecDecodeStats
from tokenmill.cli import main


def test_spec_decode_stats():
    stats = SpecDecodeStats.of(num_drafts=10, draft_tokens=40, accepted_tokens=30)
    assert stats.acceptance_rate == 0.75 and stats.mean_accepted_length == 4.0
    assert SpecDecodeStats.of(0, 0, 0).acceptance_rate is None


@pytest.mark.parametrize("name", SHIPPED_DATASETS)
def test_shipped_datasets_are_chat_prompts(name, default_model_path):
    from tokenmill.model.gguf import read_gguf, tokenizer_from_gguf

    tokenizer = tokenizer_from_gguf(read_gguf(str(default_model_path)))
    prompts = load_jsonl_prompts(name, tokenizer, 16, 64)
    assert len({p.text for p in prompts}) == 16
    assert all(p.text.startswith("<|im_start|>") and p.text.endswith("<|im_start|>assistant\n") for p in prompts)
    assert all(p.token_ids == tokenizer.encode(p.text, add_special_tokens=False) for p in prompts)


def test_bench_reports_the_acceptance_rate(tiny_hf_model, capsys):
    model = str(tiny_hf_model())
    args = ["bench", "--model", model, "--dtype", "float32", "--num-prompts", "2", "--input-len", "24",
            "--output-len", "24", "--concurrency", "1", "--no-progress",
            "--speculative-config", '{"method": "ngram", "prompt_lookup_min": 1}']
    assert main(args + ["--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    spec = data["spec_decode"]
    assert spec["draft_tokens"] > 0 and 0 <= spec["accepted_tokens"] <= spec["draft_tokens"]
    assert spec["acceptance_rate"] == pytest.approx(spec["accepted_tokens"] / spec["draft_tokens"])
    assert data["total_output_tokens"] == 48
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "draft acceptance rate (%)" in table and "mean accepted length" in table


def test_bench_without_speculation_reports_none(tiny_hf_model, capsys):
    assert main(["bench", "--model", str(tiny_hf_model()), "--dtype", "float32", "--num-prompts", "1",
                 "--input-len", "8", "--output-len", "4", "--no-progress", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["spec_decode"] is None
