"""load_model: a checkpoint (GGUF file, HF folder or hub id) turned into a ready model on a device."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.config import EngineConfig, ModelConfig
from tokenmill.model.registry import build_model
from tokenmill.model.source import load_checkpoint
from tokenmill.model.tokenizer import Tokenizer


@dataclass
class LoadedModel:
    model: torch.nn.Module
    config: ModelConfig
    tokenizer: Tokenizer
    name: str


def load_model(config: EngineConfig, dtype: torch.dtype, device: torch.device) -> LoadedModel:
    """Read the checkpoint named by config.model and build the model in dtype on device."""
    checkpoint = load_checkpoint(config.model, dtype)
    model = build_model(checkpoint.config, checkpoint.tensors, dtype, device)
    return LoadedModel(model, checkpoint.config, checkpoint.tokenizer, checkpoint.name)
