"""The token-selection pipeline: logits of one step -> the next token of every sequence.

Each row of the logits ``[B, V]`` is one sequence with its own SamplingParams. The steps
run in this order, each a small pure function over the whole batch:

0. ``apply_grammar_mask``: rows with a grammar (structured outputs, engine/structured_output.py)
   get -inf on every token their grammar forbids now; the other rows are not touched.
1. ``apply_logit_bias`` adds the request's logit_bias, then ``apply_min_tokens_mask`` sets
   the EOS ids and stop_token_ids to -inf while fewer than min_tokens tokens are out.
2. ``apply_repetition_penalty``: every token seen in the prompt or the output has its logit
   divided by the penalty when positive and multiplied by it when negative (transformers).
3. ``apply_frequency_presence``: logit -= frequency * count + presence * (count > 0), over the
   output tokens only (OpenAI).
4. ``apply_temperature``: logits / temperature. Temperature 0 (or below 1e-5, as vLLM does, to
   avoid overflow) is greedy: the argmax of the logits after step 3, skipping 5-7.
5. ``apply_top_k``: keep the k largest logits (ties with the k-th are kept, as in transformers).
6. ``apply_top_p``: keep the smallest set of most likely tokens whose probability reaches top_p.
7. ``apply_min_p``: drop tokens whose probability is below min_p times the top token's.
8. ``sample``: inverse CDF over the vocabulary in token-id order with one uniform per row drawn
   from that row's own generator. The result depends only on the row's logits, its parameters
   and its generator, so a seeded request draws the same numbers alone or in any batch; its tokens
   are the same too when its logits are, which only batch-invariant mode guarantees (docs/determinism.md).
   A row that verifies a draft token drawn from a full distribution q (a draft model) uses its
   uniform for rejection sampling instead (``spec_decode.rejection_sample``); a one-hot draft
   (n-gram) needs nothing more: the row's own sample is the verdict (accepted when it equals it).

Reported logprobs are the raw model distribution (log_softmax before step 0: the model's own
view, even of tokens the grammar forbids). Fast paths: a batch that is all greedy with nothing in
steps 0-3 is a single argmax; count tensors for penalties are built only when some row uses a
penalty; step 0 runs only when some row has a grammar.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from tokenmill.engine.spec_decode import rejection_sample
from tokenmill.sampling_params import SamplingParams

# Temperatures below this are treated as greedy: dividing by them overflows float32 logits.
_GREEDY_TEMPERATURE = 1e-5
# top_p looks for its kept set among this many most likely tokens (partial sorts, cheaper than
# sorting the vocabulary); only rows whose set is larger than all of them sort in full.
_TOP_P_CANDIDATES = (256, 4096)


class TokenEntries(NamedTuple):
    """Sparse per-(row, token) values: one entry per distinct token of a row, each [N]."""

    rows: torch.Tensor  # long
    tokens: torch.Tensor  # long
    values: torch.Tensor  # float32


@dataclass
class SampleRow:
    """One row of the logits: one sequence to choose the next token for."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None  # the request's own generator (seeded when params.seed is set)
    # speculative decoding: the draft token this row verifies and the distribution q [V] it was
    # drawn from; only set for a q that is not one-hot (one-hot drafts need no special handling)
    draft_token_id: int | None = None
    draft_probs: torch.Tensor | None = None
    grammar_mask: torch.Tensor | None = None  # [ceil(V / 32)] int32: structured outputs' allowed tokens


@dataclass
class SamplerOutput:
    """The chosen token of every row, moved to the CPU once."""

    token_ids: list[int]  # [B]
    logprobs: list[float]  # [B] chosen token's logprob under the raw distribution
    top_logprobs: list[dict[int, float]] | None  # per row, its params.logprobs best raw alternatives
    ranks: list[int] | None  # rank of the chosen token under the raw distribution (1 = most likely)
    processed_top: list[list[tuple[int, float]]] | None  # per row: (id, prob) after all controls


