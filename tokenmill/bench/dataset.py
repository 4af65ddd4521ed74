"""Benchmark prompts: synthetic ones cut from real prose shipped with the package, or a JSONL file.

Synthetic prompts are windows of ``input_len`` tokens taken at seeded random offsets in
``data/prose.txt`` (wrapping around when the window runs past the end), so the model sees
ordinary English rather than random ids, and every run with the same seed sends the same prompts.
With ``shared_prefix_len`` every prompt starts with the same window (a system prompt, a few-shot
preamble, a shared document), which is what a prefix cache serves.

Shipped JSONL datasets (``--dataset NAME``): ``input_grounded`` (rewrite / extract / summarize /
code-edit requests whose answers copy from the prompt: what prompt-lookup speculative decoding
speeds up) and ``open_ended`` (stories, explanations, advice), both chat prompts.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

DATA_DIR = Path(__file__).parent / "data"
PROSE_PATH = DATA_DIR / "prose.txt"
SHIPPED_DATASETS = ("input_grounded", "open_ended")


class TextTokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str: ...


@dataclass
class BenchPrompt:
    """One benchmark request: the prompt as token ids and as text, and how many tokens to generate."""

    text: str
    token_ids: list[int]
    output_len: int


def synthetic_prompts(tokenizer: TextTokenizer, num_prompts: int, input_len: int, output_len: int,
                      seed: int = 0, shared_prefix_len: int = 0) -> list[BenchPrompt]:
    """``num_prompts`` prompts cut from the shipped prose: each is ``shared_prefix_len`` tokens that
    all prompts share (one window, the same for every prompt) followed by ``input_len`` tokens of
    its own, so ``shared_prefix_len + input_len`` tokens in all."""
    _check_positive("num_prompts", num_prompts)
    _check_positive("input_len", input_len)
    _check_positive("output_len", output_len)
    if isinstance(shared_prefix_len, bool) or not isinstance(shared_prefix_len, int) or shared_prefix_len < 0:
        raise ValueError(f"shared_prefix_len must be an integer >= 0, got {shared_prefix_len!r}")
    corpus = tokenizer.encode(PROSE_PATH.read_text(encoding="utf-8"), add_special_tokens=False)
    rng = random.Random(seed)
    prefix = _window(corpus, rng.randrange(len(corpus)), shared_prefix_len) if shared_prefix_len else []
    prompts = []
    for _ in range(num_prompts):
        ids = prefix + _window(corpus, rng.randrange(len(corpus)), input_len)
        prompts.append(BenchPrompt(tokenizer.decode(ids, skip_special_tokens=False), ids, output_len))
    return prompts


def _window(corpus: list[int], start: int, length: int) -> list[int]:
    """``length`` tokens of ``corpus`` from ``start``, repeating the corpus as often as needed."""
    reps = (start + length) // len(corpus) + 1
    return (corpus * reps)[start:start + length]


def load_jsonl_prompts(path: str | Path, tokenizer: TextTokenizer, num_prompts: int,
                       output_len: int) -> list[BenchPrompt]:
    """Prompts from a JSONL file (or a shipped dataset's name): one object per line with ``"prompt"``
    (text) and optionally ``"output_len"`` (overrides ``output_len``) and ``"chat"`` (true: the
    prompt is a user message, sent through the model's chat template). Takes the first
    ``num_prompts`` lines, cycling through the file again when it has fewer."""
    _check_positive("num_prompts", num_prompts)
    _check_positive("output_len", output_len)
    if str(path) in SHIPPED_DATASETS:
        path = DATA_DIR / f"{path}.jsonl"
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                rows.append(_parse_row(line, lineno, path, output_len))
    if not rows:
        raise ValueError(f"dataset {path}: no prompts found")
    prompts = []
    for i in range(num_prompts):
        text, out_len, chat = rows[i % len(rows)]
        if chat:
            text = tokenizer.apply_chat_template([{"role": "user", "content": text}])
            prompts.append(BenchPrompt(text, tokenizer.encode(text, add_special_tokens=False), out_len))
        else:
            prompts.append(BenchPrompt(text, tokenizer.encode(text), out_len))
    return prompts


def _parse_row(line: str, lineno: int, path: str | Path, output_len: int) -> tuple[str, int, bool]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"dataset {path} line {lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"]:
        raise ValueError(f"dataset {path} line {lineno}: expected an object with a non-empty string \"prompt\"")
    out_len = row.get("output_len", output_len)
    if isinstance(out_len, bool) or not isinstance(out_len, int) or out_len < 1:
        raise ValueError(f"dataset {path} line {lineno}: output_len must be an integer >= 1, got {out_len!r}")
    chat = row.get("chat", False)
    if not isinstance(chat, bool):
        raise ValueError(f"dataset {path} line {lineno}: chat must be true or false, got {chat!r}")
    return row["prompt"], out_len, chat


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
