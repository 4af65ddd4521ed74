"""ModelRunner: SchedulerOutput -> input tensors -> one forward -> sampled tokens (ModelRunnerOutput).

One forward covers the whole step: decode tokens and prefill chunks flattened into one batch of
T tokens. Only the rows that are sampled go through the lm_head: a sequence's last token, and
each of its draft tokens when drafts were fed (a decode of 1 + k tokens gets 1 + k logit rows),
plus every position of a prompt whose prompt logprobs were asked for.

The runner reads the plan and the requests in it, and never changes them: it returns tokens, the
scheduler applies them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.engine.kv_cache import KVCacheTensors
from tokenmill.engine.request import TokenLogprobs
from tokenmill.engine.sampler import Sampler, SampleRow, SamplingBatch, draw_uniform, token_logprobs
from tokenmill.engine.step import ModelRunnerOutput, SampledTokens, ScheduledSeq, SchedulerOutput
from tokenmill.model.attention import AttentionMetadata, SeqSlice


@dataclass
class StepInputs:
    """Flattened inputs of one forward."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    logit_indices: torch.Tensor  # [R] index into T of every sampled position
    logit_rows: list[tuple[ScheduledSeq, int]]  # (sequence, first row in logit_indices), sampled ones
    prompt_rows: list[tuple[ScheduledSeq, int, int]]  # (sequence, first row, count) in prompt_indices
    prompt_indices: torch.Tensor | None  # [P] index into T of prompt positions needing logits


