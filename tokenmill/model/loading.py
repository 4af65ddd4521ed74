"""load_model: a checkpoint (GGUF file, HF folder or hub id) turned into a ready model on a device."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.config import EngineConfig, ModelConfig
from tokenmill.model.adaptive_linear import cpu_has_native_bf16, make_batch_adaptive
from tokenmill.model.quant import keep_quantized_types, quantize_linear_weights
from tokenmill.model.registry import build_model
from tokenmill.model.source import load_checkpoint, resolve_model
from tokenmill.model.tokenizer import Tokenizer


@dataclass
class LoadedModel:
    model: torch.nn.Module
    config: ModelConfig
    tokenizer: Tokenizer
    name: str


def load_model(config: EngineConfig, dtype: torch.dtype, device: torch.device) -> LoadedModel:
    """Read the checkpoint named by config.model and build the model in dtype on device.

    ``config.quantization``: auto keeps GGUF Q4_0/Q4_1/Q8_0 weights packed (int4 / int8 kernels) and,
    on a CPU with native bf16, also a dense bf16 copy for prefill and large decode batches
    (adaptive_linear.py); int4 | int8 also quantize the float projection weights on load and keep
    only the packed form; none dequantizes everything.
    """
    keep = keep_quantized_types(config.quantization, resolve_model(config.model)[1])
    checkpoint = load_checkpoint(config.model, dtype, keep_quantized=keep)
    tensors = quantize_linear_weights(checkpoint.tensors, config.quantization)
    model = build_model(checkpoint.config, tensors, dtype, device)
    # batch-invariant mode keeps one weight format whatever the rows: the packed one (model/batch_invariant.py)
    if config.quantization == "auto" and device.type == "cpu" and cpu_has_native_bf16() and not config.batch_invariant:
        make_batch_adaptive(model)
    return LoadedModel(model, checkpoint.config, checkpoint.tokenizer, checkpoint.name)
