"""The endpoints behind the playground's comparison, context and live views, on a tiny random model
served in a thread with extra ``--playground-tokenizer`` files (a trained BPE tokenizer.json, an HF
folder, and a llama.cpp vocabulary GGUF when `make test` fetched them)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import tokenizers
import torch

from tests.model.test_vocab_vectors import VOCAB_DIR
from tokenmill.config import EngineConfig
from tokenmill.model.tokenizer import Tokenizer
from tokenmill.server.app import create_app
from tokenmill.server.playground_context import calibration_lengths
from tokenmill.server.playground_live import quantile
from tokenmill.server.playground_tokenizers import load_tokenizer_file

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "The quick brown fox jumps over the lazy dog. Tokenizers disagree: 12345, naïve"
CORPUS = ["the quick brown fox", "jumps over the lazy dog", "a tokenizer splits text into tokens"] * 20


def train_bpe(folder: Path, vocab_size: int = 300) -> Path:
    """A small byte-level BPE trained on CORPUS, saved as folder/tokenizer.json (deterministic)."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


@pytest.fixture(scope="module")
def paths(tmp_path_factory, tiny_hf_model) -> dict[str, Path]:
    out = {"tiny-bpe": train_bpe(tmp_path_factory.mktemp("tok") / "tiny-bpe"), "hf": tiny_hf_model()}
    gguf = VOCAB_DIR / "ggml-vocab-llama-spm.gguf"
    if gguf.is_file():
        out["ggml-vocab-llama-spm"] = gguf
    return out


@pytest.fixture(scope="module")
def views_server(tiny_hf_model, paths):
    from tests.server.conftest import serve_in_thread, wait_until_ready

    config = EngineConfig(model=str(tiny_hf_model()), dtype="float32", max_model_len=256, max_num_seqs=4,
                          kv_cache_memory_gb=0.01)
    running = wait_until_ready(serve_in_thread(create_app(
        config, playground_tokenizers=[str(p) for p in paths.values()])))
    yield running
    running.stop()


def get(server, path: str, **params) -> httpx.Response:
    return httpx.get(f"{server.url}{path}", params=params, timeout=120)


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=300)


# ---- tokenizers side by side ----------------------------------------------------------------------


def test_every_tokenizer_is_listed_and_tokenizes_like_its_file(views_server, paths):
    listed = get(views_server, "/v1/playground/tokenizers").json()["tokenizers"]
    model = views_server.app.state.tokenmill.served_names[0]
    names = [t["name"] for t in listed]
    # the model first, then the files in order; the HF folder is named after the folder, which is also the
    # served model's name here: a number keeps the names distinct
    assert model == paths["hf"].name
    assert names == [model, "tiny-bpe", f"{model} (2)", *(["ggml-vocab-llama-spm"] if len(paths) > 2 else [])]
    assert listed[0]["kind"] == "model" and listed[1]["kind"] == "tokenizer.json" and listed[2]["kind"] == "hf folder"
    counts = {}
    for entry, path in zip(listed, [None, *paths.values()], strict=True):
        data = post(views_server, "/v1/tokenize", {"text": TEXT, "tokenizer": entry["name"]}).json()
        reference = views_server.engine.info.tokenizer if path is None else load_tokenizer_file(str(path))[1]
        ids = reference.encode(TEXT)
        assert [t["id"] for t in data["tokens"]] == ids and data["count"] == len(ids)
        assert entry["vocab_size"] == reference.vocab_size
        counts[entry["name"]] = data["count"]
    assert counts["tiny-bpe"] != counts[model]  # a different vocabulary splits the same text differently
    by_model = post(views_server, "/v1/tokenize", {"text": TEXT, "model": model}).json()
    assert by_model["count"] == counts[model] == counts[f"{model} (2)"]  # the tiny model has SmolLM2's vocab


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"text": "hi", "tokenizer": "nope"}, 404, "tokenizer"),
    ({"text": "hi", "tokenizer": "tiny-bpe", "model": "x"}, 400, "tokenizer"),
    ({"text": "hi", "tokenizer": "tiny-bpe", "chat_template": True}, 400, "chat_template"),
])
def test_bad_tokenizer_requests_name_the_field(views_server, body, status, param):
    r = post(views_server, "/v1/tokenize", body)
    assert r.status_code == status and r.json()["error"]["param"] == param, r.text


