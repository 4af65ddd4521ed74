"""llama.cpp's own tokenizer test vectors: every vocabulary of a type we support encodes every case exactly
as llama.cpp does (tests/test-tokenizer-0.cpp: no BOS, special tokens not parsed).

The vectors (``ggml-vocab-*.gguf`` with ``.inp`` / ``.out`` beside them) come from the llama-cpp-python
0.3.36 source distribution; ``make test`` extracts them into .venv/llama-vocab
(scripts/fetch_llama_vocab.sh). Set TOKENMILL_LLAMA_VOCAB_DIR to read them elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tokenmill.model.gguf import read_gguf
from tokenmill.model.gguf_tokenizer import SUPPORTED_TOKENIZER_MODELS, tokenizer_from_gguf

VOCAB_DIR = Path(os.environ.get("TOKENMILL_LLAMA_VOCAB_DIR", Path(__file__).parents[2] / ".venv" / "llama-vocab"))
SEPARATOR = "\n__ggml_vocab_test__\n"
# the 15 vocabularies that ship vectors, by tokenizer type: gpt2 (byte-level BPE, 12 pre-tokenizers),
# llama (SentencePiece: llama-spm, phi-3), gemma4, bert (WordPiece)
VOCABS = ["bert-bge", "command-r", "deepseek-coder", "deepseek-llm", "falcon", "gemma-4", "gpt-2", "llama-bpe",
          "llama-spm", "mpt", "phi-3", "qwen2", "qwen35", "refact", "starcoder"]


def read_cases(path: Path) -> list[tuple[str, list[int]]]:
    raw = path.with_suffix(".gguf.inp").read_bytes().decode("utf-8")  # bytes: keep \r\n as written
    inputs = raw.removesuffix(SEPARATOR).split(SEPARATOR)  # as llama.cpp reads it: no case after the last one
    outputs = path.with_suffix(".gguf.out").read_text(encoding="utf-8").split("\n")
    if outputs[-1] == "":
        outputs.pop()
    assert len(inputs) == len(outputs), path
    return [(text, [int(t) for t in ids.split()]) for text, ids in zip(inputs, outputs, strict=True)]


@pytest.mark.parametrize("name", VOCABS)
def test_vocab_matches_llama_cpp(name):
    path = VOCAB_DIR / f"ggml-vocab-{name}.gguf"
    if not path.with_suffix(".gguf.out").is_file():
        pytest.skip(f"llama.cpp vocab vectors not found in {VOCAB_DIR} (run scripts/fetch_llama_vocab.sh)")
    gf = read_gguf(str(path))
    assert gf.metadata["tokenizer.ggml.model"] in SUPPORTED_TOKENIZER_MODELS
    tokenizer = tokenizer_from_gguf(gf)
    cases = read_cases(path)
    assert len(cases) >= 40
    wrong = [(text, tokenizer.encode(text, add_special_tokens=False), ids) for text, ids in cases
             if tokenizer.encode(text, add_special_tokens=False) != ids]
    assert not wrong, f"{len(wrong)}/{len(cases)} cases differ, e.g. {wrong[0]!r}"


def test_unsupported_tokenizer_type_names_the_supported_ones():
    path = VOCAB_DIR / "ggml-vocab-nomic-bert-moe.gguf"  # a Unigram ("t5") vocabulary
    if not path.is_file():
        pytest.skip(f"llama.cpp vocab files not found in {VOCAB_DIR}")
    with pytest.raises(ValueError, match="unsupported GGUF tokenizer model 't5'.*gpt2, llama, gemma4, bert"):
        tokenizer_from_gguf(read_gguf(str(path)))