class ModelRunner:
    """Owns the model, the KV cache tensors and the sampler; executes one step at a time."""

    def __init__(self, model: torch.nn.Module, kv_cache: KVCacheTensors, device: torch.device,
                 vocab_size: int, eos_token_ids: list[int], compile_decode: bool = False,
                 batch_invariant: bool = False) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.device = device
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.batch_invariant = batch_invariant  # attention computes each query alone (model/batch_invariant.py)
        self.sampler = Sampler()
        # Decode-only steps all have the same structure (no prefill slices), so a few compiled graphs serve
        # them all (EngineCore warms them up); steps with prefill chunks, whose structure varies, stay eager
        # rather than recompiling. Compiling cuts the per-op dispatch overhead that dominates small-batch
        # decode on a CPU.
        self.decode_forward = CompiledDecode(model.forward) if compile_decode else model.forward

    @torch.inference_mode()
    def execute(self, plan: SchedulerOutput) -> ModelRunnerOutput:
        """Run the step's forward and pick the next token(s) of every sequence that reached its end."""
        self.kv_cache.copy_blocks(plan.block_copies)
        inputs = self.prepare_inputs(plan.scheduled)
        forward = self.model.forward if inputs.meta.prefills else self.decode_forward
        hidden = forward(inputs.input_ids, inputs.positions, self.kv_cache.layers, inputs.meta)
        out = ModelRunnerOutput()
        if inputs.logit_rows:
            logits = self.model.compute_logits(hidden[inputs.logit_indices])  # [R, V]
            self._sample(inputs.logit_rows, logits, out)
        if inputs.prompt_indices is not None:
            self._prompt_logprobs(inputs, self.model.compute_logits(hidden[inputs.prompt_indices]), out)
        return out

    def prepare_inputs(self, scheduled: list[ScheduledSeq]) -> StepInputs:
        ids: list[int] = []
        positions: list[int] = []
        slices: list[SeqSlice] = []
        logit_indices: list[int] = []
        logit_rows: list[tuple[ScheduledSeq, int]] = []
        prompt_indices: list[int] = []
        prompt_rows: list[tuple[ScheduledSeq, int, int]] = []
        for s in scheduled:
            start, end, offset = s.start, s.start + s.num_new_tokens, len(ids)
            ids.extend(s.input_token_ids())
            positions.extend(range(start, end))
            slices.append(SeqSlice(s.block_table, start, s.num_new_tokens))
            if s.samples:
                logit_rows.append((s, len(logit_indices)))
                logit_indices.extend(range(offset + s.num_new_tokens - s.num_logit_rows, offset + s.num_new_tokens))
            num_prompt = s.seq.num_prompt_tokens
            if s.request.params.prompt_logprobs is not None and start < num_prompt - 1:
                # logits at prompt positions [start, min(end, P-1)) predict prompt tokens start+1 ..
                count = min(end, num_prompt - 1) - start
                prompt_rows.append((s, len(prompt_indices), count))
                prompt_indices.extend(range(offset, offset + count))
        dev = self.device

        def tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=dev)

        meta = AttentionMetadata.build(slices, self.kv_cache.block_size, dev, batch_invariant=self.batch_invariant)
        return StepInputs(tensor(ids), tensor(positions), meta,
                          tensor(logit_indices), logit_rows, prompt_rows,
                          tensor(prompt_indices) if prompt_indices else None)

    # ---- sampling ---------------------------------------------------------------------------

    def _sample(self, logit_rows: list[tuple[ScheduledSeq, int]], logits: torch.Tensor,
                out: ModelRunnerOutput) -> None:
        """Beam rows are handed back raw; every other row goes through the sampling pipeline at once."""
        rows: list[SampleRow] = []
        index: list[int] = []
        for s, first in logit_rows:
            if s.request.params.use_beam_search:
                out.beam_logits[s.seq.seq_id] = logits[first]
            else:
                for row, source in self._sample_rows(s, first):
                    rows.append(row)
                    index.append(source)
        if not rows:
            return
        batch = SamplingBatch.build(rows, self.vocab_size, self.eos_token_ids, logits.device)
        # a sampled sequence verifying drafts draws one uniform per row, but only the positions it
        # keeps may consume one (as in plain decoding): its generator is rewound to match below
        saved = {s.seq.seq_id: s.seq.generator.get_state() for s, _ in logit_rows
                 if s.draft_token_ids and s.seq.generator is not None and not s.request.params.use_beam_search}
        result = self.sampler(logits.index_select(0, torch.tensor(index, device=logits.device)), batch)
        position = 0
        for s, _ in logit_rows:
            if s.request.params.use_beam_search:
                continue
            count = s.num_samples if s.num_samples > 1 else s.num_logit_rows
            picked = range(position, position + count)
            position += count
            if s.num_samples > 1:  # n samples of one row: one token each
                out.sampled[s.seq.seq_id] = [_tokens(result, [i], s) for i in picked]
            else:  # one token, or the verified run of drafts plus one
                kept = _accepted(list(picked), result.token_ids, s.draft_token_ids)
                out.sampled[s.seq.seq_id] = [_tokens(result, kept, s)]
                if s.seq.seq_id in saved and not batch.greedy_rows[picked[0]]:
                    _rewind(s.seq.generator, saved[s.seq.seq_id], len(kept), logits.device)

    @staticmethod
    def _sample_rows(s: ScheduledSeq, first: int) -> list[tuple[SampleRow, int]]:
        """The sampler rows of one sequence: one per sample of a fan-out, else one per logit row."""
        request, seq = s.request, s.seq
        masks = s.grammar_bitmask  # [num_logit_rows, W] or None
        if s.num_samples > 1:
            return [(SampleRow(request.params, seq.prompt_token_ids, [], request.sample_generators[i],
                               grammar_mask=None if masks is None else masks[0]), first)
                    for i in range(s.num_samples)]
        outputs = seq.output_token_ids
        # row j follows draft tokens 0..j-1: they count as output for the penalties; it verifies
        # draft j against the draft's distribution when that is not one-hot
        rows = []
        for j in range(s.num_logit_rows):
            row = SampleRow(request.params, seq.prompt_token_ids, outputs + s.draft_token_ids[:j], seq.generator,
                            grammar_mask=None if masks is None else masks[j])
            if s.draft_probs is not None and j < len(s.draft_token_ids):
                row.draft_token_id, row.draft_probs = s.draft_token_ids[j], s.draft_probs[j]
            rows.append((row, first + j))
        return rows

    def _prompt_logprobs(self, inputs: StepInputs, logits: torch.Tensor, out: ModelRunnerOutput) -> None:
        for s, first, count in inputs.prompt_rows:
            targets = s.seq.token_ids[s.start + 1:s.start + 1 + count]
            out.prompt_logprobs[s.seq.seq_id] = token_logprobs(logits[first:first + count], targets,
                                                               s.request.params.prompt_logprobs)


