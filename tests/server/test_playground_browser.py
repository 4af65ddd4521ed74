"""The playground page in headless Chromium against a real `tokenmill serve` on the default model.

Each view is driven like a user would (type, click, wait), its rendering checked against the API,
a screenshot saved under the test's tmp dir (or $TOKENMILL_SCREENSHOTS when set), and the browser
console must stay free of errors.
Needs Debian's chromium (scripts/install_browser.sh installs it; no browser is downloaded):
without it these tests skip.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

CHROMIUM = os.environ.get("TOKENMILL_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
LOAD_TIMEOUT_S = 300  # the model loads in seconds; the test machine's cores are shared
RUN_TIMEOUT_MS = 120_000
EOS_PROMPT = "What is 2+2? Answer with just the number."  # greedy: "2 + 2 = 4<|im_end|>"

if not (os.access(CHROMIUM, os.X_OK) or shutil.which("chromium")):
    pytest.skip(f"chromium not found at {CHROMIUM} (run scripts/install_browser.sh to install Debian's "
                "chromium); skipping the playground browser tests", allow_module_level=True)

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def serve_url(tmp_path_factory) -> Iterator[str]:
    """`tokenmill serve` in a subprocess on a free port, once the model is loaded; besides the model's
    tokenizer it has a small BPE tokenizer.json for the comparison view."""
    from tests.server.test_playground_views import train_bpe

    port = _free_port()
    folder = tmp_path_factory.mktemp("serve")
    log = (folder / "serve.log").open("w")
    cmd = [sys.executable, "-m", "tokenmill", "serve", "--port", str(port), "--max-model-len", "512",
           "--max-num-seqs", "4", "--kv-cache-memory", "0.05", "--seed", "0",
           "--no-compile",  # the page is under test, not the decode: skip compiling graphs for this cache size
           "--playground-tokenizer", str(train_bpe(folder / "tiny-bpe"))]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"tokenmill serve did not become ready (exit code {proc.poll()}); see {log.name}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    executable = CHROMIUM if os.access(CHROMIUM, os.X_OK) else shutil.which("chromium")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield b
        b.close()


def _open(browser, serve_url: str, width: int, height: int) -> tuple[object, object, list[str]]:
    """(context, page, console errors so far) of the playground opened at a viewport of width x height."""
    context = browser.new_context(viewport={"width": width, "height": height})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.goto(serve_url + "/")
    return context, pg, errors


@pytest.fixture
def page(browser, serve_url) -> Iterator[object]:
    """A fresh page on the playground; fails the test if the console logged any error."""
    context, pg, errors = _open(browser, serve_url, 1280, 900)
    yield pg
    context.close()
    assert errors == [], f"console errors: {errors}"


def _shot(pg, tmp_path: Path, name: str) -> Path:
    folder = Path(os.environ.get("TOKENMILL_SCREENSHOTS", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    pg.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000  # a real rendering, not a blank page
    return path


def test_tokenizer_view_renders_tokens_with_ids(page, serve_url, tmp_path):
    page.wait_for_selector("#tok-tokens .tok")  # the sample text is tokenized on load
    assert page.text_content("#model-name") == "smollm2-135m-instruct"
    text = "Hello world, naïve 東京 🦊"
    page.fill("#tok-text", text)
    page.click("#tok-run")
    page.wait_for_function("document.querySelectorAll('#tok-tokens .tok').length === 13")
    expected = httpx.post(f"{serve_url}/v1/tokenize", json={"text": text}, timeout=60).json()
    chips = page.query_selector_all("#tok-tokens .tok")
    assert [int(c.get_attribute("data-id")) for c in chips] == [t["id"] for t in expected["tokens"]]
    assert "id 905" in chips[1].get_attribute("title") and chips[1].text_content() == "·world"
    # The first byte token of " 東" adds no text: shown as its bytes (a space and 0xE6).
    assert chips[5].text_content() == "<20 E6>" and "partial" in chips[5].get_attribute("class")
    assert "13" in page.text_content("#tok-stats")
    page.check("#tok-chat")
    page.wait_for_selector("#tok-tokens .tok.special")
    assert len(page.query_selector_all("#tok-tokens .tok")) > 13
    _shot(page, tmp_path, "tokenizer")


def test_steps_view_shows_candidates_before_and_after_the_controls(page, tmp_path):
    page.click("#tab-steps")
    page.fill("#steps-prompt", EOS_PROMPT)
    page.fill("#steps-temperature", "0")
    page.fill("#steps-max_tokens", "20")
    page.fill("#steps-top_n", "5")
    page.click("#steps-run")
    page.wait_for_selector("#steps-finish:not(:empty)", timeout=RUN_TIMEOUT_MS)
    assert page.text_content("#steps-error") == ""
    assert "end-of-sequence" in page.text_content("#steps-finish")
    assert page.get_attribute("#steps-finish", "data-kind") == "eos"
    chips = [c.text_content() for c in page.query_selector_all("#steps-output .tok")]
    assert "".join(chips[:-1]).replace("·", " ") == "2 + 2 = 4" and chips[-1] == "<|im_end|>"
    rows = page.query_selector_all("#steps-list .step")
    assert len(rows) == len(chips) == 8
    for row in rows:
        raw, after = row.query_selector_all(".dist")
        assert len(raw.query_selector_all(".cand")) == 5
        assert raw.query_selector_all(".cand")[0].get_attribute("class") == "cand chosen"  # greedy = argmax
        assert [c.text_content() for c in after.query_selector_all(".cand .p")] == ["100.0%"]
    metrics = page.text_content("#steps-metrics")
    assert "TTFT" in metrics and "tok/s" in metrics and "–" not in metrics
    page.click("#steps-output .tok >> nth=2")
    assert "selected" in page.get_attribute("#step-2", "class")
    _shot(page, tmp_path, "steps")


def test_steps_view_sampled_run_with_stop_string(page, tmp_path):
    page.click("#tab-steps")
    page.fill("#steps-prompt", "Write a story about a cat.")
    page.fill("#steps-temperature", "0.8")
    page.fill("#steps-top_k", "4")
    page.fill("#steps-max_tokens", "12")
    page.fill("#steps-seed", "0")
    page.fill("#steps-stop", ",")
    page.click("#steps-run")
    page.wait_for_selector("#steps-finish:not(:empty)", timeout=RUN_TIMEOUT_MS)
    # Seed 0 writes "One sunny afternoon," here: the comma ends the run and is cut from the text.
    assert page.get_attribute("#steps-finish", "data-kind") == "stop_string"
    assert '","' in page.text_content("#steps-finish")
    for row in page.query_selector_all("#steps-list .step"):
        after = row.query_selector_all(".dist")[1]
        assert 1 <= len(after.query_selector_all(".cand")) <= 4  # top-k = 4 left at most 4 candidates
        assert after.query_selector(".cand.chosen") is not None  # the sample came from them
    _shot(page, tmp_path, "steps_sampled")


def test_beam_view_draws_the_tree_and_the_ranking(page, tmp_path):
    page.click("#tab-beam")
    page.fill("#beam-num_beams", "3")
    page.fill("#beam-max_tokens", "4")
    page.click("#beam-run")
    page.wait_for_selector("#beam-ranking tr >> nth=3", timeout=RUN_TIMEOUT_MS)
    assert page.text_content("#beam-error") == ""
    assert len(page.query_selector_all("#beam-ranking tr")) == 1 + 3
    page.wait_for_selector("#beam-svg")
    kept = page.query_selector_all("#beam-svg .node.kept")
    assert len(kept) >= 3 * 3  # every step keeps the beams that go on (or finished ones instead)
    assert page.query_selector_all("#beam-svg .node.pruned") or page.query_selector_all("#beam-svg .node.finished")
    assert len(page.query_selector_all("#beam-svg path.edge")) == len(page.query_selector_all("#beam-svg .node")) - 1
    _shot(page, tmp_path, "beam")


def test_compare_view_shows_each_tokenizer_with_its_count(page, serve_url, tmp_path):
    page.click("#tab-compare")
    page.wait_for_selector("#cmp-line-1 .tok")
    text = page.input_value("#cmp-text")
    names = [n.text_content() for n in page.query_selector_all("#cmp-table tr td:first-child")]
    assert names == ["smollm2-135m-instruct", "tiny-bpe"]
    counts = [int(page.get_attribute(f"#cmp-count-{k}", "data-count")) for k in range(2)]
    for name, count in zip(names, counts, strict=True):
        expected = httpx.post(f"{serve_url}/v1/tokenize", json={"text": text, "tokenizer": name}, timeout=60).json()
        assert count == expected["count"]
    assert counts[0] != counts[1]
    for k in range(2):
        # the rows are aligned on the same characters: each spells out the whole text
        shown = "".join(c.text_content() for c in page.query_selector_all(f"#cmp-line-{k} .tok, #cmp-line-{k} .uncovered"))
        assert shown == text.replace(" ", "·")
        # every token is drawn: as a chip, or as a mark when it covers no character of its own (byte pieces)
        assert len(page.query_selector_all(f"#cmp-line-{k} .tok, #cmp-line-{k} .mark")) == counts[k]
        assert page.query_selector_all(f"#cmp-line-{k} .tok.differs")  # the two vocabularies split words apart
    _shot(page, tmp_path, "compare")
    page.fill("#cmp-text", "Hello world")  # typing compares again
    page.wait_for_function("document.querySelector('#cmp-count-0').dataset.count === '2'")


def test_context_view_plots_measured_points_and_kv_bytes_per_token(page, default_model_path, tmp_path):
    from tokenmill.model.gguf import read_gguf

    page.click("#tab-context")
    page.wait_for_selector("#ctx-formula")
    assert "not measured yet" in page.text_content("#ctx-status")
    page.fill("#ctx-points", "5")
    page.fill("#ctx-max", "64")  # short prompts: the test machine's cores are shared
    page.click("#ctx-run")
    page.wait_for_selector("#ctx-decode-plot", timeout=LOAD_TIMEOUT_S * 1000)
    assert page.text_content("#ctx-error") == ""
    assert len(page.query_selector_all("#ctx-prefill-plot .pt")) >= 5
    assert len(page.query_selector_all("#ctx-decode-plot .pt")) >= 5
    assert len(page.query_selector_all("#ctx-table tr.ctx-point")) == 5
    assert "max context 512" in page.text_content("#ctx-kv-plot")
    md = read_gguf(str(default_model_path)).metadata
    layers, kv_heads = md["llama.block_count"], md["llama.attention.head_count_kv"]
    head_dim = md["llama.embedding_length"] // md["llama.attention.head_count"]
    dtype = page.text_content("#ctx-formula").rsplit("(", 1)[1].split(")")[0]  # the cache's dtype, e.g. bfloat16
    element = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    assert int(page.get_attribute("#ctx-kv", "data-bytes-per-token")) == 2 * layers * kv_heads * head_dim * element
    _shot(page, tmp_path, "context")


def test_live_view_counts_running_streams_up_and_back_to_zero(page, serve_url, tmp_path):
    page.click("#tab-live")
    page.wait_for_function("document.querySelector('#live-running').textContent === '0'")
    body = {"prompt": "Count from one to one hundred:", "max_tokens": 200, "ignore_eos": True, "temperature": 0}
    threads = [threading.Thread(target=httpx.post, args=(f"{serve_url}/v1/completions",),
                                kwargs={"json": body, "timeout": LOAD_TIMEOUT_S}) for _ in range(4)]
    for t in threads:
        t.start()
    page.wait_for_function("document.querySelector('#live-running').textContent === '4'", timeout=RUN_TIMEOUT_MS)
    _shot(page, tmp_path, "live_running")
    for t in threads:
        t.join()
    page.wait_for_function("document.querySelector('#live-running').textContent === '0'", timeout=30_000)
    page.wait_for_function("document.querySelector('#live-tpot').textContent.startsWith('–') === false")
    assert page.query_selector("#live-chart-requests polyline") is not None
    _shot(page, tmp_path, "live")


def test_every_view_fits_a_phone_and_the_tabs_follow_the_keyboard(browser, serve_url, tmp_path):
    context, pg, errors = _open(browser, serve_url, 390, 844)
    pg.wait_for_selector("#tok-tokens .tok")
    pg.focus("#tab-tokenizer")
    for view in ["compare", "steps", "beam", "context", "live"]:
        pg.keyboard.press("ArrowRight")  # the next tab gets focus and shows its view
        assert pg.evaluate("document.activeElement.id") == f"tab-{view}"
        assert pg.is_visible(f"#view-{view}") and pg.get_attribute(f"#tab-{view}", "aria-selected") == "true"
        pg.wait_for_timeout(300)
        # nothing wider than the phone: the page never scrolls sideways
        assert pg.evaluate("document.documentElement.scrollWidth") <= 390, view
        _shot(pg, tmp_path, f"phone_{view}")
    context.close()
    assert errors == [], f"console errors: {errors}"