def test_a_bad_playground_tokenizer_path_is_rejected(tmp_path):
    (tmp_path / "notes.txt").write_text("not a tokenizer")
    for path, message in ((tmp_path / "missing.json", "no such file"), (tmp_path, "has no tokenizer.json"),
                          (tmp_path / "notes.txt", "not a GGUF file")):
        with pytest.raises(ValueError, match=message):
            create_app(EngineConfig(), playground_tokenizers=[str(path)])
    r = subprocess.run([sys.executable, "-m", "tokenmill", "serve", "--playground-tokenizer", str(tmp_path / "x.gguf")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("tokenmill: error: --playground-tokenizer")


def test_a_tokenizer_json_of_another_name_loads_without_its_config(tmp_path):
    path = train_bpe(tmp_path / "a")
    other = path.rename(tmp_path / "bpe-only.json")
    kind, tok = load_tokenizer_file(str(other))
    assert kind == "tokenizer.json" and isinstance(tok, Tokenizer) and tok.encode("the fox")


# ---- context length -------------------------------------------------------------------------------


def test_context_reports_kv_bytes_per_token_from_the_cache_and_measures_points(views_server):
    info = views_server.engine.info
    static = get(views_server, "/v1/playground/context").json()
    kv = static["kv"]
    element = torch.empty((), dtype=getattr(torch, kv["dtype"])).element_size()
    # the tiny model: 2 layers, 2 KV heads of 64 / 4 = 16 dims
    assert (kv["num_layers"], kv["num_kv_heads"], kv["head_dim"]) == (2, 2, 16)
    assert kv["bytes_per_token"] == 2 * 2 * 2 * 16 * element == info.kv_cache_bytes // (info.num_blocks * info.block_size)
    cap = static["capacity"]
    assert cap["tokens"] == info.num_blocks * info.block_size and static["max_model_len"] == 256
    assert cap["full_context_requests"] == info.num_blocks // (256 // info.block_size)
    assert static["calibration"] is None

    body = {"points": 5, "max_context_len": 128}
    data = post(views_server, "/v1/playground/context", body).json()
    points = data["calibration"]["points"]
    assert [p["context_len"] for p in points] == calibration_lengths(128, 5)
    assert all(p["prefill_s"] > 0 and p["decode_s_per_token"] > 0 for p in points)
    assert all(p["kv_bytes"] == p["context_len"] * kv["bytes_per_token"] for p in points)
    assert get(views_server, "/v1/playground/context").json()["calibration"] == data["calibration"]  # cached
    again = post(views_server, "/v1/playground/context", body).json()
    assert again["calibration"]["measured_at"] == data["calibration"]["measured_at"]
    fresh = post(views_server, "/v1/playground/context", {**body, "refresh": True}).json()
    assert fresh["calibration"]["measured_at"] > data["calibration"]["measured_at"]


@pytest.mark.parametrize(("body", "param"), [({"points": 1}, "points"), ({"max_context_len": 3}, "max_context_len"),
                                             ({"refresh": "yes"}, "refresh")])
def test_bad_calibration_settings_are_400(views_server, body, param):
    r = post(views_server, "/v1/playground/context", body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_calibration_lengths_are_distinct_and_span_the_range():
    assert calibration_lengths(2048, 6) == [16, 42, 111, 294, 776, 2048]
    assert calibration_lengths(20, 5) == [16, 17, 18, 19, 20]
    assert len(calibration_lengths(503, 6)) == 6


# ---- live panel -----------------------------------------------------------------------------------


def test_live_counts_running_requests_tokens_per_second_and_latencies(views_server):
    first = get(views_server, "/v1/playground/live").json()
    assert first["current"]["running"] == 0 and first["current"]["kv_total"] == views_server.engine.info.num_blocks
    seen: list[int] = []
    body = {"prompt": "one two three", "max_tokens": 200, "ignore_eos": True, "temperature": 0}
    threads = [threading.Thread(target=post, args=(views_server, "/v1/completions", body)) for _ in range(4)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        seen.append(get(views_server, "/v1/playground/live").json()["current"]["running"])
        time.sleep(0.1)
    time.sleep(0.6)  # past MIN_INTERVAL_S: this call records a sample
    last = get(views_server, "/v1/playground/live").json()
    assert max(seen) >= 2 and last["current"]["running"] == 0
    cur = last["current"]
    assert cur["kv_used"] == 0 and cur["kv_free"] + cur["kv_cached"] == cur["kv_total"]
    history = last["history"]
    assert all(b["t"] - a["t"] >= 0.5 for a, b in zip(history, history[1:], strict=False))
    assert max(p["tokens_per_s"] or 0 for p in history) > 0
    newer = get(views_server, "/v1/playground/live", since=history[-2]["t"]).json()["history"]
    assert newer[0] == history[-1] and len(newer) <= 2  # a poller gets only what is new
    assert last["current"]["ttft_p50"] is not None and last["current"]["tpot_p90"] >= last["current"]["tpot_p50"] > 0
    assert last["current"]["finished_in_window"] >= 4


def test_quantile_interpolates_inside_buckets_like_prometheus():
    bounds = [0.1, 0.2, 0.4, float("inf")]
    assert quantile(0.5, bounds, [0, 0, 0, 0]) is None
    assert quantile(0.5, bounds, [2, 4, 4, 4]) == pytest.approx(0.1)  # rank 2 at the top of the first bucket
    assert quantile(0.75, bounds, [2, 4, 4, 4]) == pytest.approx(0.15)  # halfway through (0.1, 0.2]
    assert quantile(0.99, bounds, [0, 0, 1, 2]) == pytest.approx(0.4)  # in +Inf: the highest finite bound
