"""OutputProcessor: the API side of a step. Core outputs (token ids) -> RequestOutputs (text).

It owns everything that needs the tokenizer's text: incremental UTF-8-safe detokenization,
stop strings (held back until settled, never sent), and logprob entries with decoded tokens.
When a stop string ends a sample, ``process`` also returns a ``SequenceStop`` so the core ends
that sequence in the same step and frees its KV blocks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.engine.request import FinishReason, TokenLogprobs
from tokenmill.engine.step import EngineCoreOutput, PromptLogprobEntry, SeqDelta, SequenceStop
from tokenmill.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput
from tokenmill.sampling_params import SamplingParams


@dataclass
class _Sample:
    """What one sample has released so far, and what is new since the last RequestOutput."""

    detokenizer: IncrementalDetokenizer
    wants_logprobs: bool
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] = field(default_factory=list)
    processed_top: list[list[tuple[int, float]]] = field(default_factory=list)
    drafted: list[bool] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    delta_logprobs: list[PositionLogprobs] = field(default_factory=list)

    def release(self, text: str) -> None:
        self.text += text
        self.delta_text += text


@dataclass
class _RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    samples: dict[int, _Sample] = field(default_factory=dict)
    prompt_logprobs: list[PositionLogprobs | None] | None = None


class OutputProcessor:
    """Turns the core's per-step reports into RequestOutputs for the requests registered with it."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._requests: dict[str, _RequestState] = {}

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams) -> None:
        """Register a request before the core sees it; raises ValueError for an id in use."""
        if request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        self._requests[request_id] = _RequestState(request_id, prompt, list(prompt_token_ids), params)

    def remove_request(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    def process(self, core_outputs: list[EngineCoreOutput]) -> tuple[list[RequestOutput], list[SequenceStop]]:
        """RequestOutputs (cumulative text + this step's deltas), and the samples stop strings ended."""
        outputs, stops = [], []
        for core in core_outputs:
            state = self._requests.get(core.request_id)
            if state is None:
                continue
            if core.replace:
                state.samples = {}
            for delta in core.seqs:
                sample = state.samples.get(delta.index)
                if sample is None:
                    sample = state.samples[delta.index] = self._new_sample(state)
                stop = self._apply(sample, delta)
                if stop is not None and not core.replace and delta.finish_reason is None:
                    stops.append(SequenceStop(core.request_id, delta.index, stop))
            if core.prompt_logprobs is not None and state.prompt_logprobs is None:
                state.prompt_logprobs = [self._prompt_entry(e) for e in core.prompt_logprobs]
            outputs.append(self._make_output(state, core))
        return outputs, stops

    # ---- one sample ---------------------------------------------------------------------------

    def _new_sample(self, state: _RequestState) -> _Sample:
        detokenizer = IncrementalDetokenizer(self.tokenizer, state.prompt_token_ids, state.params)
        return _Sample(detokenizer, wants_logprobs=state.params.logprobs is not None)

    def _apply(self, sample: _Sample, delta: SeqDelta) -> str | None:
        """Add delta's tokens to sample's text; returns the stop string when one matched."""
        if sample.finish_reason is not None:
            return None  # ended here by a stop string; the core heard of it after one more step
        last = len(delta.new_token_ids) - 1
        for i, token in enumerate(delta.new_token_ids):
            sample.token_ids.append(token)
            sample.delta_token_ids.append(token)
            sample.drafted.append(bool(delta.new_drafted) and delta.new_drafted[i])
            if delta.new_logprobs is not None:
                entry = self._position_entry(delta.new_logprobs[i])
                sample.logprobs.append(entry)
                sample.delta_logprobs.append(entry)
            if delta.new_processed_top is not None:
                sample.processed_top.append(delta.new_processed_top[i])
            if (i == last and delta.finish_reason is FinishReason.STOP and not isinstance(delta.stop_reason, str)
                    and not delta.grammar_complete):
                break  # EOS or a stop token id: its text never reaches the output
            update = sample.detokenizer.add_tokens([token])
            sample.release(update.delta_text)
            if update.stop_string is not None:  # tokens after it (verified drafts) are dropped
                sample.cumulative_logprob = delta.cumulative_logprob
                sample.finish_reason, sample.stop_reason = FinishReason.STOP, update.stop_string
                return update.stop_string
        sample.cumulative_logprob = delta.cumulative_logprob
        if delta.finish_reason is not None and sample.finish_reason is None:
            sample.release(sample.detokenizer.finish())
            sample.finish_reason, sample.stop_reason = delta.finish_reason, delta.stop_reason
        return None

    # ---- logprobs -----------------------------------------------------------------------------

    def _decode(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _position_entry(self, lp: TokenLogprobs) -> PositionLogprobs:
        """The chosen token (rank in the whole vocabulary) and the top alternatives (ranks 1..k)."""
        entry = {lp.token_id: Logprob(lp.logprob, lp.rank, self._decode(lp.token_id))}
        for rank, (tid, value) in enumerate(sorted(lp.top.items(), key=lambda kv: -kv[1]), start=1):
            if tid != lp.token_id:
                entry[tid] = Logprob(value, rank, self._decode(tid))
        return entry

    def _prompt_entry(self, entry: PromptLogprobEntry | None) -> PositionLogprobs | None:
        if entry is None:
            return None
        return {tid: Logprob(lp, rank, self._decode(tid)) for tid, (lp, rank) in entry.items()}

    # ---- the RequestOutput --------------------------------------------------------------------

    def _make_output(self, state: _RequestState, core: EngineCoreOutput) -> RequestOutput:
        completions = []
        for index in sorted(state.samples):
            s = state.samples[index]
            completions.append(CompletionOutput(
                index=index, text=s.text, token_ids=list(s.token_ids), cumulative_logprob=s.cumulative_logprob,
                logprobs=list(s.logprobs) if s.wants_logprobs else None,
                finish_reason=s.finish_reason.to_api() if s.finish_reason else None, stop_reason=s.stop_reason,
                delta_text=s.delta_text, delta_token_ids=s.delta_token_ids,
                delta_logprobs=s.delta_logprobs if s.wants_logprobs else None,
                processed_top=list(s.processed_top) or None, drafted=list(s.drafted)))
            s.delta_text, s.delta_token_ids, s.delta_logprobs = "", [], []
        expected = len(state.samples) if core.replace else state.params.n
        finished = core.finished or (len(state.samples) == expected
                                     and all(s.finish_reason is not None for s in state.samples.values()))
        if finished:
            if core.metrics.finished_time is None:
                core.metrics.finished_time = time.perf_counter()
            self._requests.pop(state.request_id, None)
        return RequestOutput(state.request_id, state.prompt, state.prompt_token_ids, completions, finished,
                             core.metrics, state.prompt_logprobs, num_cached_tokens=core.num_cached_tokens,
                             beam_trace=core.beam_trace)
