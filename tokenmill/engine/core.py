"""EngineCore: the model, the KV cache and the scheduler; one step is schedule -> execute -> update.

It works in token ids only. Requests and aborts may come from any thread: they go into the
core's one inbox under its one lock, and the thread that runs ``step()`` drains it. Everything
else (the scheduler, the runner, the requests' state) is touched only by that thread.
"""

from __future__ import annotations

import functools
import logging
import random
import threading
import time
import uuid
from dataclasses import dataclass

import torch

from tokenmill.config import EngineConfig, ModelConfig
from tokenmill.engine.info import (
    EngineInfo,
    EngineStats,
    EngineStepError,
    grammar_compiler_for,
    validate_request,
)
from tokenmill.engine.kv_cache import (
    KVCacheTensors,
    bytes_per_token,
    describe_kv_cache,
    num_blocks_for_budget,
    release_freed_heap,
    resolve_kv_cache_dtype,
)
from tokenmill.engine.kv_cache_manager import KVCacheManager
from tokenmill.engine.model_runner import ModelRunner
from tokenmill.engine.request import Request
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.spec_decode import build_proposer
from tokenmill.engine.step import EngineCoreOutput, SequenceStop
from tokenmill.model.loading import load_model
from tokenmill.model.quant import QuantLinear
from tokenmill.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class _Abort:
    request_id: str


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16" (EngineInfo names types by strings; ``getattr(torch, name)`` turns them back)."""
    return str(dtype).removeprefix("torch.")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def compile_decode_choice(config: EngineConfig, model: torch.nn.Module, model_config: ModelConfig,
                          device: torch.device) -> tuple[bool, str]:
    """Whether to compile the decode steps, and why. ``config.compile`` True or False decides; None (auto, what
    ``tokenmill serve`` passes) compiles where it was measured to pay: on a CPU, for a model whose projections
    run packed int4 kernels (0.72-0.83x the eager time per token at 1 and 4 streams, level at 32:
    docs/benchmarks.md), for ~11 s of start-up with the compile cache warm."""
    if config.compile is not None:
        return config.compile, "--compile" if config.compile else "--no-compile"
    if device.type != "cpu":
        return False, "auto: only measured on CPUs"
    if config.batch_invariant:
        return False, "auto: batch-invariant mode stays eager"
    if any(model_config.layer_window(i) is not None for i in range(model_config.num_hidden_layers)):
        return False, "auto: sliding-window layers build their metadata mid-forward, which does not compile"
    if not any(isinstance(m, QuantLinear) for m in model.modules()):
        return False, "auto: pays for packed int4 projections; float weights were not measured"
    return True, "auto: packed int4 projections on a CPU; --no-compile to skip"