@dataclass
class SamplingBatch:
    """Per-step tensors built once from the rows; ``None`` means no row uses that step."""

    num_rows: int
    all_greedy: bool
    greedy: torch.Tensor  # [B] bool
    greedy_rows: list[bool]  # the same on the host, so sampling needs no device sync
    generators: list[torch.Generator | None]
    # Steps 1-3 touch only the tokens a row names or has seen: sparse, never [B, V].
    bias: TokenEntries | None  # value: the bias to add
    min_tokens_mask: TokenEntries | None  # EOS / stop ids of rows below min_tokens (values unused)
    repetition: TokenEntries | None  # tokens in prompt or output; value: the row's penalty
    frequency_presence: TokenEntries | None  # output tokens; value: freq * count + presence
    # Steps 4-7 (greedy rows carry neutral values).
    temperature: torch.Tensor  # [B, 1]
    top_k: torch.Tensor | None  # [B] long, 0 = off
    max_top_k: int
    top_p: torch.Tensor | None  # [B, 1], 1 = off
    top_p_candidates: int | None  # sort only this many candidates for top_p (None: whole vocab)
    min_p: torch.Tensor | None  # [B, 1], 0 = off
    # Reporting.
    logprobs_k: list[int | None]
    processed_k: list[int | None]
    # Rows verifying drafts drawn from a full distribution (sampled rows only).
    drafts: DraftRows | None = None
    grammar: GrammarRows | None = None  # step 0: rows with a grammar and their bitmasks

    @property
    def needs_processing(self) -> bool:
        """True when some row uses step 1, 2 or 3."""
        return any(t is not None for t in (self.bias, self.min_tokens_mask, self.repetition,
                                           self.frequency_presence))

    @staticmethod
    def build(rows: list[SampleRow], vocab_size: int, eos_token_ids: list[int],
              device: torch.device) -> SamplingBatch:
        """Gather the rows' parameters into tensors on ``device``."""
        params = [r.params for r in rows]
        greedy = [p.greedy or p.temperature < _GREEDY_TEMPERATURE for p in params]
        sampled = [p for p, g in zip(params, greedy, strict=True) if not g]
        top_k, max_top_k = _build_top_k(params, greedy, vocab_size, device)
        top_p, candidates = _build_top_p(params, greedy, vocab_size, device)
        any_min_p = any(p.min_p > 0 for p in sampled)

        def column(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)

        return SamplingBatch(
            num_rows=len(rows),
            all_greedy=not sampled,
            greedy=torch.tensor(greedy, dtype=torch.bool, device=device),
            greedy_rows=greedy,
            generators=[r.generator for r in rows],
            bias=_build_bias(params, vocab_size, device),
            min_tokens_mask=_build_min_tokens_mask(rows, eos_token_ids, vocab_size, device),
            repetition=_build_repetition(rows, vocab_size, device),
            frequency_presence=_build_frequency_presence(rows, vocab_size, device),
            temperature=column([1.0 if g else p.temperature for p, g in zip(params, greedy, strict=True)]),
            top_k=top_k, max_top_k=max_top_k, top_p=top_p, top_p_candidates=candidates,
            min_p=column([0.0 if g else p.min_p for p, g in zip(params, greedy, strict=True)])
            if any_min_p else None,
            logprobs_k=[p.logprobs for p in params],
            processed_k=[p.return_processed_topk for p in params],
            drafts=DraftRows.build(rows, greedy, device),
            grammar=GrammarRows.build(rows, device),
        )


class GrammarRows(NamedTuple):
    """The rows that have a grammar (structured outputs) and the tokens each may take."""

    rows: torch.Tensor  # [G] long
    bitmask: torch.Tensor  # [G, ceil(V / 32)] int32

    @staticmethod
    def build(rows: list[SampleRow], device: torch.device) -> GrammarRows | None:
        picked = [i for i, r in enumerate(rows) if r.grammar_mask is not None]
        if not picked:  # requests without a grammar pay nothing
            return None
        return GrammarRows(torch.tensor(picked, dtype=torch.long, device=device),
                           torch.stack([rows[i].grammar_mask for i in picked]).to(device))


class DraftRows(NamedTuple):
    """The rows that verify a draft token against the draft's distribution q."""

    rows: torch.Tensor  # [R] long, row index in the batch
    token_ids: torch.Tensor  # [R] long, the draft token
    probs: torch.Tensor  # [R, V] q

    @staticmethod
    def build(rows: list[SampleRow], greedy: list[bool], device: torch.device) -> DraftRows | None:
        picked = [i for i, (r, g) in enumerate(zip(rows, greedy, strict=True))
                  if r.draft_probs is not None and not g]
        if not picked:
            return None
        return DraftRows(torch.tensor(picked, dtype=torch.long, device=device),
                         torch.tensor([rows[i].draft_token_id for i in picked], dtype=torch.long, device=device),
                         torch.stack([rows[i].draft_probs for i in picked]).to(device))


