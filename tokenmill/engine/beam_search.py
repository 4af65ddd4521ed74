"""Beam search inside the batching engine: one request's beams are forked Sequences that share KV blocks.

Every live beam is an ordinary Sequence in the decode batch. When all beams of a request have
their next-token logits, one search step runs (the rule of transformers' ``generate(num_beams=B)``,
so results are token-identical to it on the same weights):

1. Scores: ``log_softmax(logits)`` of each beam, through steps 1-3 of the sampling pipeline (logit_bias,
   EOS and stop ids masked while fewer than min_tokens are out, the penalties), plus the beam's
   cumulative log-probability; flattened over beams x vocab.
2. Candidates: the top ``K = max(2, 1 + number of stop ids) * B`` of them, so that at least B
   candidates survive even when every beam's best continuation ends it.
3. Running beams: the best B candidates that do not end (EOS, stop id, stop string, max_tokens).
4. Finished hypotheses: a candidate among the first B that ends is scored
   ``cumulative_logprob / generated_len ** length_penalty`` and kept in a list of the best B.
5. Stop when the list is full and early_stopping is True, when no running beam can beat the worst
   kept hypothesis any more (the heuristic of transformers, see ``_can_still_improve``), or when
   no beam runs (max_tokens: the best B continuations of the last step are all finished).

KV memory: a beam chosen by k candidates is forked k-1 times; the forks share its blocks and only
the block each writes into is copied (copy-on-write in KVCacheManager.allocate_slots). A beam
chosen by none is freed at once.

The search changes request state only through its host (the Scheduler): ``fork``, ``free``,
``append`` and ``rank``. It keeps per beam a detokenizer (stop strings are text) and, when asked,
the raw logprobs; the final text is made on the API side from the hypotheses' tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.engine.request import FinishReason, Request, Sequence, TokenLogprobs
from tokenmill.engine.sampler import SampleRow, SamplingBatch, apply_penalties
from tokenmill.engine.step import SeqDelta


class BeamHost(Protocol):
    """What beam search may do to a request: the Scheduler implements it."""

    eos_token_ids: list[int]
    max_model_len: int

    def fork(self, request: Request, parent: Sequence) -> Sequence: ...
    def free(self, seq: Sequence) -> None: ...
    def append(self, request: Request, seq: Sequence, token: int, cumulative_logprob: float) -> None: ...
    def rank(self, request: Request, seqs: list[Sequence]) -> None: ...
    def new_sequence(self, request: Request, token_ids: list[int], generator: Any, index: int = 0) -> Sequence: ...

# A stop decision: why a candidate ends, and the stop_reason (token id or stop string) reported.
Stop = tuple[FinishReason, str | int | None]


@dataclass
class Hypothesis:
    """A finished beam: its output tokens and its length-normalized score."""

    token_ids: list[int]
    score: float
    finish_reason: FinishReason
    stop_reason: str | int | None
    logprobs: list[TokenLogprobs] | None


@dataclass
class Candidate:
    """One continuation considered in a step: beam ``parent`` followed by ``token_id``."""

    parent: int  # index of the parent in this step's beam list (best beam first)
    token_id: int
    cumulative_logprob: float  # parent's cumulative log-probability + log p(token_id)
    score: float  # cumulative_logprob / generated_len ** length_penalty
    stop: Stop | None  # set when this continuation ends the beam
    status: str = "pruned"  # "kept" | "pruned" | "finished"
    beam: int | None = None  # index in the next step's beam list when kept


@dataclass
class BeamGroup:
    """The search state of one request (stored on ``Request.beam_state``)."""

    num_beams: int
    pending: dict[int, torch.Tensor] = field(default_factory=dict)  # seq_id -> [V] logits, until all beams have one
    finished: list[Hypothesis] = field(default_factory=list)  # best first, at most num_beams
    can_improve: bool = True  # transformers' early-stop heuristic (sticky once False)
    done: bool = False
    keep_trace: bool = False  # the playground asked for the per-step candidates
    trace: list[list[dict]] = field(default_factory=list)  # per step, every candidate (when kept)
    final: list[Sequence] | None = None  # the reported hypotheses, once done
    detokenizers: dict[int, IncrementalDetokenizer] = field(default_factory=dict)  # seq_id -> its text so far
    logprobs: dict[int, list[TokenLogprobs]] = field(default_factory=dict)  # seq_id -> raw logprobs, if asked

    @property
    def is_full(self) -> bool:
        return len(self.finished) >= self.num_beams


class BeamSearch:
    """Runs the beam search steps of every beam request of an engine core."""

    def __init__(self, host: BeamHost, tokenizer: Any) -> None:
        self.host = host
        self.tokenizer = tokenizer  # stop strings are matched on text; trace entries show tokens

    # ---- the scheduler's calls --------------------------------------------------------------

    def step(self, request: Request, seq_rows: list[tuple[Sequence, torch.Tensor]]) -> bool:
        """Take the raw logits rows ([V] per beam) computed this step; True when a search step ran.

        Beams may be computed in different engine steps (a sequence cap, preemption): their rows wait
        in the group until every live beam has one, then one search step runs. When the search
        ends, request's sequences are the final hypotheses (all finished, holding no blocks).
        """
        group = request.beam_state
        if group is None:
            group = request.beam_state = self._new_group(request)
        for seq, row in seq_rows:
            group.pending[seq.seq_id] = row
        beams = request.live_seqs  # best first: _update_beams keeps them in rank order
        if any(s.seq_id not in group.pending for s in beams):
            for seq, _ in seq_rows:  # they wait past this step: copy them out of the runner's logits
                group.pending[seq.seq_id] = group.pending[seq.seq_id].clone()
            return False
        rows = torch.stack([group.pending.pop(s.seq_id) for s in beams])  # [b, V]
        self._advance(request, group, beams, rows)
        if group.done:
            self._finalize(request, group)
        return True

    def final_deltas(self, request: Request) -> list[SeqDelta]:
        """The reported hypotheses (best first) as whole-output deltas, once the search is done."""
        group = request.beam_state
        return [SeqDelta(i, list(seq.output_token_ids), group.logprobs.get(seq.seq_id), None,
                         seq.cumulative_logprob, seq.finish_reason, seq.stop_reason)
                for i, seq in enumerate(group.final or [])]

    def _new_group(self, request: Request) -> BeamGroup:
        params = request.params
        group = BeamGroup(params.num_beams, keep_trace=params.return_beam_trace)
        (seq,) = request.seqs
        group.detokenizers[seq.seq_id] = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, params)
        if params.logprobs is not None:
            group.logprobs[seq.seq_id] = []
        return group

    # ---- one search step --------------------------------------------------------------------

    def _advance(self, request: Request, group: BeamGroup, beams: list[Sequence], logits: torch.Tensor) -> None:
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # [b, V]
        stop_ids = self._stop_ids(request)
        logprobs = self._apply_controls(request, beams, logprobs)
        candidates = self._top_candidates(request, beams, logprobs, len(stop_ids))
        kept = self._select(request, group, beams, candidates, logprobs)
        if group.keep_trace:
            group.trace.append([self._trace_entry(c) for c in candidates])
        self._update_beams(request, group, beams, kept, logprobs)
        group.done = not request.live_seqs or not self._can_continue(request, group)

    def _apply_controls(self, request: Request, beams: list[Sequence], logprobs: torch.Tensor) -> torch.Tensor:
        """Steps 1-3 of the sampling pipeline (logit_bias, the min_tokens mask of EOS and stop ids, the
        penalties) on the log-probabilities, where transformers' logits processors act in beam search."""
        params = request.params
        eos = [] if params.ignore_eos else self.host.eos_token_ids
        rows = [SampleRow(params, s.prompt_token_ids, s.output_token_ids, None) for s in beams]
        batch = SamplingBatch.build(rows, logprobs.shape[-1], eos, logprobs.device)
        return apply_penalties(logprobs, batch) if batch.needs_processing else logprobs

    def _top_candidates(self, request: Request, beams: list[Sequence], logprobs: torch.Tensor,
                        num_stop_ids: int) -> list[Candidate]:
        """The top K continuations over all beams by cumulative log-probability, best first."""
        params = request.params
        vocab = logprobs.shape[-1]
        # float32 throughout, like transformers, so near-ties break the same way
        cumulative = torch.tensor([s.cumulative_logprob for s in beams], dtype=torch.float32,
                                  device=logprobs.device)
        totals = (logprobs + cumulative[:, None]).flatten()  # [b * V]
        k = min(max(2, 1 + num_stop_ids) * params.num_beams, totals.numel())
        top, index = torch.topk(totals, k)
        generated_len = beams[0].num_output_tokens + 1
        scores = top / (generated_len ** params.length_penalty)
        out = []
        for cum, score, flat in zip(top.tolist(), scores.tolist(), index.tolist(), strict=True):
            parent, token = divmod(flat, vocab)
            out.append(Candidate(parent, token, cum, score, self._check_stop(request, beams[parent], token)))
        return out

    def _select(self, request: Request, group: BeamGroup, beams: list[Sequence], candidates: list[Candidate],
                logprobs: torch.Tensor) -> list[Candidate]:
        """Mark the kept and finished candidates; returns the kept ones (the next beams, best first)."""
        num_beams = request.params.num_beams
        # both conditions as they were before this step, like transformers
        accepting = group.can_improve and not (group.is_full and _early_stopping_true(request))
        new: list[tuple[Candidate, Hypothesis]] = []
        for c in candidates[:num_beams]:
            # only the first num_beams candidates may finish; the others exist to refill the beams
            if c.stop is not None and accepting:
                new.append((c, self._hypothesis(request, beams[c.parent], c, logprobs[c.parent])))
        if new:
            # stable sort: on a tie the older hypothesis stays ahead
            merged = sorted(group.finished + [h for _, h in new], key=lambda h: -h.score)
            group.finished = merged[:num_beams]
            admitted = {id(h) for h in group.finished}
            for c, h in new:
                c.status = "finished" if id(h) in admitted else "pruned"
        kept = [c for c in candidates if c.stop is None][:num_beams]
        for slot, c in enumerate(kept):
            c.status, c.beam = "kept", slot
        return kept

    def _can_continue(self, request: Request, group: BeamGroup) -> bool:
        """transformers' stopping rule, checked after the step (the live beams are best first)."""
        if group.is_full and _early_stopping_true(request):
            return False
        group.can_improve = group.can_improve and self._can_still_improve(request, group)
        return group.can_improve

    def _can_still_improve(self, request: Request, group: BeamGroup) -> bool:
        """Could the best running beam still beat the worst kept hypothesis?

        Only decided once num_beams hypotheses are kept. The best beam's score is estimated at its
        current length, or at the longest allowed length when early_stopping is "never" and a
        positive length_penalty favours long outputs.
        """
        if not group.is_full:
            return True
        params = request.params
        best = max(request.live_seqs, key=lambda s: s.cumulative_logprob)
        length = best.num_output_tokens
        if params.early_stopping == "never" and params.length_penalty > 0.0:
            length = self._max_new_tokens(request, best)
        best_possible = torch.tensor(best.cumulative_logprob, dtype=torch.float32) / (length ** params.length_penalty)
        worst = torch.tensor(group.finished[-1].score, dtype=torch.float32)
        return bool(best_possible > worst)

    # ---- candidates -------------------------------------------------------------------------

    def _stop_ids(self, request: Request) -> list[int]:
        params = request.params
        eos = [] if params.ignore_eos else list(self.host.eos_token_ids)
        return sorted(set(eos) | set(params.stop_token_ids))

    def _max_new_tokens(self, request: Request, seq: Sequence) -> int:
        room = self.host.max_model_len - seq.num_prompt_tokens
        return room if request.params.max_tokens is None else min(request.params.max_tokens, room)

    def _check_stop(self, request: Request, parent: Sequence, token: int) -> Stop | None:
        """Whether parent + token ends: the rules of stopping.check_stop plus stop strings."""
        params = request.params
        num_out = parent.num_output_tokens + 1
        if num_out > params.min_tokens:
            if not params.ignore_eos and token in self.host.eos_token_ids:
                return FinishReason.STOP, None
            if token in params.stop_token_ids:
                return FinishReason.STOP, token
        if params.stop:
            detokenizer = request.beam_state.detokenizers[parent.seq_id].clone()
            stop_string = detokenizer.add_tokens([token]).stop_string
            if stop_string is not None:
                return FinishReason.STOP, stop_string
        if num_out >= self._max_new_tokens(request, parent):
            return FinishReason.LENGTH, None
        return None

    def _hypothesis(self, request: Request, parent: Sequence, c: Candidate, row: torch.Tensor) -> Hypothesis:
        """The finished hypothesis parent + c.token_id."""
        reason, stop_reason = c.stop
        logprobs = request.beam_state.logprobs.get(parent.seq_id)
        if logprobs is not None:
            logprobs = logprobs + [self._logprob_entry(request, row, c.token_id)]
        return Hypothesis(parent.output_token_ids + [c.token_id], c.score, reason, stop_reason, logprobs)

    # ---- moving the beams -------------------------------------------------------------------

    def _update_beams(self, request: Request, group: BeamGroup, beams: list[Sequence], kept: list[Candidate],
                      logprobs: torch.Tensor) -> None:
        """Fork, extend and free sequences so that request's sequences are the kept beams, best first."""
        children: dict[int, list[Candidate]] = {}
        for c in kept:
            children.setdefault(c.parent, []).append(c)
        owner: dict[int, Sequence] = {}  # id(candidate) -> the sequence that will carry it
        for index, beam in enumerate(beams):
            chosen = children.get(index, [])
            if not chosen:
                self._drop(group, beam)  # its blocks go back at once
                continue
            owner[id(chosen[0])] = beam
            for c in chosen[1:]:  # fork before the parent is extended
                owner[id(c)] = self._fork(request, group, beam)
        new_beams = []
        for c in kept:
            seq = owner[id(c)]
            self._extend(request, group, seq, c, logprobs[c.parent])
            new_beams.append(seq)
        self.host.rank(request, new_beams)

    def _fork(self, request: Request, group: BeamGroup, parent: Sequence) -> Sequence:
        child = self.host.fork(request, parent)
        group.detokenizers[child.seq_id] = group.detokenizers[parent.seq_id].clone()
        if parent.seq_id in group.logprobs:
            group.logprobs[child.seq_id] = list(group.logprobs[parent.seq_id])
        return child

    def _drop(self, group: BeamGroup, beam: Sequence) -> None:
        self.host.free(beam)
        group.detokenizers.pop(beam.seq_id, None)
        group.logprobs.pop(beam.seq_id, None)

    def _extend(self, request: Request, group: BeamGroup, seq: Sequence, c: Candidate,
                row_logprobs: torch.Tensor) -> None:
        """Append c's token to seq (a kept beam: by construction it does not end here)."""
        if seq.seq_id in group.logprobs:
            group.logprobs[seq.seq_id].append(self._logprob_entry(request, row_logprobs, c.token_id))
        self.host.append(request, seq, c.token_id, c.cumulative_logprob)
        group.detokenizers[seq.seq_id].add_tokens([c.token_id])

    def _logprob_entry(self, request: Request, row: torch.Tensor, token: int) -> TokenLogprobs:
        """The chosen token's raw logprob and rank, plus the top request.params.logprobs alternatives."""
        chosen = float(row[token])
        rank = 1 + int((row > chosen).sum())
        top = {}
        k = request.params.logprobs or 0
        if k:
            values, ids = torch.topk(row, k)
            top = dict(zip(ids.tolist(), values.tolist(), strict=True))
        return TokenLogprobs(token, chosen, rank, top)

    # ---- the end ----------------------------------------------------------------------------

    def _finalize(self, request: Request, group: BeamGroup) -> None:
        """Free the running beams and make the best n hypotheses the request's (finished) sequences."""
        for beam in request.seqs:
            self._drop(group, beam)
        final = []
        for index, h in enumerate(group.finished[:request.params.n]):
            seq = self.host.new_sequence(request, request.prompt_token_ids + h.token_ids, None, index=index)
            seq.cumulative_logprob, seq.finish_reason, seq.stop_reason = h.score, h.finish_reason, h.stop_reason
            if h.logprobs is not None:
                group.logprobs[seq.seq_id] = h.logprobs
            final.append(seq)
        group.final = final
        self.host.rank(request, final)

    def _trace_entry(self, c: Candidate) -> dict:
        return {"parent": c.parent, "token_id": c.token_id,
                "token": self.tokenizer.decode([c.token_id], skip_special_tokens=False),
                "cumulative_logprob": c.cumulative_logprob, "score": c.score, "status": c.status,
                "beam": c.beam}


def _early_stopping_true(request: Request) -> bool:
    value = request.params.early_stopping
    return value != "never" and bool(value)
