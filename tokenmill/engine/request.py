"""Request and Sequence: the state the engine keeps for each prompt and each of its samples.

A Request is what a user submitted (one prompt, one SamplingParams). It owns one or more
Sequences: one while its prompt is prefilled, then ``n`` samples or ``num_beams`` beams
forked from it, which share the prompt's KV blocks.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from tokenmill.outputs import PositionLogprobs, RequestMetrics
from tokenmill.sampling_params import SamplingParams


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
class Sequence:
    """One stream of tokens: the prompt followed by the tokens generated so far."""

    seq_id: int
    token_ids: list[int]
    num_prompt_tokens: int
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    cumulative_logprob: float = 0.0
    logprobs: list[PositionLogprobs] | None = None
    generator: torch.Generator | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    text: str = ""  # text released to the client so far
    detokenizer: Any = None  # engine.detokenizer.IncrementalDetokenizer
    # What changed since the last RequestOutput (reset when the engine reports it).
    delta_token_ids: list[int] = field(default_factory=list)
    delta_text: str = ""
    delta_logprobs: list[PositionLogprobs] = field(default_factory=list)
    # Playground: per generated token, the top (token id, probability) after all sampling controls.
    processed_top: list[list[tuple[int, float]]] = field(default_factory=list)

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
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    prompt_logits_chunks: list[torch.Tensor] = field(default_factory=list)  # until the prompt is done
    beam_state: Any = None  # engine.beam_search.BeamGroup for num_beams > 1
    seed: int = 0  # of the first sample's generator; sample i is seeded from it and i

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
