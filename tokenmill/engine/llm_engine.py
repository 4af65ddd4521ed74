"""LLMEngine: the engine core plus the API side's OutputProcessor, in one process.

``step()`` runs one core step (schedule -> execute -> update) and turns its token-id reports into
RequestOutputs (text, stop strings, logprob entries). A stop string found there ends its sample in
the core within the same step. ``LLM`` drives it from the caller's thread; ``AsyncEngine`` from a
background thread. add_request and abort may be called from any thread.
"""

from __future__ import annotations

import uuid

from tokenmill.config import EngineConfig
from tokenmill.engine.core import EngineCore
from tokenmill.engine.info import EngineInfo, EngineStats, EngineStepError
from tokenmill.engine.output_processor import OutputProcessor
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams

__all__ = ["EngineInfo", "EngineStats", "EngineStepError", "LLMEngine"]


class LLMEngine:
    """Continuous batching over a paged KV cache, with text in and text out."""

    def __init__(self, config: EngineConfig) -> None:
        self.core = EngineCore(config)
        self.info: EngineInfo = self.core.info
        self.tokenizer = self.info.tokenizer
        self.output_processor = OutputProcessor(self.tokenizer)

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
                    prompt: str | None = None, arrival_time: float | None = None,
                    cache_salt: str | None = None) -> str:
        """Queue a request; raises ValueError when it can never fit, names an unknown token or reuses an id."""
        request_id = request_id or uuid.uuid4().hex
        self.output_processor.add_request(request_id, prompt, prompt_token_ids, params)
        try:
            self.core.add_request(prompt_token_ids, params, request_id, prompt, arrival_time, cache_salt)
        except Exception:
            self.output_processor.remove_request(request_id)
            raise
        return request_id

    def abort(self, request_id: str) -> None:
        """Cancel a request; its blocks are freed and it is reported finished ("abort") by the next step."""
        self.core.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.core.has_unfinished()

    def wait_for_work(self, timeout: float | None = None) -> bool:
        return self.core.wait_for_work(timeout)

    def wake(self) -> None:
        self.core.wake()

    def stats(self) -> EngineStats:
        return self.core.stats()

    def step(self) -> list[RequestOutput]:
        """Run one engine step and return the outputs of the requests that changed.

        Raises EngineStepError (the suspects already aborted in the core) when the step failed.
        """
        try:
            core_outputs = self.core.step()
        except EngineStepError as exc:
            for request_id in exc.request_ids:
                self.output_processor.remove_request(request_id)
            raise
        outputs, stops = self.output_processor.process(core_outputs)
        if stops:
            self.core.stop_sequences(stops)
        return outputs

    # Read-only conveniences (the same as ``info``).
    @property
    def model_name(self) -> str:
        return self.info.model_name

    @property
    def max_model_len(self) -> int:
        return self.info.max_model_len

    @property
    def eos_token_ids(self) -> list[int]:
        return self.info.eos_token_ids
