"""GGUF tensors -> torch tensors under Hugging Face names: dequantized, or kept as packed blocks.

The file's table and memory-mapped data come from ``gguf.read_gguf``; the ``gguf`` package supplies the
block dequantizers for the formats not done here in torch.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from tokenmill.config import ModelConfig
from tokenmill.model.base import unpermute_rows
from tokenmill.model.gguf import GGUFFile, GGUFTensorInfo, RawQuantTensor


def dequantize_tensor(info: GGUFTensorInfo, dtype: torch.dtype) -> torch.Tensor:
    """Dense tensor of ``info`` in ``dtype`` (shape ``info.shape``)."""
    t = info.ggml_type
    raw = torch.from_numpy(info.data)  # [rows, bytes_per_row] uint8
    if t in _FLOAT_TYPES:
        # a copy, not a view: a model tensor viewing the file's memory map would keep the whole map, and every
        # page of it the loader read, resident for the life of the process (93 MB for the default model)
        return raw.view(_FLOAT_TYPES[t]).reshape(info.shape).to(dtype, copy=True)
    if t in _TORCH_DEQUANT:
        out = _TORCH_DEQUANT[t](raw)
    else:  # k-quants: the gguf package's numpy reference dequantizer
        out = torch.from_numpy(dequantize(info.data, t))
    return out.reshape(info.shape).to(dtype)


def _f16_field(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The float16 stored at byte ``start`` of each block, as float32: [rows, n_blocks, 1]."""
    return blocks[..., start:start + 2].contiguous().view(torch.float16).float()


def _dequant_q8_0(raw: torch.Tensor) -> torch.Tensor:
    # block of 34 bytes: f16 scale d, 32 x int8 q; x = d * q
    blocks = raw.reshape(raw.shape[0], -1, 34)
    return _f16_field(blocks, 0) * blocks[..., 2:].contiguous().view(torch.int8).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    # 16 packed bytes -> 32 values: low nibbles are elements 0..15, high nibbles 16..31
    return torch.cat([qs & 0xF, qs >> 4], dim=-1).float()


def _dequant_q4_0(raw: torch.Tensor) -> torch.Tensor:
    # block of 18 bytes: f16 d, 16 bytes of nibbles; x = d * (q - 8)
    blocks = raw.reshape(raw.shape[0], -1, 18)
    return _f16_field(blocks, 0) * (_nibbles(blocks[..., 2:]) - 8)


def _dequant_q4_1(raw: torch.Tensor) -> torch.Tensor:
    # block of 20 bytes: f16 d, f16 min m, 16 bytes of nibbles; x = d * q + m
    blocks = raw.reshape(raw.shape[0], -1, 20)
    return _f16_field(blocks, 0) * _nibbles(blocks[..., 4:]) + _f16_field(blocks, 2)


# Unquantized GGML types, stored as the torch type's bytes.
_FLOAT_TYPES = {GGMLQuantizationType.F32: torch.float32, GGMLQuantizationType.F16: torch.float16,
                GGMLQuantizationType.BF16: torch.bfloat16}
# The common simple formats run as torch ops (several times faster than the numpy reference).
_TORCH_DEQUANT = {GGMLQuantizationType.Q8_0: _dequant_q8_0, GGMLQuantizationType.Q4_0: _dequant_q4_0,
                  GGMLQuantizationType.Q4_1: _dequant_q4_1}


def load_gguf_tensors(gf: GGUFFile, config: ModelConfig, dtype: torch.dtype = torch.float32,
                      keep_quantized: frozenset[int] = frozenset()) -> dict[str, torch.Tensor | RawQuantTensor]:
    """All tensors under HF names, dequantized to ``dtype`` except 2-D weights whose GGML type is in
    ``keep_quantized`` (returned as RawQuantTensor). The model class of ``config.architecture`` names them
    and undoes what llama.cpp's converter changed (Llama's Q/K row order, Gemma's norm offset)."""
    from tokenmill.model.registry import model_class

    family = model_class(config.architecture)
    out: dict[str, torch.Tensor | RawQuantTensor] = {}
    for name, info in gf.tensors.items():
        hf_name = family.hf_tensor_name(name)
        n_head = family.gguf_row_permutation(config, hf_name)
        if len(info.shape) == 2 and int(info.ggml_type) in keep_quantized:
            data = info.data if n_head is None else unpermute_rows(info.data, n_head)
            out[hf_name] = RawQuantTensor(int(info.ggml_type), np.ascontiguousarray(data), info.shape)
            continue
        tensor = dequantize_tensor(info, torch.float32)
        tensor = tensor if n_head is None else unpermute_rows(tensor, n_head).contiguous()
        out[hf_name] = family.convert_gguf_tensor(config, hf_name, tensor).to(dtype)
    return out
