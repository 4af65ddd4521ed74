#!/usr/bin/env bash
# Extracts llama.cpp's tokenizer test vectors (models/ggml-vocab-*.gguf with .inp/.out beside them, MIT
# licence) from the llama-cpp-python 0.3.36 source distribution on PyPI into DIR, for
# tests/model/test_vocab_vectors.py. Nothing is built. Usage: scripts/fetch_llama_vocab.sh DIR [PYTHON]
set -eu
dir=$1; py=${2:-python3}
[ -f "$dir/ggml-vocab-gpt-2.gguf.out" ] && exit 0
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
"$py" -m pip download -q --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d "$work"
tar xzf "$work"/llama_cpp_python-0.3.36.tar.gz -C "$work" --wildcards \
    'llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-*' 'llama_cpp_python-0.3.36/vendor/llama.cpp/LICENSE'
mkdir -p "$dir"
mv "$work"/llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-* "$work"/llama_cpp_python-0.3.36/vendor/llama.cpp/LICENSE "$dir"/
echo "llama.cpp vocab test vectors in $dir"