class EngineCore:
    """Continuous batching over a paged KV cache with prefix caching."""

    def __init__(self, config: EngineConfig) -> None:
        if config.threads:
            torch.set_num_threads(config.threads)
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        loaded = load_model(config, dtype, device)
        max_model_len = _max_model_len(config, loaded.config, loaded.model)
        eos = sorted(set(loaded.config.eos_token_ids) | set(loaded.tokenizer.eos_token_ids))
        kv_dtype, why = resolve_kv_cache_dtype(config.kv_cache_dtype, dtype, device)
        num_blocks = num_blocks_for_budget(loaded.config, config.block_size, kv_dtype, device,
                                           config.kv_cache_memory_gb)
        per_token = bytes_per_token(loaded.config, kv_dtype)
        self.info = EngineInfo(loaded.name, loaded.tokenizer, loaded.config, config, max_model_len, eos,
                               dtype_name(dtype), str(device), config.block_size, num_blocks,
                               num_blocks * config.block_size * per_token, dtype_name(kv_dtype), per_token)
        logger.info("%s (%s); prefix caching %s", describe_kv_cache(self.info), why,
                    "on" if config.enable_prefix_caching else "off")
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        cache = KVCacheTensors(loaded.config, num_blocks, config.block_size, kv_dtype, device)
        compile_decode, why = compile_decode_choice(config, loaded.model, loaded.config, device)
        logger.info("decode: %s (%s)", "compiled" if compile_decode else "eager", why)
        self.runner = ModelRunner(loaded.model, cache, device, loaded.config.vocab_size, eos,
                                  compile_decode=compile_decode, batch_invariant=config.batch_invariant)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens, eos,
                                   max_model_len, loaded.tokenizer, config.speculative_config,
                                   grammars=functools.partial(grammar_compiler_for, self.info))
        self.proposer = build_proposer(config, loaded, num_blocks, dtype, device)
        release_freed_heap()  # loading's temporaries (dequantized copies, packing buffers) are garbage now
        self._cond = threading.Condition()  # the one lock: guards the inbox
        self._inbox: list[Request | _Abort] = []
        self._ids_in_inbox: set[str] = set()
        self._rng = random.Random(config.seed)
        self._num_received = 0
        if compile_decode:
            self._warm_up_compiled_decode()

    # ---- any thread -------------------------------------------------------------------------

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
                    prompt: str | None = None, arrival_time: float | None = None,
                    cache_salt: str | None = None) -> str:
        """Queue a request; raises ValueError when it can never fit or names an unknown token."""
        validate_request(self.info, prompt_token_ids, params)
        request_id = request_id or uuid.uuid4().hex
        request = Request(request_id, list(prompt_token_ids), params, prompt=prompt,
                          arrival_time=arrival_time or time.perf_counter(), cache_salt=cache_salt)
        seed = params.seed if params.seed is not None else self._rng.getrandbits(62)
        # each sample draws from its own stream, so which samples share a step never changes the result
        request.sample_generators = [self._generator((seed + i * 0x9E3779B9) % (1 << 63)) for i in range(params.n)]
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = [None]
        with self._cond:
            if request_id in self._ids_in_inbox or request_id in self.scheduler.requests:
                raise ValueError(f"request_id {request_id!r} is already in use")
            self._ids_in_inbox.add(request_id)
            self._inbox.append(request)
            self._cond.notify_all()
        return request_id

    def abort(self, request_id: str) -> None:
        """Cancel a request; its blocks are freed and it is reported finished ("abort") by the next step."""
        with self._cond:
            self._inbox.append(_Abort(request_id))
            self._cond.notify_all()

    def has_unfinished(self) -> bool:
        with self._cond:
            return bool(self._inbox) or self.scheduler.has_unfinished()

    def wait_for_work(self, timeout: float | None = None) -> bool:
        """Block until there is something to step (or wake() / timeout); True when there is."""
        with self._cond:
            return self._cond.wait_for(lambda: self._inbox or self.scheduler.has_unfinished(), timeout)

    def wake(self) -> None:
        """Wake a thread blocked in wait_for_work (e.g. to shut down)."""
        with self._cond:
            self._cond.notify_all()

    def stats(self) -> EngineStats:
        with self._cond:
            num_new = sum(1 for item in self._inbox if isinstance(item, Request))
        c, kv = self.scheduler.counters, self.kv
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting) + num_new,
            num_preemptions_total=c.preemptions, kv_blocks_used=kv.num_used_blocks, kv_blocks_total=kv.num_blocks,
            prompt_tokens_total=c.prompt_tokens, generation_tokens_total=c.generation_tokens,
            tokens_prefilled_last_step=c.last_step_prefill_tokens, tokens_decoded_last_step=c.last_step_decode_tokens,
            prefix_cache_queries_total=c.prefix_cache_queries, prefix_cache_hits_total=c.prefix_cache_hits,
            kv_blocks_cached_free=kv.num_cached_free_blocks, kv_blocks_shared=kv.num_shared_blocks,
            requests_received_total=self._num_received,
            spec_decode_drafts_total=c.spec_drafts, spec_decode_draft_tokens_total=c.spec_draft_tokens,
            spec_decode_accepted_tokens_total=c.spec_accepted_tokens,
            kv_cache_bytes=self.info.kv_cache_bytes, kv_cache_tokens=self.info.kv_cache_tokens)

    # ---- the stepping thread ----------------------------------------------------------------

    def step(self) -> list[EngineCoreOutput]:
        """Run one step; returns a report for every request that changed (aborted ones included).

        Raises EngineStepError when the forward or the update fails: the requests that can have
        caused it are aborted first (their blocks freed) so the next step goes on without them.
        """
        new_ids, outputs = self._drain_inbox()
        plan = self.scheduler.schedule()
        if plan.is_empty:
            self._propose_drafts()  # nothing runs: the proposer lets go of finished sequences
            return outputs
        try:
            result = self.runner.execute(plan)
            outputs += self.scheduler.update_from_output(plan, result)
            self._propose_drafts()  # for the next step, from the tokens this one produced
            return outputs
        except Exception as exc:
            # A request that breaks the engine almost always does so on its first step, so the ones
            # added just now are the suspects; with none we cannot tell and end every running one.
            suspects = [r for r in new_ids if r in self.scheduler.requests] or list(self.scheduler.requests)
            logger.error("engine step failed; aborting request(s) %s", suspects, exc_info=exc)
            for request_id in suspects:
                self.scheduler.abort_request(request_id)
            raise EngineStepError(suspects, exc) from exc

    def stop_sequences(self, stops: list[SequenceStop]) -> None:
        """End samples whose text matched a stop string (from the OutputProcessor, on the stepping thread)."""
        for stop in stops:
            self.scheduler.stop_sequence(stop.request_id, stop.index, stop.stop_string)

    def _propose_drafts(self) -> None:
        """Speculative decoding: drafts for the sequences the scheduler lets speculate this step."""
        if self.proposer is None:
            return
        live = {seq.seq_id for request in self.scheduler.running for seq in request.live_seqs}
        self.scheduler.set_draft_tokens(self.proposer.propose(self.scheduler.speculation_candidates(), live))

    def _drain_inbox(self) -> tuple[list[str], list[EngineCoreOutput]]:
        with self._cond:
            items, self._inbox = self._inbox, []
            self._ids_in_inbox.clear()
        new_ids, outputs = [], []
        for item in items:
            if isinstance(item, Request):
                self._num_received += 1
                self.scheduler.add_request(item)
                new_ids.append(item.request_id)
            else:
                aborted = self.scheduler.abort_request(item.request_id)
                if aborted is not None:
                    outputs.append(aborted)
        return new_ids, outputs

    # ---- helpers ----------------------------------------------------------------------------

    def _generator(self, seed: int) -> torch.Generator:
        generator = torch.Generator(device=self.info.device)
        generator.manual_seed(seed)
        return generator

    def _warm_up_compiled_decode(self) -> None:
        """Compile the decode graphs now, not in a user's request: one per shape class a decode step can take
        (one sequence, which attends unmasked; several, with a padding mask). Afterwards a step that would need
        yet another graph runs eagerly instead of stalling for a compile."""
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        variants = (("one sequence", [8]), ("several sequences", [8, 11]))
        start = time.perf_counter()
        for i, (name, prompt_lens) in enumerate(variants, 1):
            logger.info("compiling decode graph %d/%d (%s) ...", i, len(variants), name)
            for j, n in enumerate(prompt_lens):
                self.add_request([1 + j] * n, params, request_id=f"warmup-{i}-{j}")
            while self.has_unfinished():
                self.step()
            logger.info("decode graph %d/%d ready, %.0f s since compiling began", i, len(variants),
                        time.perf_counter() - start)
        self.runner.decode_forward.freeze()
        counters = self.scheduler.counters
        counters.prompt_tokens = counters.generation_tokens = 0
        counters.prefix_cache_queries = counters.prefix_cache_hits = 0


def _max_model_len(config: EngineConfig, model_config: ModelConfig, model: torch.nn.Module) -> int:
    limit = min(model_config.max_position_embeddings, getattr(model, "max_positions", 1 << 30))
    if config.max_model_len is not None and config.max_model_len > limit:
        raise ValueError(f"max_model_len ({config.max_model_len}) exceeds the model's context length ({limit})")
    return config.max_model_len or limit
