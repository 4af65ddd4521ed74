"""The data of one engine step, as it crosses the step's three calls.

    plan = Scheduler.schedule()                     -> SchedulerOutput
    out = ModelRunner.execute(plan)                 -> ModelRunnerOutput
    core_outputs = Scheduler.update_from_output(plan, out) -> list[EngineCoreOutput]

then, on the API side, ``OutputProcessor`` turns the EngineCoreOutputs into RequestOutputs
(text, stop strings, logprob entries with decoded tokens). Only the scheduler changes request
state; the runner reads the plan and returns tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tokenmill.engine.request import FinishReason, Request, Sequence, TokenLogprobs
from tokenmill.outputs import RequestMetrics
from tokenmill.sampling_params import SamplingParams

if TYPE_CHECKING:  # the step's records cross to the API process, which does not load torch (engine/info.py)
    import torch

    from tokenmill.engine.kv_cache_manager import BlockCopy

# A prompt position's raw logprobs: token id -> (logprob, rank), for the actual token and the top k.
PromptLogprobEntry = dict[int, tuple[float, int]]


@dataclass
class ScheduledSeq:
    """One sequence of the step: which of its tokens are fed to the model, where their K/V go.

    The fed tokens are ``seq.token_ids[start:]`` (num_new_tokens - len(draft_token_ids) of them)
    followed by the draft tokens. When the step reaches the sequence's last token, logits come
    back for the last ``1 + len(draft_token_ids)`` positions and the next tokens are sampled.
    """

    request: Request
    seq: Sequence
    num_new_tokens: int
    start: int  # seq.num_computed_tokens when planned: the position of the first fed token
    block_table: list[int]
    draft_token_ids: list[int] = field(default_factory=list)
    draft_probs: torch.Tensor | None = None  # [len(draft_token_ids), V] the drafts' distribution; None: one-hot
    num_samples: int = 1  # n > 1: the request's n samples all draw their first token from this row
    samples: bool = False  # this step computes the sequence's last token: its next token(s) are sampled
    # structured outputs: [num_logit_rows, ceil(V / 32)] int32, the tokens each sampled row may take
    grammar_bitmask: torch.Tensor | None = None

    @property
    def num_logit_rows(self) -> int:
        """Positions whose logits are sampled: the last real token and each draft token."""
        return 1 + len(self.draft_token_ids) if self.samples else 0

    def input_token_ids(self) -> list[int]:
        real = self.num_new_tokens - len(self.draft_token_ids)
        return self.seq.token_ids[self.start:self.start + real] + self.draft_token_ids


@dataclass
class SchedulerOutput:
    """The plan of one step: decodes first (one token each), then multi-token rows and prefill chunks."""

    scheduled: list[ScheduledSeq] = field(default_factory=list)
    block_copies: list[BlockCopy] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


@dataclass
class SpecCandidate:
    """A decoding sequence that may get draft tokens for the next step (speculative decoding)."""

    seq: Sequence
    params: SamplingParams
    max_drafts: int  # at most this many: more could never all be used (max_tokens, context length)


@dataclass
class DraftProposal:
    """Draft tokens for one sequence, and the distribution each was drawn from (None: one-hot)."""

    token_ids: list[int]
    probs: torch.Tensor | None = None  # [len(token_ids), V]


@dataclass
class SampledTokens:
    """What one sequence (or one of the n samples fanned out from it) gets from a step."""

    token_ids: list[int]  # in order: 1 token, or up to 1 + drafts when drafts were verified
    logprobs: list[float]  # raw logprob of each token
    top: list[TokenLogprobs] | None = None  # per token, when the request asked for logprobs
    processed_top: list[list[tuple[int, float]]] | None = None  # per token: (id, prob) after the controls
    num_accepted_drafts: int = 0  # the first this many tokens are draft tokens the model accepted


@dataclass
class ModelRunnerOutput:
    """The model's answer to a SchedulerOutput, keyed by ``Sequence.seq_id``."""

    sampled: dict[int, list[SampledTokens]] = field(default_factory=dict)  # one entry per sample
    beam_logits: dict[int, torch.Tensor] = field(default_factory=dict)  # beam search: raw logits [V]
    prompt_logprobs: dict[int, list[PromptLogprobEntry]] = field(default_factory=dict)  # this chunk's rows


@dataclass
class SeqDelta:
    """What changed in one sample of a request during a step."""

    index: int
    new_token_ids: list[int] = field(default_factory=list)
    new_logprobs: list[TokenLogprobs] | None = None
    new_processed_top: list[list[tuple[int, float]]] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    new_drafted: list[bool] = field(default_factory=list)  # per new token: an accepted draft token
    grammar_complete: bool = False  # finished because its structured output is complete (last token is text)


@dataclass
class EngineCoreOutput:
    """The core's report on one request after a step (token ids only; text is the API side's job)."""

    request_id: str
    seqs: list[SeqDelta]
    finished: bool
    metrics: RequestMetrics
    num_cached_tokens: int = 0
    prompt_logprobs: list[PromptLogprobEntry | None] | None = None  # once complete
    # Beam search: ``seqs`` are the final hypotheses, with their whole token lists (sent once, at the end).
    replace: bool = False
    beam_trace: list[list[dict]] | None = None


@dataclass
class SequenceStop:
    """A sample the API side ended (a stop string matched its text): the core finishes it and frees its KV."""

    request_id: str
    index: int
    stop_string: str
