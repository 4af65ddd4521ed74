"""What the engine hands back: RequestOutput with one CompletionOutput per sample."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """Log-probability of one token under the raw model distribution."""

    logprob: float
    rank: int | None = None  # 1 = the most likely token
    decoded_token: str | None = None


# One dict per position: token id -> Logprob (the chosen token and the top alternatives).
PositionLogprobs = dict[int, Logprob]


@dataclass
class RequestMetrics:
    """Timestamps (time.perf_counter seconds) and the derived latencies of one request."""

    arrival_time: float
    scheduled_time: float | None = None  # first time the scheduler picked it
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0  # summed over the request's samples
    # output positions produced, counted once per step for all n samples (a step that verified draft
    # tokens counts each token it kept), so TPOT stays a time per token with speculative decoding
    num_token_steps: int = 0

    @property
    def ttft(self) -> float | None:
        """Time to first token: arrival -> first generated token."""
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def queue_time(self) -> float | None:
        if self.scheduled_time is None:
            return None
        return self.scheduled_time - self.arrival_time

    @property
    def e2e_latency(self) -> float | None:
        end = self.finished_time or self.last_token_time
        return None if end is None else end - self.arrival_time

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: (last - first) / (output positions - 1)."""
        if self.first_token_time is None or self.last_token_time is None:
            return None
        if self.num_token_steps <= 1:
            return 0.0
        return (self.last_token_time - self.first_token_time) / (self.num_token_steps - 1)


@dataclass
class CompletionOutput:
    """One sample of a request. ``text``/``token_ids`` are cumulative; ``delta_*`` are new this step."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float | None = None
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: str | int | None = None  # the matched stop string or stop token id
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    delta_logprobs: list[PositionLogprobs] | None = None
    # Per token, the top (token id, probability) after the sampling controls, when asked for.
    processed_top: list[list[tuple[int, float]]] | None = None
    # Per token: True when it was a draft token (speculative decoding) that the model accepted.
    drafted: list[bool] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """The state of one request after an engine step (or at the end, from LLM.generate)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (not recomputed)
    # Beam search only: per step, every candidate considered (see engine/beam_search.py, docs/beam_search.md).
    beam_trace: list[list[dict]] | None = None
