"""Architecture name (``ModelConfig.architecture``) -> the model class that runs it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import torch

from tokenmill.config import ModelConfig
from tokenmill.model.attention import AttentionMetadata, KVCache
from tokenmill.model.llama import LlamaForCausalLM


class CausalLM(Protocol):
    """What the model runner needs from a model."""

    config: ModelConfig

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions [T] -> hidden states [T, hidden]; writes K/V into kv_caches."""
        ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab] float32."""
        ...


# Mistral and Qwen2 are Llama with different defaults (q/k/v bias, theta): one class serves all three.
MODEL_CLASSES: dict[str, type[LlamaForCausalLM]] = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
}


def build_model(config: ModelConfig, tensors: Mapping[str, Any], dtype: torch.dtype,
                device: torch.device) -> CausalLM:
    """Build the model for ``config.architecture`` from Hugging Face-named tensors, in eval mode.

    Raises ValueError for an unknown architecture or a missing / unexpected tensor.
    """
    cls = MODEL_CLASSES.get(config.architecture)
    if cls is None:
        raise ValueError(f"unsupported architecture {config.architecture!r}; supported: {sorted(MODEL_CLASSES)}")
    with torch.no_grad():
        model = cls(config, tensors, dtype, device)
    return model.eval()
