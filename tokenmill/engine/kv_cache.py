"""The paged KV cache's memory: fixed-size blocks in preallocated tensors, and how many fit.

A sequence's K/V live in the blocks of its block table; token i sits in block
``block_table[i // block_size]`` at offset ``i % block_size``. Which sequence owns which block
is the KVCacheManager's business (kv_cache_manager.py); this file holds the tensors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from tokenmill.config import ModelConfig
from tokenmill.model.attention import KVCache

logger = logging.getLogger(__name__)

DEFAULT_CPU_CACHE_FRACTION = 0.25  # of available memory, when --kv-cache-memory is not given
DEFAULT_CACHE_CAP_BYTES = 1 << 30  # ~23k tokens of the default model in float32
DEFAULT_GPU_CACHE_FRACTION = 0.6  # of free GPU memory after the weights are loaded


@dataclass
class BlockCopy:
    """Copy block ``src`` into block ``dst`` in every layer before the next forward (copy-on-write)."""

    src: int
    dst: int


class KVCacheTensors:
    """One (k, v) pair of tensors per layer, each [num_blocks * block_size, num_kv_heads, head_dim]."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        shape = (num_blocks * block_size, config.num_key_value_heads, config.head_dim)
        # zeros, not empty: masked-out slots are still multiplied by 0 in attention, and 0 * NaN = NaN.
        self.layers: list[KVCache] = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(config.num_hidden_layers)
        ]
        self.block_size = block_size

    def copy_blocks(self, copies: list[BlockCopy]) -> None:
        if not copies:
            return
        bs = self.block_size
        src = torch.cat([torch.arange(c.src * bs, (c.src + 1) * bs) for c in copies])
        dst = torch.cat([torch.arange(c.dst * bs, (c.dst + 1) * bs) for c in copies])
        device = self.layers[0][0].device
        src, dst = src.to(device), dst.to(device)
        for k_cache, v_cache in self.layers:
            k_cache.index_copy_(0, dst, k_cache.index_select(0, src))
            v_cache.index_copy_(0, dst, v_cache.index_select(0, src))


def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * block_size * config.num_key_value_heads * config.head_dim * element


def available_memory_bytes(device: torch.device) -> int:
    """Free memory on the device: CUDA's free bytes, or MemAvailable of /proc/meminfo."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def num_blocks_for_budget(config: ModelConfig, block_size: int, dtype: torch.dtype, device: torch.device,
                          memory_gb: float | None) -> int:
    """How many blocks fit the memory budget (explicit GiB, else a fraction of free memory)."""
    if memory_gb is not None:
        budget = int(memory_gb * (1 << 30))
    elif device.type == "cuda":
        budget = int(available_memory_bytes(device) * DEFAULT_GPU_CACHE_FRACTION)
    else:
        budget = min(int(available_memory_bytes(device) * DEFAULT_CPU_CACHE_FRACTION), DEFAULT_CACHE_CAP_BYTES)
    num_blocks = budget // bytes_per_block(config, block_size, dtype)
    if num_blocks < 1:
        raise ValueError(f"kv cache memory {budget} bytes is smaller than one block "
                         f"({bytes_per_block(config, block_size, dtype)} bytes)")
    return num_blocks
