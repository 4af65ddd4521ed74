"""The paged KV cache: fixed-size blocks in preallocated tensors, and the BlockManager that hands them out.

A sequence's K/V live in the blocks of its ``block_table``; token i sits in block
``block_table[i // block_size]`` at offset ``i % block_size``. Blocks are reference-counted so
that forked sequences (n > 1 samples, beams) share their common prefix; writing into a shared
block first copies it (copy-on-write).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

import torch

from tokenmill.config import ModelConfig
from tokenmill.engine.request import Sequence
from tokenmill.model.attention import KVCache

logger = logging.getLogger(__name__)

DEFAULT_CPU_CACHE_FRACTION = 0.25  # of available memory, when --kv-cache-memory is not given
DEFAULT_CACHE_CAP_BYTES = 1 << 30  # ~23k tokens of the default model in float32
DEFAULT_GPU_CACHE_FRACTION = 0.6  # of free GPU memory after the weights are loaded


class NoFreeBlocks(Exception):
    """Raised by BlockManager when a request needs more blocks than are free."""


@dataclass
class BlockCopy:
    """Copy block ``src`` into block ``dst`` in every layer before the next forward (copy-on-write)."""

    src: int
    dst: int


class BlockManager:
    """Free list and reference counts of the KV cache blocks."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def ref_count(self, block: int) -> int:
        return self._refs[block]

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold num_tokens tokens."""
        return -(-num_tokens // self.block_size)

    def num_new_blocks(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks seq must gain to hold num_tokens tokens, counting a copy-on-write of a shared block."""
        grow = max(0, self.blocks_for(num_tokens) - len(seq.block_table))
        return grow + len(self._shared_blocks_to_write(seq, num_tokens))

    def allocate(self, seq: Sequence, num_tokens: int) -> list[BlockCopy]:
        """Make seq able to hold num_tokens tokens: append blocks, and copy shared blocks it will write.

        Returns the block copies the cache must perform. Raises NoFreeBlocks (changing nothing) when short.
        """
        if self.num_new_blocks(seq, num_tokens) > len(self._free):
            raise NoFreeBlocks(f"need {self.num_new_blocks(seq, num_tokens)} blocks, {len(self._free)} free")
        copies = []
        for index in self._shared_blocks_to_write(seq, num_tokens):
            old = seq.block_table[index]
            new = self._take()
            self._refs[old] -= 1
            seq.block_table[index] = new
            copies.append(BlockCopy(old, new))
        while len(seq.block_table) < self.blocks_for(num_tokens):
            seq.block_table.append(self._take())
        return copies

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Give child the parent's blocks (shared, reference-counted)."""
        self.free(child)
        child.block_table = list(parent.block_table)
        for block in child.block_table:
            self._refs[block] += 1

    def free(self, seq: Sequence) -> None:
        """Drop seq's references; blocks nobody references go back to the free list."""
        for block in seq.block_table:
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free.append(block)
        seq.block_table = []

    def _take(self) -> int:
        block = self._free.popleft()
        self._refs[block] = 1
        return block

    def _shared_blocks_to_write(self, seq: Sequence, num_tokens: int) -> list[int]:
        """Indices in seq.block_table of shared blocks that tokens [num_computed, num_tokens) land in."""
        if num_tokens <= seq.num_computed_tokens:
            return []
        first = seq.num_computed_tokens // self.block_size
        last = min(self.blocks_for(num_tokens), len(seq.block_table))
        return [i for i in range(first, last) if self._refs[seq.block_table[i]] > 1]


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