def _build_bias(params: list[SamplingParams], vocab_size: int, device: torch.device) -> TokenEntries | None:
    rows: list[int] = []
    tokens: list[int] = []
    values: list[float] = []
    for i, p in enumerate(params):
        for token_id, bias in (p.logit_bias or {}).items():
            if token_id >= vocab_size:
                raise ValueError(f"logit_bias: token id {token_id} must be < vocab size {vocab_size}")
            rows.append(i)
            tokens.append(token_id)
            values.append(bias)
    if not rows:
        return None
    return TokenEntries(torch.tensor(rows, device=device), torch.tensor(tokens, device=device),
                        torch.tensor(values, dtype=torch.float32, device=device))


def _build_min_tokens_mask(rows: list[SampleRow], eos_token_ids: list[int], vocab_size: int,
                           device: torch.device) -> TokenEntries | None:
    row_idx: list[int] = []
    tokens: list[int] = []
    for i, r in enumerate(rows):
        if len(r.output_token_ids) >= r.params.min_tokens:
            continue
        banned = {t for t in [*eos_token_ids, *r.params.stop_token_ids] if t < vocab_size}
        row_idx += [i] * len(banned)
        tokens += sorted(banned)
    if not row_idx:
        return None
    return TokenEntries(torch.tensor(row_idx, device=device), torch.tensor(tokens, device=device),
                        torch.full((len(tokens),), -math.inf, device=device))


