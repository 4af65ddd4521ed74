"""Continuous batching: which sequences run in the next step, and how many tokens each.

Each step mixes decodes (one token per running sequence) and prefill chunks (prompt tokens of
new or preempted requests) under a token budget (``max_num_batched_tokens``) and a sequence cap
(``max_num_seqs``). Requests are served first come, first served. When the KV cache runs out of
blocks, the newest running request is preempted: its blocks are freed and it goes back to the
front of the waiting queue, to be recomputed later (its generated tokens are kept).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from tokenmill.engine.kv_cache import BlockCopy, BlockManager, NoFreeBlocks
from tokenmill.engine.request import Request, RequestStatus, Sequence


@dataclass
class ScheduledSeq:
    """One sequence of the step and the number of its tokens computed in this step."""

    request: Request
    seq: Sequence
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """True when this step computes the sequence's last token, so its next token is sampled."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    """The plan of one step: decodes first, then prefill chunks."""

    scheduled: list[ScheduledSeq] = field(default_factory=list)
    block_copies: list[BlockCopy] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    """Holds the waiting and running queues and plans each step."""

    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions_total = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

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
                n = min(seq.num_tokens - seq.num_computed_tokens, budget)
                if n <= 0:
                    continue
                if not self._allocate_or_preempt(request, seq, n, out):
                    break  # the request itself was preempted: its other sequences (beams, samples) wait too
                out.scheduled.append(ScheduledSeq(request, seq, n))
                budget -= n
                num_seqs += 1
        while self.waiting and budget > 0 and num_seqs < self.max_num_seqs:
            request = self.waiting[0]
            added = self._admit(request, budget, self.max_num_seqs - num_seqs, out)
            if not added:
                break
            budget -= sum(s.num_new_tokens for s in added)
            num_seqs += len(added)
        # decodes first: the attention metadata expects single-token sequences at the front
        out.scheduled.sort(key=lambda s: s.num_new_tokens != 1)
        return out

    def _admit(self, request: Request, budget: int, seq_room: int, out: SchedulerOutput) -> list[ScheduledSeq]:
        """Move the first waiting request to running if at least its first chunk fits."""
        added: list[ScheduledSeq] = []
        for seq in request.live_seqs[:seq_room]:
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if n <= 0:
                break
            try:
                out.block_copies += self.blocks.allocate(seq, seq.num_computed_tokens + n)
            except NoFreeBlocks:
                break
            added.append(ScheduledSeq(request, seq, n))
            budget -= n
        if added:
            self.waiting.popleft()
            self.running.append(request)
            request.status = RequestStatus.RUNNING
            if request.metrics.scheduled_time is None:
                request.metrics.scheduled_time = time.perf_counter()
            out.scheduled += added
        return added

    def _allocate_or_preempt(self, request: Request, seq: Sequence, n: int, out: SchedulerOutput) -> bool:
        """Allocate blocks for n more tokens of seq, preempting the newest other requests when short."""
        while True:
            try:
                out.block_copies += self.blocks.allocate(seq, seq.num_computed_tokens + n)
                return True
            except NoFreeBlocks:
                victim = self.running[-1]
                self.preempt(victim, out)
                if victim is request:
                    return False

    def preempt(self, request: Request, out: SchedulerOutput | None = None) -> None:
        """Free all of request's blocks and put it back at the front of the waiting queue."""
        for seq in request.seqs:
            self.blocks.free(seq)
            seq.num_computed_tokens = 0
        self.running.remove(request)
        self.waiting.appendleft(request)
        request.status = RequestStatus.WAITING
        self.num_preemptions_total += 1
        if out is not None:
            out.preempted.append(request)
            out.scheduled = [s for s in out.scheduled if s.request is not request]

    def finish(self, request: Request) -> None:
        """Remove a finished or aborted request and free its blocks."""
        for seq in request.seqs:
            self.blocks.free(seq)
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = RequestStatus.FINISHED
