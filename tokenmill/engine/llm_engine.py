"""LLMEngine: add_request / abort / step. Each step is schedule -> execute -> update.

The engine is driven by one thread (LLM.generate's loop or the async engine's thread);
add_request and abort may be called from other threads: they only touch a locked inbox
that the next step drains.
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
import uuid
from dataclasses import dataclass

import torch

from tokenmill.config import EngineConfig
from tokenmill.engine.beam_search import BeamSearch
from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.engine.kv_cache import BlockManager, KVCacheTensors, bytes_per_block, num_blocks_for_budget
from tokenmill.engine.model_runner import ModelRunner, StepResult
from tokenmill.engine.request import FinishReason, Request, Sequence
from tokenmill.engine.sampler import Sampler, SampleRow, SamplingBatch, prompt_logprobs
from tokenmill.engine.scheduler import ScheduledSeq, Scheduler
from tokenmill.engine.stopping import check_stop
from tokenmill.model.loading import load_model
from tokenmill.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput
from tokenmill.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class EngineStats:
    """A snapshot of the engine for metrics and the /metrics endpoint."""

    num_running: int
    num_waiting: int
    num_preemptions_total: int
    kv_blocks_used: int
    kv_blocks_total: int
    prompt_tokens_total: int
    generation_tokens_total: int
    tokens_prefilled_last_step: int = 0
    tokens_decoded_last_step: int = 0

    @property
    def kv_cache_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


class LLMEngine:
    """The serving engine: continuous batching over a paged KV cache."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        loaded = load_model(config, self.dtype, self.device)
        self.model_config, self.tokenizer, self.model_name = loaded.config, loaded.tokenizer, loaded.name
        self.max_model_len = self._max_model_len(config, loaded.model)
        self.eos_token_ids = sorted(set(self.model_config.eos_token_ids) | set(self.tokenizer.eos_token_ids))
        num_blocks = num_blocks_for_budget(self.model_config, config.block_size, self.dtype, self.device,
                                           config.kv_cache_memory_gb)
        self.block_manager = BlockManager(num_blocks, config.block_size)
        cache = KVCacheTensors(self.model_config, num_blocks, config.block_size, self.dtype, self.device)
        logger.info("KV cache: %d blocks of %d tokens = %d tokens, %.1f MiB", num_blocks, config.block_size,
                    num_blocks * config.block_size,
                    num_blocks * bytes_per_block(self.model_config, config.block_size, self.dtype) / 2**20)
        self.runner = ModelRunner(loaded.model, cache, self.device, compile_decode=config.compile)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.sampler = Sampler()
        self.beam_search = BeamSearch(self)
        self.requests: dict[str, Request] = {}
        self._inbox: list[Request] = []
        self._aborts: set[str] = set()
        self._lock = threading.Lock()
        self._seq_ids = itertools.count()
        self._rng = random.Random(config.seed)
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self._last_prefill = self._last_decode = 0
        if config.compile:
            self._warm_up_compiled_decode()

    def _max_model_len(self, config: EngineConfig, model: torch.nn.Module) -> int:
        limit = min(self.model_config.max_position_embeddings, getattr(model, "max_positions", 1 << 30))
        if config.max_model_len is not None and config.max_model_len > limit:
            raise ValueError(f"max_model_len ({config.max_model_len}) exceeds the model's context length ({limit})")
        return config.max_model_len or limit

    def _warm_up_compiled_decode(self) -> None:
        """Compile the decode graphs now (one sequence, then several), not in the first user's request."""
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        for batch in (1, 2):
            for i in range(batch):
                self.add_request([1 + i] * (8 + 3 * i), params, request_id=f"warmup-{batch}-{i}")
            while self.has_unfinished():
                self.step()
        self.prompt_tokens_total = self.generation_tokens_total = 0

    # ---- public API -------------------------------------------------------------------------

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
                    prompt: str | None = None, arrival_time: float | None = None) -> str:
        """Queue a request; raises ValueError when it can never fit or names an unknown token."""
        self._validate(prompt_token_ids, params)
        request_id = request_id or uuid.uuid4().hex
        request = Request(request_id, list(prompt_token_ids), params, prompt=prompt,
                          arrival_time=arrival_time or time.perf_counter())
        request.seed = params.seed if params.seed is not None else self._rng.getrandbits(62)
        generator = self._generator(request.seed)
        request.seqs.append(self._new_sequence(request, list(prompt_token_ids), generator))
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = []
        with self._lock:
            if request_id in self.requests or any(r.request_id == request_id for r in self._inbox):
                raise ValueError(f"request_id {request_id!r} is already in use")
            self._inbox.append(request)
        return request_id

    def abort(self, request_id: str) -> None:
        """Cancel a request; its blocks are freed and it is reported finished ("abort") by the next step."""
        with self._lock:
            self._aborts.add(request_id)

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._inbox or self._aborts or self.requests)

    def stats(self) -> EngineStats:
        with self._lock:
            num_new = len(self._inbox)  # added but not yet seen by the scheduler: waiting too
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting) + num_new,
            num_preemptions_total=self.scheduler.num_preemptions_total,
            kv_blocks_used=self.block_manager.num_used_blocks, kv_blocks_total=self.block_manager.num_blocks,
            prompt_tokens_total=self.prompt_tokens_total, generation_tokens_total=self.generation_tokens_total,
            tokens_prefilled_last_step=self._last_prefill, tokens_decoded_last_step=self._last_decode)

    def step(self) -> list[RequestOutput]:
        """Run one engine step and return the outputs of the requests that changed."""
        outputs = self._drain_inbox()
        plan = self.scheduler.schedule()
        if plan.is_empty:
            return outputs
        result = self.runner.execute(plan)
        self._count_tokens(plan.scheduled)
        for s in plan.scheduled:
            s.seq.num_computed_tokens += s.num_new_tokens
        self._collect_prompt_logprobs(plan.scheduled, result)
        changed = self._sample(result)
        for request in changed:
            outputs.append(self._make_output(request))
            if request.live_seqs == [] or request.is_finished:
                self._finish(request)
        return outputs

    # ---- step internals ---------------------------------------------------------------------

    def _drain_inbox(self) -> list[RequestOutput]:
        with self._lock:
            new, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, set()
        for request in new:
            self.requests[request.request_id] = request
            self.prompt_tokens_total += len(request.prompt_token_ids)
            self.scheduler.add(request)
        outputs = []
        for request_id in aborts:
            request = self.requests.get(request_id)
            if request is None:
                continue
            for seq in request.live_seqs:
                self._end_sequence(seq, FinishReason.ABORT, None)
            outputs.append(self._make_output(request))
            self._finish(request)
        return outputs

    def _count_tokens(self, scheduled: list[ScheduledSeq]) -> None:
        decode = sum(1 for s in scheduled if s.num_new_tokens == 1 and not s.seq.is_prefilling)
        self._last_decode = decode
        self._last_prefill = sum(s.num_new_tokens for s in scheduled) - decode

    def _collect_prompt_logprobs(self, scheduled: list[ScheduledSeq], result: StepResult) -> None:
        for s in scheduled:
            chunk = result.prompt_logits.get(s.seq.seq_id)
            if chunk is None:
                continue
            request = s.request
            request.prompt_logits_chunks.append(chunk)
            if s.seq.num_computed_tokens >= s.seq.num_prompt_tokens and request.prompt_logprobs == []:
                logits = torch.cat(request.prompt_logits_chunks)
                entries = prompt_logprobs(logits, request.prompt_token_ids, request.params.prompt_logprobs)
                request.prompt_logprobs = [self._position_logprobs(e) for e in entries]
                request.prompt_logits_chunks = []

    def _position_logprobs(self, entry) -> PositionLogprobs | None:
        if entry is None:
            return None
        return {tid: Logprob(lp, rank, self.tokenizer.decode([tid], skip_special_tokens=False))
                for tid, (lp, rank) in entry.items()}

    def _sample(self, result: StepResult) -> list[Request]:
        """Pick the next token of every sampled sequence; returns the requests that changed."""
        rows: list[tuple[Request, Sequence, int]] = []
        beam_rows: dict[str, list[tuple[Sequence, int]]] = {}
        for row, s in enumerate(result.sampled):
            request = s.request
            if request.params.use_beam_search:
                beam_rows.setdefault(request.request_id, []).append((s.seq, row))
                continue
            if request.params.n > 1 and len(request.seqs) == 1 and s.seq.num_output_tokens == 0:
                self._fork_samples(request)
                rows += [(request, seq, row) for seq in request.seqs]
            else:
                rows.append((request, s.seq, row))
        changed: dict[str, Request] = {}
        if rows:
            self._sample_rows(rows, result.logits)
            changed.update((r.request_id, r) for r, _, _ in rows)
        for request_id, seq_rows in beam_rows.items():
            request = self.requests[request_id]
            if self.beam_search.step(request, seq_rows, result.logits):
                changed[request_id] = request
        return list(changed.values())

    def _sample_rows(self, rows: list[tuple[Request, Sequence, int]], logits: torch.Tensor) -> None:
        index = torch.tensor([row for _, _, row in rows], device=logits.device)
        batch = SamplingBatch.build(
            [SampleRow(r.params, seq.prompt_token_ids, seq.output_token_ids, seq.generator) for r, seq, _ in rows],
            self.model_config.vocab_size, self.eos_token_ids, logits.device)
        out = self.sampler(logits.index_select(0, index), batch)
        now = time.perf_counter()
        for i, (request, seq, _) in enumerate(rows):
            top = out.top_logprobs[i] if out.top_logprobs is not None else None
            rank = out.ranks[i] if out.ranks is not None else None
            processed = out.processed_top[i] if out.processed_top is not None else None
            self.append_token(request, seq, out.token_ids[i], out.logprobs[i], top, rank, processed)
            self._mark_token_time(request, now)

    def append_token(self, request: Request, seq: Sequence, token: int, logprob: float,
                     top: dict[int, float] | None = None, rank: int | None = None, processed=None) -> None:
        """Append one sampled token to seq and run the stop checks and the detokenizer."""
        seq.token_ids.append(token)
        seq.cumulative_logprob += logprob
        seq.delta_token_ids.append(token)
        request.metrics.num_generated_tokens += 1
        self.generation_tokens_total += 1
        if request.params.logprobs is not None:
            entry = self._position_entry(token, logprob, rank, top or {})
            seq.logprobs.append(entry)
            seq.delta_logprobs.append(entry)
        if processed is not None:
            seq.processed_top.append(processed)
        stop = check_stop(seq, request.params, self.eos_token_ids, self.max_model_len)
        if stop is not None and stop[0] is FinishReason.STOP:
            self._end_sequence(seq, *stop)  # the stop token's text never reaches the output
            return
        update = seq.detokenizer.add_tokens([token])
        seq.text += update.delta_text
        seq.delta_text += update.delta_text
        if update.stop_string is not None:
            self._end_sequence(seq, FinishReason.STOP, update.stop_string)
        elif stop is not None:
            self._end_sequence(seq, *stop)

    def _position_entry(self, token: int, logprob: float, rank: int | None,
                        top: dict[int, float]) -> PositionLogprobs:
        """The chosen token (rank in the whole vocabulary) and the top alternatives (ranks 1..k)."""
        decode = self.tokenizer.decode
        entry = {token: Logprob(logprob, rank, decode([token], skip_special_tokens=False))}
        for alt_rank, (tid, lp) in enumerate(sorted(top.items(), key=lambda kv: -kv[1]), start=1):
            if tid != token:
                entry[tid] = Logprob(lp, alt_rank, decode([tid], skip_special_tokens=False))
        return entry

    def _end_sequence(self, seq: Sequence, reason: FinishReason, stop_reason: str | int | None) -> None:
        if seq.is_finished:
            return
        if reason is not FinishReason.STOP or not isinstance(stop_reason, str):
            tail = seq.detokenizer.finish()
            seq.text += tail
            seq.delta_text += tail
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        self.block_manager.free(seq)

    def _mark_token_time(self, request: Request, now: float) -> None:
        m = request.metrics
        if m.first_token_time is None:
            m.first_token_time = now
        if m.last_token_time != now:
            m.num_token_steps += 1
        m.last_token_time = now

    def _generator(self, seed: int) -> torch.Generator:
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed)
        return generator

    def _fork_samples(self, request: Request) -> None:
        parent = request.seqs[0]
        for index in range(1, request.params.n):
            # each sample draws from its own stream, so which samples share a step never changes the result
            generator = self._generator((request.seed + index * 0x9E3779B9) % (1 << 63))
            request.seqs.append(self.fork_sequence(request, parent, generator))

    def fork_sequence(self, request: Request, parent: Sequence,
                      generator: torch.Generator | None = None) -> Sequence:
        """A new sequence sharing parent's tokens and KV blocks (n samples, beams); parent's generator
        unless another is given."""
        child = self._new_sequence(request, list(parent.token_ids), generator or parent.generator)
        child.num_computed_tokens = parent.num_computed_tokens
        child.cumulative_logprob = parent.cumulative_logprob
        self.block_manager.fork(parent, child)
        return child

    def _new_sequence(self, request: Request, token_ids: list[int], generator) -> Sequence:
        seq = Sequence(next(self._seq_ids), token_ids, len(request.prompt_token_ids), generator=generator)
        seq.detokenizer = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, request.params)
        seq.logprobs = [] if request.params.logprobs is not None else None
        return seq

    def _make_output(self, request: Request) -> RequestOutput:
        completions = []
        seqs = self.beam_search.ranked(request) if request.params.use_beam_search else request.seqs
        for index, seq in enumerate(seqs):
            completions.append(CompletionOutput(
                index=index, text=seq.text, token_ids=list(seq.output_token_ids),
                cumulative_logprob=seq.cumulative_logprob, logprobs=seq.logprobs,
                finish_reason=seq.finish_reason.to_api() if seq.finish_reason else None,
                stop_reason=seq.stop_reason, delta_text=seq.delta_text,
                delta_token_ids=seq.delta_token_ids,
                delta_logprobs=seq.delta_logprobs if seq.logprobs is not None else None,
                processed_top=seq.processed_top or None))
            seq.delta_text, seq.delta_token_ids, seq.delta_logprobs = "", [], []
        finished = all(s.is_finished for s in request.seqs)
        if finished and request.metrics.finished_time is None:
            request.metrics.finished_time = time.perf_counter()
        trace = request.beam_state.trace if finished and request.beam_state is not None else None
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, completions,
                             finished, request.metrics, request.prompt_logprobs, beam_trace=trace)

    def _finish(self, request: Request) -> None:
        self.scheduler.finish(request)
        self.requests.pop(request.request_id, None)

    def _validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if not prompt_token_ids:
            raise ValueError("prompt must not be empty")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {vocab}); got {bad[:5]}")
        for name, ids in (("logit_bias", (params.logit_bias or {}).keys()), ("stop_token_ids", params.stop_token_ids)):
            bad = [t for t in ids if t >= vocab]
            if bad:
                raise ValueError(f"{name}: token ids must be < vocab size {vocab}; got {bad[:5]}")
        n_prompt, limit = len(prompt_token_ids), self.max_model_len
        needed = n_prompt + (params.max_tokens or 1)
        if needed > limit:
            raise ValueError(
                f"prompt ({n_prompt} tokens) + max_tokens ({params.max_tokens}) = {needed} exceeds the "
                f"context length of {limit} tokens")
        # After a preemption every sample / beam is recomputed on its own: all of them must fit at once.
        streams = max(params.n, params.num_beams)
        blocks = self.block_manager.blocks_for(needed) * streams
        if blocks > self.block_manager.num_blocks:
            raise ValueError(f"prompt ({n_prompt} tokens) + max_tokens ({params.max_tokens}) for {streams} "
                             f"sequence(s) needs {blocks} KV blocks but the cache has only "
                             f"{self.block_manager.num_blocks}")