def _distinct_tokens(token_lists: list[list[int]], vocab_size: int,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row token lists -> distinct (row [N], token [N]) pairs and how often each occurs [N]."""
    rows = torch.tensor([i for i, ids in enumerate(token_lists) for _ in ids], dtype=torch.long, device=device)
    tokens = torch.tensor([t for ids in token_lists for t in ids], dtype=torch.long, device=device)
    keys, counts = (rows * vocab_size + tokens).unique(return_counts=True)
    return keys // vocab_size, keys % vocab_size, counts.to(torch.float32)


def _build_repetition(rows: list[SampleRow], vocab_size: int, device: torch.device) -> TokenEntries | None:
    used = [r.params.repetition_penalty != 1.0 for r in rows]
    if not any(used):
        return None
    lists = [r.prompt_token_ids + r.output_token_ids if u else [] for r, u in zip(rows, used, strict=True)]
    row_idx, tokens, _ = _distinct_tokens(lists, vocab_size, device)
    penalty = torch.tensor([r.params.repetition_penalty for r in rows], dtype=torch.float32, device=device)
    return TokenEntries(row_idx, tokens, penalty[row_idx])


def _build_frequency_presence(rows: list[SampleRow], vocab_size: int, device: torch.device) -> TokenEntries | None:
    used = [r.params.frequency_penalty != 0.0 or r.params.presence_penalty != 0.0 for r in rows]
    if not any(used):
        return None
    lists = [r.output_token_ids if u else [] for r, u in zip(rows, used, strict=True)]
    row_idx, tokens, counts = _distinct_tokens(lists, vocab_size, device)
    freq = torch.tensor([r.params.frequency_penalty for r in rows], dtype=torch.float32, device=device)
    pres = torch.tensor([r.params.presence_penalty for r in rows], dtype=torch.float32, device=device)
    return TokenEntries(row_idx, tokens, freq[row_idx] * counts + pres[row_idx])


def _build_top_k(params: list[SamplingParams], greedy: list[bool], vocab_size: int,
                 device: torch.device) -> tuple[torch.Tensor | None, int]:
    ks = [0 if g else min(p.top_k, vocab_size) for p, g in zip(params, greedy, strict=True)]
    if max(ks, default=0) == 0:
        return None, 0
    return torch.tensor(ks, dtype=torch.long, device=device), max(ks)


def _build_top_p(params: list[SamplingParams], greedy: list[bool], vocab_size: int,
                 device: torch.device) -> tuple[torch.Tensor | None, int | None]:
    ps = [1.0 if g else p.top_p for p, g in zip(params, greedy, strict=True)]
    if all(p >= 1.0 for p in ps):
        return None, None
    # When every top_p row also has a top_k, its kept set lies within the top max-k logits,
    # so sorting those candidates is enough (a partial sort instead of a full-vocab sort).
    ks = [min(p.top_k, vocab_size) for p, q in zip(params, ps, strict=True) if q < 1.0]
    candidates = max(ks) if all(k > 0 for k in ks) else None
    return torch.tensor(ps, dtype=torch.float32, device=device).unsqueeze(1), candidates


# ---- the pipeline steps: pure functions over logits [B, V] ----

def apply_logit_bias(logits: torch.Tensor, bias: TokenEntries) -> torch.Tensor:
    """Step 1a: add each row's logit_bias to the named tokens."""
    return logits.index_put((bias.rows, bias.tokens), bias.values, accumulate=True)


def apply_min_tokens_mask(logits: torch.Tensor, mask: TokenEntries) -> torch.Tensor:
    """Step 1b: forbid EOS and stop token ids (rows still below min_tokens)."""
    return logits.index_put((mask.rows, mask.tokens), mask.values)


def apply_repetition_penalty(logits: torch.Tensor, seen: TokenEntries) -> torch.Tensor:
    """Step 2: seen tokens' logits: positive ones divided by the penalty, negative ones multiplied."""
    current = logits[seen.rows, seen.tokens]  # [N]
    penalized = torch.where(current < 0, current * seen.values, current / seen.values)
    return logits.index_put((seen.rows, seen.tokens), penalized)


def apply_frequency_presence(logits: torch.Tensor, entries: TokenEntries) -> torch.Tensor:
    """Step 3: subtract frequency * count + presence from each output token's logit."""
    return logits.index_put((entries.rows, entries.tokens), -entries.values, accumulate=True)


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Step 4: temperature [B, 1] (> 0)."""
    return logits / temperature


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> torch.Tensor:
    """Step 5: top_k [B] long (0 = off, at most max_top_k). Logits below the k-th largest -> -inf."""
    top_values = logits.topk(max_top_k, dim=-1).values  # [B, max_top_k], descending
    kth = top_values.gather(1, (top_k.clamp(min=1) - 1).unsqueeze(1))  # [B, 1]
    kth = torch.where(top_k.unsqueeze(1) > 0, kth, torch.full_like(kth, -math.inf))
    return logits.masked_fill(logits < kth, -math.inf)


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor, candidates: int | None = None) -> torch.Tensor:
    """Step 6: top_p [B, 1] (1 = off). Keeps a token when the probability of the tokens more
    likely than it is still below top_p, so the most likely token always stays.

    candidates: when set, no row keeps a token outside its ``candidates`` largest logits (true
    after top_k). Otherwise the kept set is looked for among the largest _TOP_P_CANDIDATES
    logits, then among more for the rows whose set did not fit, and only then in a full sort.
    Probabilities are normalized over the whole row, so every size computes the same numbers.
    """
    vocab = logits.shape[-1]
    log_norm = logits.logsumexp(dim=-1, keepdim=True)  # [B, 1]
    drop = (top_p < 1.0).expand_as(logits).clone()  # tokens outside the candidates go when top_p is on
    rows = torch.arange(logits.shape[0], device=logits.device)  # [R] rows still to settle
    sizes = [candidates] if candidates is not None else [*_TOP_P_CANDIDATES, vocab]
    for size in sizes:
        size = min(size, vocab)
        values, order = logits[rows].topk(size, dim=-1)  # [R, size], descending
        drop_sorted, mass = _top_p_drop(values, log_norm[rows], top_p[rows])
        drop[rows] = drop[rows].scatter(1, order, drop_sorted)
        if size == vocab or candidates is not None:
            break
        # Rows whose candidates hold less than top_p of the mass keep tokens beyond them.
        rows = rows[((mass < top_p[rows]) & (top_p[rows] < 1.0)).squeeze(1)]
        if rows.numel() == 0:
            break
    return logits.masked_fill(drop, -math.inf)


def _top_p_drop(sorted_logits: torch.Tensor, log_norm: torch.Tensor,
                top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sorted_logits [B, C] descending -> (drop [B, C] bool, total probability of the C [B, 1])."""
    probs = (sorted_logits - log_norm).exp()
    cumulative = probs.cumsum(dim=-1)
    mass_before = cumulative - probs  # exclusive: probability of the more likely tokens
    return (mass_before >= top_p) & (top_p < 1.0), cumulative[:, -1:]


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Step 7: min_p [B, 1] (0 = off). p < min_p * p_max  <=>  logit < max_logit + log(min_p)."""
    threshold = logits.amax(dim=-1, keepdim=True) + torch.log(min_p)  # log(0) = -inf keeps all
    return logits.masked_fill(logits < threshold, -math.inf)


def sample(logits: torch.Tensor, generators: list[torch.Generator | None],
           skip: list[bool] | None = None) -> torch.Tensor:
    """Step 8: one token per row [B] by inverse CDF, with one uniform from each row's generator.

    skip: rows whose token is not sampled (greedy); their generators are left untouched.

    The CDF runs over the vocabulary in token-id order (not sorted order), so the draw does not
    depend on how other rows made the batch take a fast or slow path. float64 keeps tokens with
    tiny probabilities from vanishing in the running sum.
    """
    return sample_with_uniforms(logits, draw_uniforms(generators, skip, logits.device))


def draw_uniforms(generators: list[torch.Generator | None], skip: list[bool] | None,
                  device: torch.device) -> torch.Tensor:
    """[B] float64: one uniform per row from the row's generator (0 for skipped rows, which draw none)."""
    skip = skip or [False] * len(generators)
    return torch.stack([torch.zeros((), dtype=torch.float64, device=device) if s else draw_uniform(g, device)
                        for g, s in zip(generators, skip, strict=True)])


def sample_with_uniforms(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse CDF in token-id order: row i's token for its uniform uniforms[i] ([B] float64)."""
    probs = logits.softmax(dim=-1).double()  # [B, V]
    cdf = probs.cumsum(dim=-1)
    token_ids = torch.searchsorted(cdf, uniforms.unsqueeze(1) * cdf[:, -1:], right=True).squeeze(1)
    return token_ids.clamp(max=logits.shape[-1] - 1)


def draw_uniform(generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """One uniform in [0, 1) from the row's generator, on the generator's own device."""
    gen_device = generator.device if generator is not None else device
    return torch.rand((), generator=generator, dtype=torch.float64, device=gen_device).to(device)


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Steps 1-3 on logits [B, V]; returns a new tensor."""
    if batch.bias is not None:
        logits = apply_logit_bias(logits, batch.bias)
    if batch.min_tokens_mask is not None:
        logits = apply_min_tokens_mask(logits, batch.min_tokens_mask)
    if batch.repetition is not None:
        logits = apply_repetition_penalty(logits, batch.repetition)
    if batch.frequency_presence is not None:
        logits = apply_frequency_presence(logits, batch.frequency_presence)
    return logits


def apply_truncation(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Steps 4-7 on logits [B, V] (greedy rows carry neutral values)."""
    logits = apply_temperature(logits, batch.temperature)
    if batch.top_k is not None:
        logits = apply_top_k(logits, batch.top_k, batch.max_top_k)
    if batch.top_p is not None:
        logits = apply_top_p(logits, batch.top_p, batch.top_p_candidates)
    if batch.min_p is not None:
        logits = apply_min_p(logits, batch.min_p)
    return logits


class Sampler:
    """Runs the pipeline on one step's logits."""

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        """logits [B, V] (float32) -> the next token of every row and its raw logprob."""
        logits = logits.float()
        # Raw logprob = logit - logsumexp: a reduction, no [B, V] log_softmax written.
        log_norm = logits.logsumexp(dim=-1)  # [B]
        final = None  # logits after all controls, when some row samples
        allowed = logits  # after step 0
        if batch.grammar is not None:
            allowed = apply_grammar_mask(logits, batch.grammar.rows, batch.grammar.bitmask)
        if batch.all_greedy:
            processed = apply_penalties(allowed, batch) if batch.needs_processing else allowed
            token_ids = processed.argmax(dim=-1)
        else:
            processed = apply_penalties(allowed, batch)
            final = apply_truncation(processed, batch)
            uniforms = draw_uniforms(batch.generators, batch.greedy_rows, logits.device)
            token_ids = sample_with_uniforms(final, uniforms)
            if batch.drafts is not None:
                d = batch.drafts
                token_ids = token_ids.index_put(
                    (d.rows,), rejection_sample(final[d.rows], uniforms[d.rows], d.token_ids, d.probs))
            if any(batch.greedy_rows):
                token_ids = torch.where(batch.greedy, processed.argmax(dim=-1), token_ids)
        chosen_logit = logits.gather(1, token_ids.unsqueeze(1)).squeeze(1)  # [B]
        chosen = chosen_logit - log_norm
        # One transfer for both: token ids (< 2**53) are exact in float64.
        ids_cpu, lps_cpu = torch.stack([token_ids.double(), chosen.double()]).tolist()
        out = SamplerOutput([int(t) for t in ids_cpu], lps_cpu, None, None, None)
        if any(k is not None for k in batch.logprobs_k):
            out.top_logprobs, out.ranks = _raw_top(logits, log_norm, chosen_logit, batch.logprobs_k)
        if any(k for k in batch.processed_k):
            out.processed_top = _processed_top(final, token_ids, batch)
        return out


def _raw_top(logits: torch.Tensor, log_norm: torch.Tensor, chosen_logit: torch.Tensor,
             ks: list[int | None]) -> tuple[list[dict[int, float]], list[int]]:
    """Per row its k best raw alternatives, and the rank of the chosen token (1 = most likely).

    logits [B, V] raw, log_norm [B] their logsumexp, chosen_logit [B].
    """
    ranks = (logits > chosen_logit.unsqueeze(1)).sum(dim=-1) + 1  # [B]
    max_k = max(k or 0 for k in ks)
    if max_k == 0:
        return [{} for _ in ks], ranks.tolist()
    values, ids = logits.topk(max_k, dim=-1)  # [B, max_k]
    values = values - log_norm.unsqueeze(1)
    values_l, ids_l = values.tolist(), ids.tolist()
    tops = [dict(zip(ids_l[i][:k or 0], values_l[i][:k or 0], strict=True)) for i, k in enumerate(ks)]
    return tops, ranks.tolist()


def _processed_top(final: torch.Tensor | None, token_ids: torch.Tensor,
                   batch: SamplingBatch) -> list[list[tuple[int, float]]]:
    """(id, prob) after all controls for rows that asked. A greedy row's distribution is one-hot."""
    ks = batch.processed_k
    max_k = max(k or 0 for k in ks)
    greedy = batch.greedy_rows
    tops: list[list[tuple[int, float]]] = []
    if final is not None:
        values, ids = final.softmax(dim=-1).topk(max_k, dim=-1)
        values_l, ids_l = values.tolist(), ids.tolist()
    chosen = token_ids.tolist()
    for i, k in enumerate(ks):
        if not k:
            tops.append([])
        elif greedy[i] or final is None:
            tops.append([(chosen[i], 1.0)])
        else:
            tops.append([(t, p) for t, p in zip(ids_l[i][:k], values_l[i][:k], strict=True) if p > 0])
    return tops


def token_logprobs(logits: torch.Tensor, target_ids: list[int], k: int) -> list[dict[int, tuple[float, int]]]:
    """Raw logprobs of given tokens (prompt logprobs): row i of logits [N, V] is scored on target_ids[i].

    Each entry maps token id -> (logprob, rank) for the target token and the k most likely tokens.
    """
    if logits.shape[0] != len(target_ids):
        raise ValueError(f"token_logprobs: {logits.shape[0]} rows of logits for {len(target_ids)} tokens")
    if not target_ids:
        return []
    logprobs = logits.float().log_softmax(dim=-1)  # [N, V]
    actual = torch.tensor(target_ids, device=logits.device).unsqueeze(1)  # [N, 1]
    actual_lp = logprobs.gather(1, actual)  # [N, 1]
    ranks = ((logprobs > actual_lp).sum(dim=-1) + 1).tolist()
    top_values, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], actual[:, :0])
    top_values_l, top_ids_l, actual_l = top_values.tolist(), top_ids.tolist(), actual_lp.squeeze(1).tolist()
    entries = []
    for i, token in enumerate(target_ids):
        entry = {tid: (lp, rank) for rank, (tid, lp) in enumerate(zip(top_ids_l[i], top_values_l[i], strict=True),
                                                                   start=1)}
        entry[token] = (actual_l[i], ranks[i])
        entries.append(entry)
    return entries


def apply_grammar_mask(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Step 0 of the pipeline: logits [B, V]; rows [G] long; bitmask [G, ceil(V / 32)] int32 (bit t % 32 of
    word t // 32 set: token t allowed). Returns logits with the forbidden tokens of those rows at -inf."""
    vocab = logits.shape[-1]
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    bits = (bitmask.to(logits.device).unsqueeze(-1) >> shifts) & 1  # [G, W, 32]
    allowed = bits.flatten(1)[:, :vocab].bool()  # [G, V]
    selected = logits.index_select(0, rows).masked_fill(~allowed, float("-inf"))
    return logits.index_copy(0, rows, selected)
