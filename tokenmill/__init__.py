"""tokenmill: a readable text-generation inference engine and server on PyTorch."""

from tokenmill.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from tokenmill.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "RequestMetrics"]


def __getattr__(name: str):
    # LLM pulls in torch and the model code: import it only when asked for.
    if name == "LLM":
        from tokenmill.llm import LLM
        return LLM
    raise AttributeError(name)
