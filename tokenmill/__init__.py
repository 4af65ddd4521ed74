"""tokenmill: a readable text-generation inference engine and server on PyTorch."""

from importlib import metadata as _metadata

from tokenmill.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from tokenmill.sampling_params import SamplingParams, StructuredOutputsParams

try:
    __version__ = _metadata.version("tokenmill")
except _metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput", "Logprob", "RequestMetrics"]


def __getattr__(name: str):
    # LLM pulls in torch and the model code: import it only when asked for.
    if name == "LLM":
        from tokenmill.llm import LLM
        return LLM
    raise AttributeError(name)
