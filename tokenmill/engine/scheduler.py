"""Continuous batching, and the only place a request's state changes.

``schedule()`` plans a step: decodes (one token per running sequence, or 1 + drafts) and
prefill chunks (prompt tokens of new or preempted requests) under a token budget
(``max_num_batched_tokens``) and a sequence cap (``max_num_seqs``), first come first served.
A new request first takes the longest cached prefix of its prompt from the KVCacheManager and
computes only the rest. When the KV cache runs out of blocks, the newest running request is
preempted: its blocks are freed and it goes back to the front of the waiting queue, to be
recomputed later (its generated tokens are kept; the prefix cache usually still holds them).

``update_from_output()`` applies the runner's answer: computed tokens, appended tokens, stop
checks, forks (n samples, beams), finishing and freeing.

Speculative decoding: ``speculation_candidates()`` names the decoding sequences that may get
draft tokens this step (none above the batch-size limit, none for beam search); a proposer
(engine/spec_decode.py) drafts for them and ``set_draft_tokens()`` stores the drafts, which the
next ``schedule()`` feeds after each sequence's last token, with lookahead slots for their K/V.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tokenmill.config import SpeculativeConfig
from tokenmill.engine.beam_search import BeamSearch
from tokenmill.engine.kv_cache_manager import KVCacheManager
from tokenmill.engine.request import FinishReason, Request, RequestStatus, Sequence
from tokenmill.engine.step import (
    DraftProposal,
    EngineCoreOutput,
    ModelRunnerOutput,
    SampledTokens,
    ScheduledSeq,
    SchedulerOutput,
    SeqDelta,
    SpecCandidate,
)
from tokenmill.engine.stopping import check_stop
from tokenmill.engine.structured_output import GrammarCompiler

logger = logging.getLogger(__name__)


@dataclass
class SchedulerCounters:
    """Totals since start, for metrics."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    preemptions: int = 0
    prefix_cache_queries: int = 0  # tokens of newly scheduled sequences looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, tokens whose KV was reused
    last_step_prefill_tokens: int = 0
    last_step_decode_tokens: int = 0
    spec_drafts: int = 0  # sequences verified with draft tokens (one per sequence and step)
    spec_draft_tokens: int = 0  # draft tokens verified
    spec_accepted_tokens: int = 0  # of those, accepted


