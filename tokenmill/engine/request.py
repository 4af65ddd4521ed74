"""Request and Sequence: the engine core's state for each prompt and each of its samples.

A Request is what a user submitted (one prompt, one SamplingParams). It owns one or more
Sequences: one while its prompt is prefilled, then ``n`` samples or ``num_beams`` beams
forked from it, which share the prompt's KV blocks.

Only the scheduler changes these objects (``Scheduler.update_from_output`` and the methods it
calls); the model runner and the sampler read them. Text lives on the API side
(``OutputProcessor``): the core works in token ids.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tokenmill.outputs import RequestMetrics
from tokenmill.sampling_params import SamplingParams

if TYPE_CHECKING:  # requests' records reach the API process, which does not load torch (engine/info.py)
    import torch


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # not yet scheduled, or preempted and waiting to be recomputed
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"  # cancelled by the user or a client that went away

    def to_api(self) -> str:
        """The string the APIs use (OpenAI's finish_reason)."""
        return self.value


@dataclass
class TokenLogprobs:
    """Raw logprobs of one chosen token: its own (with its rank) and the top alternatives."""

    token_id: int
    logprob: float
    rank: int | None  # 1 = most likely under the raw distribution
    top: dict[int, float] = field(default_factory=dict)  # the k best token ids -> logprob


@dataclass
class Sequence:
    """One stream of tokens: the prompt followed by the tokens generated so far.

    Its KV blocks are held by the KVCacheManager under ``seq_id``.
    """

    seq_id: int
    token_ids: list[int]
    num_prompt_tokens: int
    index: int = 0  # sample index in its request (beams: renumbered by rank each step)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    cumulative_logprob: float = 0.0
    generator: torch.Generator | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    # Draft tokens proposed to follow token_ids, verified in the next forward (speculative decoding),
    # and the distribution each was drawn from ([k, V]; None: one-hot, as n-gram and greedy drafts are).
    draft_token_ids: list[int] = field(default_factory=list)
    draft_probs: torch.Tensor | None = None
    # Structured outputs: where this sample is in its grammar (engine.structured_output.Grammar).
    grammar: Any = None

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def is_prefilling(self) -> bool:
        """Still has prompt tokens (or recomputed tokens, after preemption) to compute."""
        return self.num_computed_tokens < self.num_tokens - 1


@dataclass
class Request:
    """One prompt and its parameters, with the sequences generated for it."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None = None
    arrival_time: float = field(default_factory=time.perf_counter)
    status: RequestStatus = RequestStatus.WAITING
    seqs: list[Sequence] = field(default_factory=list)
    metrics: RequestMetrics = None  # type: ignore[assignment]
    cache_salt: str | None = None  # extra prefix-cache key: requests with different salts never share KV
    num_cached_tokens: int = -1  # prompt tokens found in the prefix cache at first scheduling (-1: not yet)
    # Raw prompt logprobs, one entry per prompt position (None for the first), filled chunk by chunk.
    prompt_logprobs: list[dict[int, tuple[float, int]] | None] | None = None
    # Samples 1..n-1 are forked from sample 0 when the prompt is done; each draws from its own generator.
    sample_generators: list[torch.Generator | None] = field(default_factory=list)
    beam_state: Any = None  # engine.beam_search.BeamGroup for num_beams > 1

    def __post_init__(self) -> None:
        if self.metrics is None:
            self.metrics = RequestMetrics(arrival_time=self.arrival_time,
                                          num_prompt_tokens=len(self.prompt_token_ids))

    @property
    def live_seqs(self) -> list[Sequence]:
        return [s for s in self.seqs if not s.is_finished]

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
