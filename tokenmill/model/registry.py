"""Architecture name -> the model class that runs it. A new family is its own file plus one line in
``MODEL_CLASSES``; the class declares its architectures, config parsing and tensor names (see base.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import torch

from tokenmill.config import ModelConfig
from tokenmill.model.attention import AttentionMetadata, KVCache
from tokenmill.model.base import CausalLMBase
from tokenmill.model.gemma3 import Gemma3ForCausalLM
from tokenmill.model.llama import LlamaForCausalLM
from tokenmill.model.phi3 import Phi3ForCausalLM
from tokenmill.model.qwen3 import Qwen3ForCausalLM

MODEL_CLASSES: list[type[CausalLMBase]] = [
    LlamaForCausalLM,  # llama, mistral, qwen2
    Qwen3ForCausalLM,
    Phi3ForCausalLM,
    Gemma3ForCausalLM,
]

_BY_ARCH: dict[str, type[CausalLMBase]] = {a: cls for cls in MODEL_CLASSES for a in cls.architectures}
_BY_HF_ARCH: dict[str, str] = {h: a for cls in MODEL_CLASSES for h, a in cls.hf_architectures.items()}


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


def supported_architectures() -> list[str]:
    return sorted(_BY_ARCH)


def model_class(arch: str) -> type[CausalLMBase]:
    """The class for ``ModelConfig.architecture`` / a GGUF ``general.architecture``; ValueError if unknown."""
    cls = _BY_ARCH.get(arch)
    if cls is None:
        raise ValueError(f"unsupported architecture {arch!r}; supported: {supported_architectures()}")
    return cls


def hf_architecture(cfg: dict[str, Any]) -> str:
    """The architecture of a config.json dict: its "architectures" entries, else its model_type."""
    archs = cfg.get("architectures") or []
    arch = next((_BY_HF_ARCH[a] for a in archs if a in _BY_HF_ARCH), None)
    if arch is None and cfg.get("model_type") in _BY_ARCH:
        arch = cfg["model_type"]
    if arch is None:
        raise ValueError(f"unsupported architecture {archs or cfg.get('model_type')!r}; "
                         f"supported: {sorted(_BY_HF_ARCH)}")
    return arch


def model_config_from_hf_dict(cfg: dict[str, Any]) -> ModelConfig:
    """ModelConfig from a config.json dict, parsed by the class of its architecture."""
    arch = hf_architecture(cfg)
    return model_class(arch).config_from_hf(cfg, arch)


def build_model(config: ModelConfig, tensors: Mapping[str, Any], dtype: torch.dtype,
                device: torch.device) -> CausalLM:
    """Build the model for ``config.architecture`` from Hugging Face-named tensors, in eval mode.

    Raises ValueError for an unknown architecture or a missing / unexpected tensor.
    """
    cls = model_class(config.architecture)
    with torch.no_grad():
        model = cls(config, tensors, dtype, device)
    return model.eval()
