"""ModelRunner: turns a SchedulerOutput into input tensors, runs the model, returns logits.

One forward covers the whole step: decode tokens and prefill chunks flattened into one batch
of T tokens. Only the rows that are sampled (a sequence's last token) go through the lm_head,
plus every position of a prompt whose prompt logprobs were asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.engine.kv_cache import KVCacheTensors
from tokenmill.engine.scheduler import ScheduledSeq, SchedulerOutput
from tokenmill.model.attention import AttentionMetadata, SeqSlice


@dataclass
class StepInputs:
    """Flattened inputs of one forward."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    sample_indices: torch.Tensor  # [R] index into T of each sampled sequence's last token
    sampled: list[ScheduledSeq]  # the R sequences sampled, in row order
    prompt_rows: dict[int, tuple[int, int]]  # seq_id -> (start, length) rows of prompt logits in `extra`
    extra_indices: torch.Tensor | None  # [P] index into T of prompt positions needing logits


@dataclass
class StepResult:
    logits: torch.Tensor  # [R, V] float32, row i belongs to StepInputs.sampled[i]
    sampled: list[ScheduledSeq]
    prompt_logits: dict[int, torch.Tensor]  # seq_id -> [len, V] logits of the positions in this chunk


class ModelRunner:
    """Owns the model and the KV cache tensors; executes one step at a time."""

    def __init__(self, model: torch.nn.Module, kv_cache: KVCacheTensors, device: torch.device,
                 compile_decode: bool = False) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.device = device
        # Decode-only steps all have the same structure (no prefill slices), so one compiled graph
        # with dynamic batch and context sizes serves them all; steps with prefill chunks, whose
        # structure varies, stay eager rather than recompiling. Compiling cuts the per-layer
        # dispatch overhead that dominates small-batch decode on a CPU.
        self.decode_forward = torch.compile(model.forward, dynamic=True) if compile_decode else model.forward

    @torch.inference_mode()
    def execute(self, plan: SchedulerOutput) -> StepResult:
        self.kv_cache.copy_blocks(plan.block_copies)
        inputs = self.prepare_inputs(plan.scheduled)
        forward = self.model.forward if inputs.meta.prefills else self.decode_forward
        hidden = forward(inputs.input_ids, inputs.positions, self.kv_cache.layers, inputs.meta)
        logits = self.model.compute_logits(hidden[inputs.sample_indices])
        prompt_logits: dict[int, torch.Tensor] = {}
        if inputs.extra_indices is not None:
            extra = self.model.compute_logits(hidden[inputs.extra_indices])
            for seq_id, (start, length) in inputs.prompt_rows.items():
                prompt_logits[seq_id] = extra[start:start + length]
        return StepResult(logits, inputs.sampled, prompt_logits)

    def prepare_inputs(self, scheduled: list[ScheduledSeq]) -> StepInputs:
        ids: list[int] = []
        positions: list[int] = []
        slices: list[SeqSlice] = []
        sample_indices: list[int] = []
        sampled: list[ScheduledSeq] = []
        extra: list[int] = []
        prompt_rows: dict[int, tuple[int, int]] = {}
        for s in scheduled:
            seq, start = s.seq, s.seq.num_computed_tokens
            end = start + s.num_new_tokens
            offset = len(ids)
            ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slices.append(SeqSlice(seq.block_table, start, s.num_new_tokens))
            if s.samples:
                sample_indices.append(offset + s.num_new_tokens - 1)
                sampled.append(s)
            if s.request.params.prompt_logprobs is not None and start < seq.num_prompt_tokens - 1:
                # logits at prompt positions [start, min(end, P-1)) predict prompt tokens start+1 ..
                stop = min(end, seq.num_prompt_tokens - 1)
                prompt_rows[seq.seq_id] = (len(extra), stop - start)
                extra.extend(range(offset, offset + stop - start))
        dev = self.device
        return StepInputs(
            input_ids=torch.tensor(ids, dtype=torch.long, device=dev),
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            meta=AttentionMetadata.build(slices, self.kv_cache.block_size, dev),
            sample_indices=torch.tensor(sample_indices, dtype=torch.long, device=dev),
            sampled=sampled,
            prompt_rows=prompt_rows,
            extra_indices=torch.tensor(extra, dtype=torch.long, device=dev) if extra else None,
        )