class Scheduler:
    """Holds the waiting and running queues, plans each step and applies its results."""

    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 eos_token_ids: list[int], max_model_len: int, tokenizer: Any = None,
                 speculative_config: SpeculativeConfig | None = None,
                 grammars: Callable[[], GrammarCompiler] | None = None) -> None:
        """grammars: gives the structured-output compiler (called once a request has a grammar)."""
        self.kv = kv
        self._grammars = grammars
        self.speculative_config = speculative_config
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.beam_search = BeamSearch(self, tokenizer)  # changes beams only through fork/free/append/rank
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.counters = SchedulerCounters()
        self._seq_ids = 0

    # ---- requests in and out ----------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a request (its first sequence is made here)."""
        if not request.seqs:
            seq = self.new_sequence(request, list(request.prompt_token_ids),
                                    request.sample_generators[0] if request.sample_generators else None)
            if request.params.structured_outputs is not None:
                if self._grammars is None:
                    raise ValueError("structured_outputs: this scheduler has no grammar compiler")
                seq.grammar = self._grammars().grammar(request.params.structured_outputs)
            request.seqs.append(seq)
        self.requests[request.request_id] = request
        self.waiting.append(request)
        self.counters.prompt_tokens += len(request.prompt_token_ids)

    def abort_request(self, request_id: str) -> EngineCoreOutput | None:
        """End every live sequence of the request ("abort") and free its blocks; None if unknown."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        live = request.live_seqs
        if request.params.use_beam_search:  # report the best n beams so far, whole
            live = sorted(live, key=lambda s: -s.cumulative_logprob)[:request.params.n]
            deltas = [SeqDelta(i, list(s.output_token_ids), None, None, s.cumulative_logprob, FinishReason.ABORT)
                      for i, s in enumerate(live)]
        else:
            deltas = [SeqDelta(s.index, cumulative_logprob=s.cumulative_logprob, finish_reason=FinishReason.ABORT)
                      for s in live]
        for seq in request.live_seqs:
            self._finish_sequence(seq, FinishReason.ABORT, None)
        self._finish_request(request)
        return self._core_output(request, deltas, replace=request.params.use_beam_search)

    def stop_sequence(self, request_id: str, index: int, stop_string: str) -> None:
        """The API side found a stop string in sample ``index``: end it now and free its blocks."""
        request = self.requests.get(request_id)
        if request is None:
            return
        for seq in request.live_seqs:
            if seq.index == index:
                self._finish_sequence(seq, FinishReason.STOP, stop_string)
        if not request.live_seqs:
            self._finish_request(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- speculative decoding ---------------------------------------------------------------

    def speculation_candidates(self) -> list[SpecCandidate]:
        """Decoding sequences that may get drafts for the next step.

        None when speculation is off, or when more sequences are running than
        ``disable_by_batch_size`` (a large batch already keeps the compute busy: verifying drafts
        would cost more than it saves). Beam search never speculates; a sequence speculates once it
        has its first output token (the prompt's last step samples it, and forks n samples there).
        """
        config = self.speculative_config
        if config is None:
            return []
        live = [(r, s) for r in self.running for s in r.live_seqs]
        if len(live) > config.disable_by_batch_size:
            return []
        candidates = []
        for request, seq in live:
            params = request.params
            if params.use_beam_search or seq.num_output_tokens == 0 or seq.is_prefilling:
                continue
            room = self.max_model_len - seq.num_tokens - 1
            if params.max_tokens is not None:
                room = min(room, params.max_tokens - seq.num_output_tokens - 1)
            room = min(room, config.num_speculative_tokens)
            if room > 0:
                candidates.append(SpecCandidate(seq, params, room))
        return candidates

    def set_draft_tokens(self, proposals: dict[int, DraftProposal]) -> None:
        """Store each proposal (keyed by seq_id) on its sequence, for the next ``schedule()``."""
        for request in self.running:
            for seq in request.live_seqs:
                proposal = proposals.get(seq.seq_id)
                if proposal is not None and proposal.token_ids:
                    seq.draft_token_ids, seq.draft_probs = list(proposal.token_ids), proposal.probs

    def _count_drafts(self, num_drafts: int, num_accepted: int) -> None:
        self.counters.spec_drafts += 1
        self.counters.spec_draft_tokens += num_drafts
        self.counters.spec_accepted_tokens += num_accepted

    # ---- planning ---------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Plan the next step: running requests first (oldest first), then waiting ones while room remains."""
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        num_seqs = 0
        for request in list(self.running):
            if request not in self.running:  # preempted earlier in this loop
                continue
            for seq in request.live_seqs:
                if budget <= 0 or num_seqs >= self.max_num_seqs:
                    break
                scheduled = self._schedule_running(request, seq, budget, out)
                if scheduled is None:
                    break  # the request itself was preempted: its other sequences (beams, samples) wait too
                if scheduled.num_new_tokens:
                    out.scheduled.append(scheduled)
                    budget -= scheduled.num_new_tokens
                    num_seqs += 1
        while self.waiting and budget > 0 and num_seqs < self.max_num_seqs:
            added = self._admit(self.waiting[0], budget, self.max_num_seqs - num_seqs, out)
            if not added:
                break
            budget -= sum(s.num_new_tokens for s in added)
            num_seqs += len(added)
        # single-token decodes first: the attention metadata expects them at the front
        out.scheduled.sort(key=lambda s: s.num_new_tokens != 1)
        self._count_step(out)
        return out

    def _schedule_running(self, request: Request, seq: Sequence, budget: int,
                          out: SchedulerOutput) -> ScheduledSeq | None:
        """Plan seq's next tokens (with its drafts when decoding); None when its request got preempted."""
        remaining = seq.num_tokens - seq.num_computed_tokens
        drafts = []
        if remaining == 1 and seq.draft_token_ids:
            room = min(budget - 1, self.max_model_len - seq.num_tokens)
            drafts = seq.draft_token_ids[:max(0, room)]
            if seq.grammar is not None:  # a draft the grammar forbids could never be accepted
                drafts = drafts[:seq.grammar.valid_prefix(drafts)]
        n = min(remaining, budget)
        if n <= 0:
            return ScheduledSeq(request, seq, 0, seq.num_computed_tokens, [])
        while True:
            # the drafts' K/V go into lookahead slots, given back for the drafts that get rejected
            copies = self.kv.allocate_slots(seq, n, num_lookahead_tokens=len(drafts))
            if copies is not None:
                out.block_copies += copies
                return self._scheduled(request, seq, n + len(drafts), drafts)
            if drafts:  # no room for the drafts: decode without them rather than preempt anyone
                drafts = []
                continue
            victim = self.running[-1]
            self.preempt(victim, out)
            if victim is request:
                return None

    def _admit(self, request: Request, budget: int, seq_room: int, out: SchedulerOutput) -> list[ScheduledSeq]:
        """Move the first waiting request to running if at least its first chunk fits."""
        added: list[ScheduledSeq] = []
        for seq in request.live_seqs[:seq_room]:
            # prompt logprobs need the logits of every prompt position: nothing may come from the cache
            if request.params.prompt_logprobs is None:
                cached_blocks, num_cached = self.kv.get_computed_blocks(seq, request.cache_salt)
            else:
                cached_blocks, num_cached = [], 0
            n = min(seq.num_tokens - seq.num_computed_tokens - num_cached, budget)
            if n <= 0:
                break
            copies = self.kv.allocate_slots(seq, n, new_computed_blocks=cached_blocks)
            if copies is None:
                break
            out.block_copies += copies
            seq.num_computed_tokens += num_cached
            self.counters.prefix_cache_queries += seq.num_tokens
            self.counters.prefix_cache_hits += num_cached
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = min(num_cached, len(request.prompt_token_ids))
            added.append(self._scheduled(request, seq, n, []))
            budget -= n
        if added:
            self.waiting.popleft()
            self.running.append(request)
            request.status = RequestStatus.RUNNING
            if request.metrics.scheduled_time is None:
                request.metrics.scheduled_time = time.perf_counter()
            out.scheduled += added
        return added

    def _scheduled(self, request: Request, seq: Sequence, n: int, drafts: list[int]) -> ScheduledSeq:
        params = request.params
        fan_out = (params.n > 1 and not params.use_beam_search and len(request.seqs) == 1
                   and seq.num_output_tokens == 0)
        start = seq.num_computed_tokens
        probs = seq.draft_probs[:len(drafts)] if drafts and seq.draft_probs is not None else None
        samples = start + n - len(drafts) == seq.num_tokens
        return ScheduledSeq(request, seq, n, start, self.kv.block_table(seq), list(drafts), probs,
                            num_samples=params.n if fan_out else 1, samples=samples,
                            grammar_bitmask=seq.grammar.bitmask(drafts) if samples and seq.grammar else None)

    def preempt(self, request: Request, out: SchedulerOutput | None = None) -> None:
        """Free all of request's blocks and put it back at the front of the waiting queue."""
        for seq in request.seqs:
            self.kv.free(seq)
            seq.num_computed_tokens = 0
            seq.draft_token_ids, seq.draft_probs = [], None
        self.running.remove(request)
        self.waiting.appendleft(request)
        request.status = RequestStatus.WAITING
        self.counters.preemptions += 1
        if out is not None:
            out.preempted.append(request)
            out.scheduled = [s for s in out.scheduled if s.request is not request]

    def _count_step(self, out: SchedulerOutput) -> None:
        decode = sum(s.num_new_tokens for s in out.scheduled if s.start == s.seq.num_tokens - 1)
        self.counters.last_step_decode_tokens = decode
        self.counters.last_step_prefill_tokens = out.num_tokens - decode

    # ---- applying the results ---------------------------------------------------------------

    def update_from_output(self, plan: SchedulerOutput, out: ModelRunnerOutput) -> list[EngineCoreOutput]:
        """Apply one step's results; returns a report for every request that changed."""
        now = time.perf_counter()
        deltas: dict[str, list[SeqDelta]] = {}
        beam_rows: dict[str, list[tuple[Sequence, torch.Tensor]]] = {}
        for s in plan.scheduled:
            request, seq = s.request, s.seq
            if seq.is_finished:
                continue
            seq.num_computed_tokens += s.num_new_tokens - len(s.draft_token_ids)
            seq.draft_token_ids, seq.draft_probs = [], None
            self.kv.cache_full_blocks(seq, request.cache_salt)
            self._add_prompt_logprobs(request, s, out)
            if not s.samples:
                continue
            if request.params.use_beam_search:
                beam_rows.setdefault(request.request_id, []).append((seq, out.beam_logits[seq.seq_id]))
            else:
                samples = out.sampled[seq.seq_id]
                if s.draft_token_ids:
                    self._count_drafts(len(s.draft_token_ids), len(samples[0].token_ids) - 1)
                targets = self._fan_out(request, seq, len(samples))
                request_deltas = deltas.setdefault(request.request_id, [])
                for target, sampled in zip(targets, samples, strict=True):
                    request_deltas.append(self._append_sampled(request, target, sampled, len(s.draft_token_ids)))
                _mark_token_time(request, now, len(samples[0].token_ids))
        outputs = [self._after_step(self.requests[rid], d) for rid, d in deltas.items()]
        for request_id, rows in beam_rows.items():
            request = self.requests[request_id]
            if self.beam_search.step(request, rows):  # a search step ran: every beam got a token
                _mark_token_time(request, now)
                if not request.live_seqs:
                    outputs.append(self._after_step(request, []))
        return outputs

    def _add_prompt_logprobs(self, request: Request, s: ScheduledSeq, out: ModelRunnerOutput) -> None:
        entries = out.prompt_logprobs.get(s.seq.seq_id)
        if entries is None or request.prompt_logprobs is None:
            return
        if s.start == 0:
            request.prompt_logprobs = [None]  # a recompute after preemption starts over
        request.prompt_logprobs += entries

    def _fan_out(self, request: Request, seq: Sequence, num_samples: int) -> list[Sequence]:
        """seq, plus num_samples - 1 forks of it (the n samples of a request at its first token)."""
        targets = [seq]
        for index in range(1, num_samples):
            targets.append(self.fork(request, seq, request.sample_generators[index], index=index))
        return targets

    def _append_sampled(self, request: Request, seq: Sequence, sampled: SampledTokens,
                        num_drafts: int) -> SeqDelta:
        """Append the sampled tokens to seq one by one until one ends it; keep the KV of accepted drafts."""
        delta = SeqDelta(seq.index, new_logprobs=[] if sampled.top is not None else None,
                         new_processed_top=[] if sampled.processed_top is not None else None)
        for i, token in enumerate(sampled.token_ids):
            self.append(request, seq, token, seq.cumulative_logprob + sampled.logprobs[i])
            delta.new_token_ids.append(token)
            delta.new_drafted.append(i < sampled.num_accepted_drafts)
            if delta.new_logprobs is not None:
                delta.new_logprobs.append(sampled.top[i])
            if delta.new_processed_top is not None:
                delta.new_processed_top.append(sampled.processed_top[i])
            stop = check_stop(seq, request.params, self.eos_token_ids, self.max_model_len)
            if (stop is None or stop[0] is FinishReason.LENGTH) and seq.grammar is not None:
                grammar_stop = _grammar_stop(seq)  # a complete document ends with "stop", even at max_tokens
                if grammar_stop is not None:
                    stop, delta.grammar_complete = grammar_stop, True
            if stop is not None:
                self._finish_sequence(seq, *stop)
                break
        if num_drafts and not seq.is_finished:
            # drafts before the last accepted token were right: their K/V (computed this step) stay;
            # the slots of the rejected ones are given back
            seq.num_computed_tokens = seq.num_tokens - 1
            self.kv.truncate(seq, seq.num_computed_tokens)
            self.kv.cache_full_blocks(seq, request.cache_salt)
        delta.cumulative_logprob = seq.cumulative_logprob
        delta.finish_reason, delta.stop_reason = seq.finish_reason, seq.stop_reason
        return delta

    def _after_step(self, request: Request, deltas: list[SeqDelta]) -> EngineCoreOutput:
        if not request.live_seqs and not request.is_finished:
            self._finish_request(request)
        return self._core_output(request, deltas)

    def _core_output(self, request: Request, deltas: list[SeqDelta], replace: bool = False) -> EngineCoreOutput:
        done = request.is_finished
        beam = not replace and request.params.use_beam_search and done and request.beam_state is not None
        prompt_complete = request.prompt_logprobs is not None and len(request.prompt_logprobs) >= \
            len(request.prompt_token_ids)
        return EngineCoreOutput(
            request.request_id, self.beam_search.final_deltas(request) if beam else deltas, done,
            request.metrics, max(request.num_cached_tokens, 0),
            prompt_logprobs=request.prompt_logprobs if prompt_complete else None,
            replace=beam or replace,
            beam_trace=request.beam_state.trace if beam and request.beam_state.keep_trace else None)

    # ---- the narrow interface beam search (and the fan-out) use ---------------------------------

    def new_sequence(self, request: Request, token_ids: list[int], generator: torch.Generator | None,
                     index: int = 0) -> Sequence:
        self._seq_ids += 1
        return Sequence(self._seq_ids, token_ids, len(request.prompt_token_ids), index=index,
                        generator=generator)

    def fork(self, request: Request, parent: Sequence, generator: torch.Generator | None = None,
             index: int | None = None) -> Sequence:
        """A new sequence of request sharing parent's tokens and KV blocks (parent's generator unless given)."""
        child = self.new_sequence(request, list(parent.token_ids), generator or parent.generator,
                                  index=len(request.seqs) if index is None else index)
        child.num_computed_tokens = parent.num_computed_tokens
        child.cumulative_logprob = parent.cumulative_logprob
        child.grammar = parent.grammar.fork() if parent.grammar is not None else None
        self.kv.fork(parent, child)
        request.seqs.append(child)
        return child

    def append(self, request: Request, seq: Sequence, token: int, cumulative_logprob: float) -> None:
        """Append one generated token to seq (and advance its grammar)."""
        if seq.grammar is not None and not seq.grammar.accept(token):
            # cannot happen while the sampler applies the grammar's mask; never let it pass unnoticed
            logger.error("request %s: grammar rejected token %d: %s", request.request_id, token, seq.grammar.error)
        seq.token_ids.append(token)
        seq.cumulative_logprob = cumulative_logprob
        request.metrics.num_generated_tokens += 1
        self.counters.generation_tokens += 1

    def free(self, seq: Sequence) -> None:
        """Give back seq's KV blocks (a beam that was dropped or finished)."""
        self.kv.free(seq)

    def rank(self, request: Request, seqs: list[Sequence]) -> None:
        """Set request's sequences, in rank order (beam search, after each of its steps)."""
        for index, seq in enumerate(seqs):
            seq.index = index
        request.seqs = seqs

    # ---- the end ----------------------------------------------------------------------------

    def _finish_sequence(self, seq: Sequence, reason: FinishReason, stop_reason: str | int | None) -> None:
        if seq.is_finished:
            return
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        self.kv.free(seq)

    def _finish_request(self, request: Request) -> None:
        """Remove a finished or aborted request and free all its blocks."""
        for seq in request.seqs:
            self.kv.free(seq)
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = RequestStatus.FINISHED
        if request.metrics.finished_time is None:
            request.metrics.finished_time = time.perf_counter()
        self.requests.pop(request.request_id, None)


def _grammar_stop(seq: Sequence) -> tuple[FinishReason, None] | None:
    """The structured output is complete ("stop"), or its grammar broke ("abort")."""
    if seq.grammar.error is not None:
        return FinishReason.ABORT, None
    return (FinishReason.STOP, None) if seq.grammar.is_terminated else None


def _mark_token_time(request: Request, now: float, num_positions: int = 1) -> None:
    m = request.metrics
    if m.first_token_time is None:
        m.first_token_time = now
    if m.last_token_time != now:
        m.num_token_steps += num_positions
    m.last_token_time = now