def _accepted(rows: list[int], sampled: list[int], drafts: list[int]) -> list[int]:
    """Rows whose tokens are kept: the token at each position, as long as the draft there was accepted
    (the sampler's token at a draft position equals the draft exactly when it accepted it, see
    spec_decode.py), then the one at the first rejected position (or the bonus row after the last)."""
    kept = []
    for j, row in enumerate(rows):
        kept.append(row)
        if j >= len(drafts) or sampled[row] != drafts[j]:
            break
    return kept


def _rewind(generator: torch.Generator, state: torch.Tensor, num_draws: int, device: torch.device) -> None:
    """Put generator where num_draws uniforms after ``state`` leave it (one per kept position)."""
    generator.set_state(state)
    for _ in range(num_draws):
        draw_uniform(generator, device)


def _tokens(result, rows: list[int], s: ScheduledSeq) -> SampledTokens:
    """The sampler's results at ``rows`` as one sequence's tokens."""
    params = s.request.params
    top = None
    if params.logprobs is not None:
        top = [TokenLogprobs(result.token_ids[r], result.logprobs[r], result.ranks[r], result.top_logprobs[r])
               for r in rows]
    processed = [result.processed_top[r] for r in rows] if params.return_processed_topk else None
    return SampledTokens([result.token_ids[r] for r in rows], [result.logprobs[r] for r in rows], top, processed,
                         num_accepted_drafts=len(rows) - 1 if s.draft_token_ids else 0)


class CompiledDecode:
    """``forward`` compiled for decode-only steps: static in everything but the batch and the context length.

    Static by default, not ``dynamic=True``: the KV cache tensors never change shape, and with 60 of them
    symbolic (sizes, strides, storage offsets) a warm start spent ~25 s per graph on shape guards; marked
    this way it takes ~5 s, the persistent inductor cache holding the compiled code. ``EngineCore`` calls it
    once per graph at start-up, then ``freeze()``: from then on a step that no graph fits runs eagerly
    instead of stalling every stream for a compile. The model must not change once compiled: its modules
    are not guarded."""

    def __init__(self, forward) -> None:
        # No guards on the model's modules and parameters: they never change after loading, and checking
        # the ~400 of them cost ~1.1 ms a step, before every step (0.11 ms without them)
        self._compiled = torch.compile(forward, dynamic=False, options={
            "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})
        self._frozen = False

    def freeze(self) -> None:
        self._frozen = True

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list,
                 meta: AttentionMetadata) -> torch.Tensor:
        if self._frozen:
            with torch.compiler.set_stance("eager_on_recompile"):
                return self._compiled(input_ids, positions, kv_caches, meta)
        torch._dynamo.mark_dynamic(meta.decode_gather_index, 1)  # context length
        torch._dynamo.mark_dynamic(meta.decode_padding, 3)
        if input_ids.shape[0] > 1:  # batch size (one sequence gets its own graph: a dim of 1 is never dynamic)
            for t in (input_ids, positions, meta.slot_mapping, meta.decode_gather_index, meta.decode_padding):
                torch._dynamo.mark_dynamic(t, 0)
        # Python floats (scales, eps) stay constants: traced as symbols they made dynamo restart every trace.
        # No duck sizing: a context length equal to a model size (3 KV heads) was tied to it, and the graph
        # came out static in the context length.
        with torch._dynamo.config.patch(specialize_float=True), \
                torch.fx.experimental._config.patch(use_duck_shape=False):
            return self._compiled(input_ids, positions, kv_caches, meta)
