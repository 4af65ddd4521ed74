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
the block each writes into is copied (copy-on-write in BlockManager.allocate). A beam chosen by
none is freed at once.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from tokenmill.engine.request import FinishReason, Request, Sequence
from tokenmill.engine.sampler import SampleRow, SamplingBatch, apply_penalties
from tokenmill.outputs import Logprob, PositionLogprobs

if TYPE_CHECKING:
    from tokenmill.engine.llm_engine import LLMEngine

# A stop decision: why a candidate ends, and the stop_reason (token id or stop string) reported.
Stop = tuple[FinishReason, str | int | None]


@dataclass
class Hypothesis:
    """A finished beam: its output tokens and its length-normalized score."""

    token_ids: list[int]
    score: float
    finish_reason: FinishReason
    stop_reason: str | int | None
    text: str
    logprobs: list[PositionLogprobs] | None


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
    trace: list[list[dict]] = field(default_factory=list)  # per step, every candidate (for the playground)
    final: list[Sequence] | None = None  # the reported hypotheses, once done

    @property
    def is_full(self) -> bool:
        return len(self.finished) >= self.num_beams


class BeamSearch:
    """Runs the beam search steps of every beam request of an engine."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine

    # ---- engine hooks -----------------------------------------------------------------------

    def step(self, request: Request, seq_rows: list[tuple[Sequence, int]], logits: torch.Tensor) -> bool:
        """Take the logits rows ([R, V], row per (seq, row)) of request's beams; True when the request ended.

        Beams may be computed in different engine steps (a sequence cap, preemption): their rows wait
        in the group until every live beam has one, then one search step runs.
        """
        group = request.beam_state
        if group is None:
            group = request.beam_state = BeamGroup(request.params.num_beams)
        for seq, row in seq_rows:
            group.pending[seq.seq_id] = logits[row]
        beams = request.live_seqs  # best first: _update_beams keeps them in rank order
        if any(s.seq_id not in group.pending for s in beams):
            for seq, _ in seq_rows:  # they wait past this step: copy them out of the runner's logits
                group.pending[seq.seq_id] = group.pending[seq.seq_id].clone()
            return False
        rows = torch.stack([group.pending.pop(s.seq_id) for s in beams])  # [b, V]
        self._advance(request, group, beams, rows)
        self.engine._mark_token_time(request, time.perf_counter())
        if group.done:
            self._finalize(request, group)
        return group.done

    def ranked(self, request: Request) -> list[Sequence]:
        """The sequences reported for request: the best n hypotheses once done, else the live beams."""
        group = request.beam_state
        if group is not None and group.final is not None:
            return group.final
        beams = sorted(request.seqs, key=lambda s: -s.cumulative_logprob)
        return beams[:request.params.n]

    # ---- one search step --------------------------------------------------------------------

    def _advance(self, request: Request, group: BeamGroup, beams: list[Sequence], logits: torch.Tensor) -> None:
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # [b, V]
        stop_ids = self._stop_ids(request)
        logprobs = self._apply_controls(request, beams, logprobs)
        candidates = self._top_candidates(request, beams, logprobs, len(stop_ids))
        kept = self._select(request, group, beams, candidates, logprobs)
        group.trace.append([self._trace_entry(c) for c in candidates])
        self._update_beams(request, beams, kept, logprobs)
        group.done = not request.live_seqs or not self._can_continue(request, group)

    def _apply_controls(self, request: Request, beams: list[Sequence], logprobs: torch.Tensor) -> torch.Tensor:
        """Steps 1-3 of the sampling pipeline (logit_bias, the min_tokens mask of EOS and stop ids, the
        penalties) on the log-probabilities, where transformers' logits processors act in beam search."""
        params = request.params
        eos = [] if params.ignore_eos else self.engine.eos_token_ids
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
        eos = [] if params.ignore_eos else list(self.engine.eos_token_ids)
        return sorted(set(eos) | set(params.stop_token_ids))

    def _max_new_tokens(self, request: Request, seq: Sequence) -> int:
        room = self.engine.max_model_len - seq.num_prompt_tokens
        return room if request.params.max_tokens is None else min(request.params.max_tokens, room)

    def _check_stop(self, request: Request, parent: Sequence, token: int) -> Stop | None:
        """Whether parent + token ends: the rules of stopping.check_stop plus stop strings."""
        params = request.params
        num_out = parent.num_output_tokens + 1
        if num_out > params.min_tokens:
            if not params.ignore_eos and token in self.engine.eos_token_ids:
                return FinishReason.STOP, None
            if token in params.stop_token_ids:
                return FinishReason.STOP, token
        if params.stop:
            stop_string = _clone_detokenizer(parent).add_tokens([token]).stop_string
            if stop_string is not None:
                return FinishReason.STOP, stop_string
        if num_out >= self._max_new_tokens(request, parent):
            return FinishReason.LENGTH, None
        return None

    def _hypothesis(self, request: Request, parent: Sequence, c: Candidate, row: torch.Tensor) -> Hypothesis:
        """The finished hypothesis parent + c.token_id, with its final text."""
        reason, stop_reason = c.stop
        detok = _clone_detokenizer(parent)
        text = parent.text
        if not (reason is FinishReason.STOP and not isinstance(stop_reason, str)):
            # the text of EOS / a stop token never reaches the output (as in LLMEngine.append_token)
            text += detok.add_tokens([c.token_id]).delta_text
        if not isinstance(stop_reason, str):
            text += detok.finish()
        logprobs = None
        if parent.logprobs is not None:
            logprobs = parent.logprobs + [self._logprob_entry(request, row, c.token_id)]
        return Hypothesis(parent.output_token_ids + [c.token_id], c.score, reason, stop_reason, text, logprobs)

    # ---- moving the beams -------------------------------------------------------------------

    def _update_beams(self, request: Request, beams: list[Sequence], kept: list[Candidate],
                      logprobs: torch.Tensor) -> None:
        """Fork, extend and free sequences so that request.seqs are the kept beams, best first."""
        children: dict[int, list[Candidate]] = {}
        for c in kept:
            children.setdefault(c.parent, []).append(c)
        owner: dict[int, Sequence] = {}  # id(candidate) -> the sequence that will carry it
        for index, beam in enumerate(beams):
            chosen = children.get(index, [])
            if not chosen:
                self.engine.block_manager.free(beam)  # dropped: its blocks go back at once
                continue
            owner[id(chosen[0])] = beam
            for c in chosen[1:]:  # fork before the parent is extended
                owner[id(c)] = self._fork(request, beam)
        new_beams = []
        for c in kept:
            seq = owner[id(c)]
            self._extend(request, seq, c, logprobs[c.parent])
            new_beams.append(seq)
        request.seqs = new_beams

    def _fork(self, request: Request, parent: Sequence) -> Sequence:
        child = self.engine.fork_sequence(request, parent)
        child.detokenizer = _clone_detokenizer(parent)
        child.text = parent.text
        if parent.logprobs is not None:
            child.logprobs = list(parent.logprobs)
        return child

    def _extend(self, request: Request, seq: Sequence, c: Candidate, row_logprobs: torch.Tensor) -> None:
        """Append c's token to seq (a kept beam: by construction it does not end here)."""
        if seq.logprobs is not None:
            seq.logprobs.append(self._logprob_entry(request, row_logprobs, c.token_id))
        seq.token_ids.append(c.token_id)
        seq.cumulative_logprob = c.cumulative_logprob
        seq.text += seq.detokenizer.add_tokens([c.token_id]).delta_text
        request.metrics.num_generated_tokens += 1
        self.engine.generation_tokens_total += 1

    def _logprob_entry(self, request: Request, row: torch.Tensor, token: int) -> PositionLogprobs:
        """The chosen token's raw logprob and rank, plus the top request.params.logprobs alternatives."""
        decode = self.engine.tokenizer.decode
        chosen = float(row[token])
        rank = 1 + int((row > chosen).sum())
        entry = {token: Logprob(chosen, rank, decode([token], skip_special_tokens=False))}
        k = request.params.logprobs or 0
        if k:
            values, ids = torch.topk(row, k)
            for r, (lp, tid) in enumerate(zip(values.tolist(), ids.tolist(), strict=True), start=1):
                if tid != token:
                    entry[tid] = Logprob(lp, r, decode([tid], skip_special_tokens=False))
        return entry

    # ---- the end ----------------------------------------------------------------------------

    def _finalize(self, request: Request, group: BeamGroup) -> None:
        """Free the running beams and turn the best n hypotheses into the reported sequences."""
        for beam in request.seqs:
            self.engine.block_manager.free(beam)
        final = []
        for h in group.finished[:request.params.n]:
            seq = Sequence(-1, request.prompt_token_ids + h.token_ids, len(request.prompt_token_ids),
                           cumulative_logprob=h.score, logprobs=h.logprobs, finish_reason=h.finish_reason,
                           stop_reason=h.stop_reason, text=h.text)
            seq.delta_text, seq.delta_token_ids = h.text, list(h.token_ids)
            seq.delta_logprobs = list(h.logprobs or [])
            final.append(seq)
        group.final = final
        request.seqs = final

    def _trace_entry(self, c: Candidate) -> dict:
        return {"parent": c.parent, "token_id": c.token_id,
                "token": self.engine.tokenizer.decode([c.token_id], skip_special_tokens=False),
                "cumulative_logprob": c.cumulative_logprob, "score": c.score, "status": c.status,
                "beam": c.beam}


def _early_stopping_true(request: Request) -> bool:
    value = request.params.early_stopping
    return value != "never" and bool(value)


def _clone_detokenizer(seq: Sequence):
    """An independent copy of seq's detokenizer (the tokenizer itself is shared)."""
    clone = copy.copy(seq.detokenizer)
    clone._ids = list(seq.detokenizer._ids)
    clone.stop_strings = seq.detokenizer.stop_strings
    return clone
