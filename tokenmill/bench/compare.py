"""The same prompts through Hugging Face transformers' batched ``generate()``, for a side-by-side.

Prompts are left-padded into batches of ``concurrency`` (all at once when None), decoded
greedily for exactly ``output_len`` tokens (``min_new_tokens`` masks EOS, like ignore_eos),
in the same dtype and from the same weights as the engine. A streamer records the time at
which each decode step hands out its tokens, so TTFT, TPOT and ITL mean the same as for
the engine: every request of a batch receives its n-th token at the batch's n-th step.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from tokenmill.bench.dataset import BenchPrompt
from tokenmill.bench.metrics import BenchResult, RequestRecord, summarize

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def require_transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise RuntimeError("--compare transformers needs the transformers package: "
                           "pip install 'transformers>=4.45' (or pip install 'tokenmill[dev]')") from None
    return transformers


def load_transformers_model(model: str, dtype: torch.dtype, device: torch.device, progress: bool = True) -> Any:
    """The engine's model (alias, .gguf file or HF folder) as a transformers causal LM in ``dtype``."""
    transformers = require_transformers()
    if not progress:
        transformers.utils.logging.disable_progress_bar()
    from tokenmill.model.source import resolve_model

    path, fmt = resolve_model(model)
    if fmt == "gguf":
        p = Path(path)
        # transformers dequantizes GGUF weights to dtype (the same values the engine uses).
        loaded = transformers.AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=dtype)
        # The GGUF-loaded module generated markedly slower here than a freshly built one with the
        # same weights, so copy them into a plain model to compare against transformers at its best.
        hf = transformers.AutoModelForCausalLM.from_config(loaded.config, dtype=dtype)
        hf.load_state_dict(loaded.state_dict(), strict=False)
        hf.tie_weights()
        del loaded
    else:
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return hf.to(device).eval()


class _StepClock:
    """A transformers streamer that notes when each generation step produces its tokens."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        # generate() first puts the prompt ids, then one [batch] tensor of new tokens per step.
        if not self._seen_prompt:
            self._seen_prompt = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def run_transformers(hf_model: Any, prompts: list[BenchPrompt], concurrency: int | None = None,
                     pad_token_id: int = 0, warmup: int = 1) -> BenchResult:
    """Generate ``prompts`` with ``hf_model.generate`` in left-padded batches of ``concurrency``."""
    device = hf_model.device
    batch_size = concurrency or len(prompts)
    if warmup:
        warm = [BenchPrompt(p.text, p.token_ids, min(p.output_len, 4)) for p in prompts[:warmup]]
        _run_batch(hf_model, warm, pad_token_id)
    records: list[RequestRecord] = []
    _reset_gpu_peak(device)
    start = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        records.extend(_run_batch(hf_model, prompts[i:i + batch_size], pad_token_id))
    duration = time.perf_counter() - start
    peak_gpu = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return summarize(records, duration, backend="transformers", concurrency=concurrency,
                     peak_gpu_memory_mb=peak_gpu)


def _run_batch(hf_model: Any, batch: list[BenchPrompt], pad_token_id: int) -> list[RequestRecord]:
    input_ids, attention_mask = left_pad([p.token_ids for p in batch], pad_token_id)
    new_tokens = max(p.output_len for p in batch)
    clock = _StepClock()
    begin = time.perf_counter()
    with torch.inference_mode():
        hf_model.generate(input_ids=input_ids.to(hf_model.device), attention_mask=attention_mask.to(hf_model.device),
                          max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          pad_token_id=pad_token_id, streamer=clock)
    records = []
    for p in batch:
        # A request with a shorter output_len would have stopped at its own step.
        record = RequestRecord(prompt_tokens=len(p.token_ids), start_time=begin)
        for t in clock.times[:p.output_len]:
            record.add_chunk(t, 1)
        records.append(record)
    return records


def left_pad(seqs: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[batch, max_len] ids padded on the left, and the matching attention mask (1 = real token)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        if s:
            ids[row, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[row, width - len(s):] = 1
    return ids, mask


def _reset_gpu_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
