"""Speculative decoding: proposers of draft tokens, and the rejection sampling that verifies them.

Each step, before ``schedule()``, the engine asks its proposer for drafts for the scheduler's
``speculation_candidates()``; the scheduler feeds ``[last token] + drafts`` in one forward, the
sampler verifies the drafts row by row, and ``update_from_output`` keeps the accepted run plus
one token the target model chose itself (the token at the first rejected position, or a bonus
token after the last draft).

Proposers (``Proposer.propose``):

* ``NgramProposer`` (prompt lookup, no model): the last n tokens (n from prompt_lookup_max down
  to prompt_lookup_min) are looked up earlier in the prompt + output; the tokens that followed
  their most recent earlier occurrence are the drafts. Drafts are one-hot (q = 1 for the draft).
  How many it proposes adapts per sequence, as transformers' assisted generation does: +2 after
  a step that accepted every draft, -1 after one that did not (between 1 and k), since each
  draft costs compute in the verifying forward whether it is kept or not.
* ``DraftModelProposer`` (engine/draft_model.py): a smaller model with the same tokenizer,
  decoding k tokens ahead over its own paged KV cache; its drafts come with their distribution q.

Verification keeps the target distribution exactly (``rejection_sample``): at each draft
position the target's distribution p is computed with every sampling control applied, exactly
as in plain decoding (the row after j drafts counts them as output for penalties and min_tokens);
draft x is accepted with probability min(1, p(x) / q(x)), and on rejection the token is drawn
from max(0, p - q) normalized. Each position uses one uniform from the request's generator, as
plain decoding does; when q is one-hot (n-gram drafts, greedy requests) the test "p's own
sample, drawn with that uniform, equals x" is that same rule, so those requests produce exactly
the tokens plain decoding produces, seeded ones included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from tokenmill.engine.step import DraftProposal, SpecCandidate

if TYPE_CHECKING:
    from tokenmill.config import EngineConfig
    from tokenmill.model.loading import LoadedModel


class Proposer(Protocol):
    def propose(self, candidates: list[SpecCandidate], live_seq_ids: set[int]) -> dict[int, DraftProposal]:
        """Drafts for the candidates, keyed by seq_id (missing: no drafts); state kept for other
        sequences not in ``live_seq_ids`` may be dropped (they finished or were preempted)."""
        ...


@dataclass
class _LastProposal:
    num_tokens: int  # the sequence's length when proposed
    token_ids: list[int]


class NgramProposer:
    """Prompt lookup: propose what followed the sequence's last n tokens where they occurred before."""

    def __init__(self, num_speculative_tokens: int, prompt_lookup_min: int, prompt_lookup_max: int) -> None:
        self.k = num_speculative_tokens
        self.n_min = prompt_lookup_min
        self.n_max = prompt_lookup_max
        self._length: dict[int, int] = {}  # seq_id -> drafts to propose next (adaptive, 1 .. k)
        self._last: dict[int, _LastProposal] = {}

    def propose(self, candidates: list[SpecCandidate], live_seq_ids: set[int]) -> dict[int, DraftProposal]:
        for seq_id in [i for i in self._length if i not in live_seq_ids]:
            del self._length[seq_id]
            self._last.pop(seq_id, None)
        proposals = {}
        for c in candidates:
            seq_id = c.seq.seq_id
            length = self._adapt(seq_id, c.seq.token_ids)
            drafts = ngram_lookup(c.seq.token_ids, min(length, c.max_drafts), self.n_min, self.n_max)
            if drafts:
                proposals[seq_id] = DraftProposal(drafts)
                self._last[seq_id] = _LastProposal(len(c.seq.token_ids), drafts)
        return proposals

    def _adapt(self, seq_id: int, token_ids: list[int]) -> int:
        """The draft length for seq_id, after learning how its last proposal fared."""
        length = self._length.get(seq_id, self.k)
        last = self._last.pop(seq_id, None)
        if last is not None and len(token_ids) > last.num_tokens:
            verified = token_ids[last.num_tokens:last.num_tokens + len(last.token_ids)]
            length = min(self.k, length + 2) if verified == last.token_ids else max(1, length - 1)
        self._length[seq_id] = length
        return length


def ngram_lookup(token_ids: list[int], k: int, n_min: int, n_max: int) -> list[int]:
    """Up to k tokens that followed the most recent earlier occurrence of the longest suffix of
    token_ids of length n_max .. n_min; [] when no such suffix occurred before."""
    tokens = np.asarray(token_ids, dtype=np.int64)
    length = len(tokens)
    if k < 1 or length <= n_min:
        return []
    # ends: positions e < length - 1 where tokens[e - d] == tokens[length - 1 - d] for d < n,
    # narrowed one token further back per round; the suffix itself (e = length - 1) is excluded.
    ends = np.flatnonzero(tokens[:-1] == tokens[-1])
    best = None
    for n in range(1, min(n_max, length - 1) + 1):
        if n > 1:
            ends = ends[ends >= n - 1]
            ends = ends[tokens[ends - (n - 1)] == tokens[length - n]]
        if ends.size == 0:
            break
        if n >= n_min:
            best = int(ends[-1])  # the most recent occurrence of the longest suffix found so far
    if best is None:
        return []
    return tokens[best + 1:min(best + 1 + k, length)].tolist()


def rejection_sample(final_logits: torch.Tensor, uniforms: torch.Tensor, draft_ids: torch.Tensor,
                     draft_probs: torch.Tensor) -> torch.Tensor:
    """The token at each verified draft position, for drafts drawn from a full distribution q.

    final_logits [R, V]: the target's logits after every sampling control (p = their softmax);
    uniforms [R] float64: the row's one uniform; draft_ids [R]; draft_probs [R, V] (q).
    Accept x = draft with probability a = min(1, p(x) / q(x)), i.e. when u < a; otherwise the
    token is drawn from max(0, p - q) normalized, by inverse CDF with (u - a) / (1 - a), which
    given u >= a is again uniform in [0, 1) and independent of the accept test. Returns [R]: x
    where accepted, the residual draw elsewhere (never x: its residual mass is 0).
    """
    p = final_logits.softmax(dim=-1).double()
    q = draft_probs.double()
    px = p.gather(1, draft_ids.unsqueeze(1)).squeeze(1)
    qx = q.gather(1, draft_ids.unsqueeze(1)).squeeze(1)
    accept_prob = torch.where(qx > 0, (px / qx.clamp(min=1e-300)).clamp(max=1.0), (px > 0).double())
    accepted = uniforms < accept_prob
    residual = (p - q).clamp(min=0.0)
    residual_u = ((uniforms - accept_prob) / (1.0 - accept_prob).clamp(min=1e-300)).clamp(0.0, 1.0 - 1e-12)
    cdf = residual.cumsum(dim=-1)
    resampled = torch.searchsorted(cdf, (residual_u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
    resampled = resampled.clamp(max=final_logits.shape[-1] - 1)
    return torch.where(accepted, draft_ids, resampled)


def build_proposer(config: EngineConfig, target: LoadedModel, num_blocks: int, dtype: torch.dtype,
                   device: torch.device) -> Proposer | None:
    """The proposer ``config.speculative_config`` asks for (None: speculation off)."""
    spec = config.speculative_config
    if spec is None:
        return None
    if spec.method == "ngram":
        return NgramProposer(spec.num_speculative_tokens, spec.prompt_lookup_min, spec.prompt_lookup_max)
    from tokenmill.engine.draft_model import DraftModelProposer

    return DraftModelProposer.load(config, target, num_blocks, dtype, device)
