"""Tokenizers the playground can compare besides the served models': ``--playground-tokenizer PATH``.

A PATH is a GGUF file (a model, or a llama.cpp vocabulary-only ``ggml-vocab-*.gguf``), a
``tokenizer.json`` (with the ``tokenizer_config.json`` beside it when there is one), or a Hugging
Face folder holding a ``tokenizer.json``. Only the tokenizer is read, never weights. Each is shown
under a name made from its path (the file name without ``.gguf``; a ``tokenizer.json`` by its
folder's name).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import tokenizers

from tokenmill.model.gguf import read_gguf
from tokenmill.model.gguf_tokenizer import tokenizer_from_gguf
from tokenmill.model.tokenizer import Tokenizer


@dataclass
class FileTokenizer:
    """One tokenizer given on the command line."""

    name: str
    path: str
    kind: str  # "gguf" | "tokenizer.json" | "hf folder"
    tokenizer: Tokenizer


def load_tokenizer_file(path: str) -> tuple[str, Tokenizer]:
    """(kind, Tokenizer) of a GGUF file, a tokenizer.json or an HF folder; ValueError naming the path otherwise."""
    p = Path(os.path.expanduser(path))
    if p.is_dir():
        if not (p / "tokenizer.json").is_file():
            raise ValueError(f"--playground-tokenizer {path}: the folder has no tokenizer.json")
        return "hf folder", Tokenizer.from_pretrained(p)
    if not p.is_file():
        raise ValueError(f"--playground-tokenizer {path}: no such file or folder")
    with p.open("rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return "gguf", tokenizer_from_gguf(read_gguf(str(p)))
    if p.name == "tokenizer.json":
        return "tokenizer.json", Tokenizer.from_pretrained(p.parent)
    try:
        backend = tokenizers.Tokenizer.from_file(str(p))
    except Exception as exc:  # the Rust side raises a bare Exception for anything it cannot parse
        raise ValueError(f"--playground-tokenizer {path}: not a GGUF file, a tokenizer.json or a folder "
                         f"with one ({exc})") from exc
    return "tokenizer.json", Tokenizer(backend)


def load_playground_tokenizers(paths: list[str], taken: set[str] = frozenset()) -> list[FileTokenizer]:
    """Load every PATH (ValueError on the first bad one); names are distinct from each other and ``taken``."""
    loaded: list[FileTokenizer] = []
    used = set(taken)
    for path in paths:
        kind, tokenizer = load_tokenizer_file(path)
        name = _unique(_display_name(Path(os.path.expanduser(path))), used)
        used.add(name)
        loaded.append(FileTokenizer(name, path, kind, tokenizer))
    return loaded


def _display_name(p: Path) -> str:
    resolved = p.resolve()
    if resolved.name == "tokenizer.json":
        return resolved.parent.name or "tokenizer.json"
    return resolved.name.removesuffix(".gguf") or str(p)


def _unique(name: str, used: set[str]) -> str:
    candidate, i = name, 2
    while candidate in used:
        candidate, i = f"{name} ({i})", i + 1
    return candidate
