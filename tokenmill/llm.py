"""LLM: the offline Python API (generate, chat) on top of LLMEngine."""

from __future__ import annotations

import time
from collections.abc import Sequence

from tqdm import tqdm

from tokenmill.config import DEFAULT_MODEL, EngineConfig
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams

Prompt = str | list[int]
Message = dict[str, str]


class LLM:
    """Load a model once, then generate for many prompts at once with continuous batching.

    >>> llm = LLM()  # SmolLM2-135M-Instruct
    >>> llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=8))[0].outputs[0].text
    """

    def __init__(self, model: str = DEFAULT_MODEL, **kwargs) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **kwargs))

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for one prompt or many (text or token ids); outputs come back in prompt order."""
        prompt_list = _as_prompt_list(prompts)
        params_list = _as_params_list(sampling_params, len(prompt_list))
        ids = []
        for prompt, params in zip(prompt_list, params_list):
            if isinstance(prompt, str):
                if not prompt:
                    raise ValueError("prompt must not be empty")
                token_ids = self.engine.tokenizer.encode(prompt)
                ids.append(self.engine.add_request(token_ids, params, prompt=prompt))
            else:
                ids.append(self.engine.add_request(list(prompt), params))
        return self._run(ids, use_tqdm)

    def chat(self, messages: list[Message] | list[list[Message]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        if not messages:
            raise ValueError("messages must not be empty")
        conversations = [messages] if isinstance(messages[0], dict) else messages
        prompts = [self.engine.tokenizer.apply_chat_template(c, add_generation_prompt=add_generation_prompt)
                   for c in conversations]
        token_ids = [self.engine.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        params_list = _as_params_list(sampling_params, len(prompts))
        ids = [self.engine.add_request(t, p, prompt=text) for t, p, text in zip(token_ids, params_list, prompts)]
        return self._run(ids, use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        final: dict[str, RequestOutput] = {}
        wanted = set(request_ids)
        bar = tqdm(total=len(request_ids), desc="Generating", unit="req", disable=not use_tqdm)
        start, tokens = time.perf_counter(), 0
        while self.engine.has_unfinished() and not wanted <= final.keys():
            for out in self.engine.step():
                tokens += sum(len(c.delta_token_ids) for c in out.outputs)
                if out.finished and out.request_id in wanted:
                    final[out.request_id] = out
                    bar.update(1)
            if use_tqdm:
                bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - start, 1e-9):.1f}")
        bar.close()
        return [final[i] for i in request_ids]


def _as_prompt_list(prompts) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts must not be empty")
    if all(isinstance(t, int) for t in prompts):
        return [prompts]
    return prompts


def _as_params_list(params, count: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * count
    if isinstance(params, SamplingParams):
        return [params] * count
    params = list(params)
    if len(params) != count:
        raise ValueError(f"got {len(params)} sampling params for {count} prompts")
    return params
