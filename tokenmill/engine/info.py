"""What the API side knows about an engine, and the checks a request passes before it is queued.

Torch-free on purpose: with ``tokenmill serve`` the API process (HTTP, tokenization, detokenization, SSE)
imports this and never loads torch, which cost it ~190 MB of resident memory (docs/memory.md); the
engine core process fills ``EngineInfo`` in and sends it over (``engine/core_process.py``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from tokenmill.config import EngineConfig, ModelConfig
from tokenmill.engine.structured_output import GrammarCompiler, grammar_compiler
from tokenmill.sampling_params import SamplingParams


@dataclass(frozen=True)
class EngineInfo:
    """What the API side may know about the engine (the server reads this, never the engine's insides).

    Types are named by strings, not torch objects: this crosses to the API process, which does not load torch."""

    model_name: str
    tokenizer: Any  # tokenmill.model.tokenizer.Tokenizer
    model_config: ModelConfig
    config: EngineConfig
    max_model_len: int
    eos_token_ids: list[int]
    dtype: str  # the model's compute dtype as torch names it without "torch.": "float32", "bfloat16"
    device: str  # "cpu", "cuda:0"
    block_size: int
    num_blocks: int
    kv_cache_bytes: int
    kv_cache_dtype: str = "float32"  # the cache's element type (--kv-cache-dtype resolved), named like dtype
    kv_bytes_per_token: int = 0  # KV bytes one token takes (int8: codes and scales)

    @property
    def kv_cache_tokens(self) -> int:
        return self.num_blocks * self.block_size


@dataclass
class EngineStats:
    """A snapshot of the engine for metrics and the /metrics endpoint."""

    num_running: int
    num_waiting: int
    num_preemptions_total: int
    kv_blocks_used: int
    kv_blocks_total: int
    prompt_tokens_total: int
    generation_tokens_total: int
    tokens_prefilled_last_step: int = 0
    tokens_decoded_last_step: int = 0
    prefix_cache_queries_total: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits_total: int = 0  # of those, tokens found (their KV reused, not recomputed)
    kv_blocks_cached_free: int = 0  # unused blocks still holding a cached prefix (reusable, evictable)
    kv_blocks_shared: int = 0  # used blocks held by more than one sequence (prefix-cache hits, forks)
    requests_received_total: int = 0  # requests the scheduler has taken in (the rest are still in the inbox)
    spec_decode_drafts_total: int = 0  # sequence-steps verified with draft tokens (speculative decoding)
    spec_decode_draft_tokens_total: int = 0  # draft tokens verified
    spec_decode_accepted_tokens_total: int = 0  # of those, accepted
    kv_cache_bytes: int = 0  # bytes of the KV cache tensors (fixed at start-up)
    kv_cache_tokens: int = 0  # tokens the KV cache holds (blocks x block size)

    @property
    def kv_cache_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


class EngineStepError(RuntimeError):
    """A step failed; the requests that can have caused it were aborted and are named here."""

    def __init__(self, request_ids: list[str], cause: BaseException) -> None:
        super().__init__(f"engine step failed: {cause}")
        self.request_ids = request_ids


def leave_cores_to_the_engine() -> None:
    """For a process that only serves an engine running elsewhere (the API process, Ray Serve's ingress): torch
    is not loaded there, but where something did load it (tests run in-process engines too), its threads are
    cut to one so that they do not compete with the engine's."""
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def validate_request(info: EngineInfo, prompt_token_ids: list[int], params: SamplingParams) -> None:
    """ValueError naming the problem when a request can never run on the engine ``info`` describes."""
    if not prompt_token_ids:
        raise ValueError("prompt must not be empty")
    vocab = info.model_config.vocab_size
    bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"prompt token ids must be in [0, {vocab}); got {bad[:5]}")
    for name, ids in (("logit_bias", (params.logit_bias or {}).keys()), ("stop_token_ids", params.stop_token_ids)):
        bad = [t for t in ids if t >= vocab]
        if bad:
            raise ValueError(f"{name}: token ids must be < vocab size {vocab}; got {bad[:5]}")
    n_prompt, limit = len(prompt_token_ids), info.max_model_len
    needed = n_prompt + (params.max_tokens or 1)
    if needed > limit:
        raise ValueError(
            f"prompt ({n_prompt} tokens) + max_tokens ({params.max_tokens}) = {needed} exceeds the "
            f"context length of {limit} tokens")
    if params.structured_outputs is not None:  # compiles (and caches) the grammar: bad ones fail here
        grammar_compiler_for(info).compile(params.structured_outputs)
    # After a preemption every sample / beam is recomputed on its own: all of them must fit at once.
    streams = max(params.n, params.num_beams)
    blocks = -(-needed // info.block_size) * streams
    if blocks > info.num_blocks:
        raise ValueError(f"prompt ({n_prompt} tokens) + max_tokens ({params.max_tokens}) for {streams} "
                         f"sequence(s) needs {blocks} KV blocks but the cache has only {info.num_blocks}")


def grammar_compiler_for(info: EngineInfo) -> GrammarCompiler:
    """The structured-output compiler for the engine's tokenizer and vocabulary (built once)."""
    return grammar_compiler(info.tokenizer, info.model_config.vocab_size, tuple(info.eos_token_ids))
