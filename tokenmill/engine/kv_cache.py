"""The paged KV cache's memory: fixed-size blocks in preallocated tensors, its element type, and how many fit.

A sequence's K/V live in the blocks of its block table; token i sits in block
``block_table[i // block_size]`` at offset ``i % block_size``. Which sequence owns which block
is the KVCacheManager's business (kv_cache_manager.py); this file holds the tensors, picks their
type (``--kv-cache-dtype``) and sizes them (``--kv-cache-memory``, else a capped share of free memory).
See docs/memory.md for the numbers behind the defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import logging
import math
import mmap
from typing import Any

import torch

from tokenmill.config import ModelConfig
from tokenmill.engine.kv_cache_manager import BlockCopy
from tokenmill.model.attention import Int8KVCache, KVCache

logger = logging.getLogger(__name__)

DEFAULT_CPU_CACHE_FRACTION = 0.25  # of available memory, when --kv-cache-memory is not given
DEFAULT_CACHE_CAP_BYTES = 512 << 20  # ~23k tokens of the default model in 16 bits (46k in int8)
DEFAULT_GPU_CACHE_FRACTION = 0.6  # of free GPU memory after the weights are loaded
HALF_DTYPES = (torch.bfloat16, torch.float16)


class KVCacheTensors:
    """One cache per layer: (k, v) [num_blocks * block_size, num_kv_heads, head_dim] in ``dtype``, or for
    ``torch.int8`` an ``Int8KVCache`` (int8 k, v plus float32 scales [num_slots, num_kv_heads, 2]).

    On CPU all of it lies in one anonymous memory map: zeros that take no memory until first written, so the
    process holds the blocks requests have used, not the whole budget (a server that has seen 7k tokens of
    traffic holds those 7k, up to its --kv-cache-memory as traffic grows; docs/memory.md)."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        slots, hkv = num_blocks * block_size, config.num_key_value_heads
        per_layer = [((slots, hkv, config.head_dim), dtype)] * 2  # k, v
        if dtype == torch.int8:
            per_layer.append(((slots, hkv, 2), torch.float32))  # the scales
        tensors, self._mapping = _zeroed_tensors(per_layer * config.num_hidden_layers, device)
        n = len(per_layer)
        groups = [tensors[i:i + n] for i in range(0, len(tensors), n)]
        self.layers: list[KVCache] = [Int8KVCache(*g) if dtype == torch.int8 else (g[0], g[1]) for g in groups]
        self.block_size = block_size

    def copy_blocks(self, copies: list[BlockCopy]) -> None:
        if not copies:
            return
        bs = self.block_size
        src = torch.cat([torch.arange(c.src * bs, (c.src + 1) * bs) for c in copies])
        dst = torch.cat([torch.arange(c.dst * bs, (c.dst + 1) * bs) for c in copies])
        device = self.layers[0][0].device
        src, dst = src.to(device), dst.to(device)
        for layer in self.layers:
            for t in layer:  # k, v (and an int8 cache's scales): all indexed by slot in dim 0
                t.index_copy_(0, dst, t.index_select(0, src))


def _zeroed_tensors(specs: list[tuple[tuple[int, ...], torch.dtype]],
                    device: torch.device) -> tuple[list[torch.Tensor], mmap.mmap | None]:
    """Zero tensors of the given (shape, dtype) and, on CPU, the anonymous memory map they all lie in (each
    64-byte aligned): the kernel hands out zero pages and commits each page when it is first written. Zeros,
    not garbage: masked-out slots are still multiplied by 0 in attention, and 0 * NaN = NaN."""
    if device.type != "cpu":
        return [torch.zeros(shape, dtype=dtype, device=device) for shape, dtype in specs], None
    sizes = [math.prod(shape) * dtype.itemsize for shape, dtype in specs]
    starts = [0]
    for size in sizes:
        starts.append(starts[-1] + -(-size // 64) * 64)
    mapping = mmap.mmap(-1, max(1, starts[-1]))
    memory = torch.frombuffer(mapping, dtype=torch.uint8)
    return [memory[start:start + size].view(dtype).view(shape)
            for (shape, dtype), start, size in zip(specs, starts[:-1], sizes, strict=True)], mapping


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype, device: torch.device) -> tuple[torch.dtype, str]:
    """The cache's element type for ``--kv-cache-dtype name`` and why (for the start-up log line).

    auto: the model's dtype when it is 16-bit already; else bfloat16, which keeps float32's range. float16's
    10-bit mantissa is closer to float32 on the golden prompts, but its range is not: with the default model's
    packed int4 weights alone (``--quantization int4``) its K/V turned "Paris" into nonsense, where bfloat16 and
    float32 answer "Paris". docs/memory.md has the measurements.
    """
    if name != "auto":
        return getattr(torch, name), "set by --kv-cache-dtype"
    if model_dtype in HALF_DTYPES:
        return model_dtype, "auto: the model's dtype"
    return torch.bfloat16, "auto: 16-bit; bfloat16 keeps float32's range"


def bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    """KV bytes of one token: 2 (K and V) x layers x kv_heads x head_dim x element size, plus for int8 a
    float32 scale per layer, K/V and head."""
    element = torch.empty((), dtype=dtype).element_size()
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * element
    if dtype == torch.int8:
        per_token += 2 * config.num_hidden_layers * config.num_key_value_heads * 4
    return per_token


def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    return block_size * bytes_per_token(config, dtype)

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


def describe_kv_cache(info: Any) -> str:
    """One line about an engine's cache (``EngineInfo``): type, bytes per token, tokens held, size, and how
    many requests of the full context length fit at once."""
    fit = info.kv_cache_tokens // info.max_model_len
    return (f"KV cache: {info.kv_cache_dtype}, {info.kv_bytes_per_token} bytes/token, "
            f"{info.kv_cache_tokens} tokens ({info.num_blocks} blocks of {info.block_size}), "
            f"{info.kv_cache_bytes / 2**20:.1f} MiB; {fit} concurrent request(s) of {info.max_model_len} tokens fit")


def release_freed_heap(collect: bool = True) -> None:
    """Hand the heap pages that loading freed back to the OS (glibc keeps them otherwise): about 80 MiB of
    resident memory for the default model, measured (docs/memory.md). A no-op off glibc. The engine core also
    calls it (``collect=False``: no garbage collection) while serving, see core_process.py."""
    if collect:
        gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None off glibc; looked up once (finding libc spawns ldconfig), not per call."""
    libc = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(libc).malloc_trim if libc else None
    except (OSError, AttributeError):
        return None
