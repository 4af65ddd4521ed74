"""Weight-only quantized linear layers: GGUF Q4_0/Q4_1/Q4_K/Q5_0/Q8_0 blocks and float weights on int4 kernels.

Decode reads every weight once per step, so its speed is the size of the weights. This module keeps
them small and runs PyTorch's int4 matmul on them without ever materializing a float copy.

Two weight formats, both with one scale per group of ``GROUP_SIZE`` (32) input columns:

- ``Int4Weight``: ``w[n, k] = (q[n, k] - 8) * scale[n, g] + zero[n, g]`` with ``q`` in 0..15 and
  ``g = k // 32``. This is exactly PyTorch's convention for ``_weight_int4pack_mm``. GGUF converts
  without loss: Q4_0 is ``d * (q - 8)`` (zero = 0) and Q4_1 is ``d * q + m = d * (q - 8) + (m + 8d)``
  (zero = m + 8d).
- ``Int8Weight``: ``w[n, k] = q[n, k] * scale[n, g]`` with ``q`` in -128..127; GGUF Q8_0 is exactly
  this. It runs on the same int4 kernel by splitting each byte into two nibbles,
  ``q = 16 * hi + lo`` with ``hi`` in -8..7 and ``lo`` in 0..15: the layer holds a ``[2N, K]`` int4
  weight (rows ``:N`` give ``16 * d * hi``, rows ``N:`` give ``d * lo``) and adds the two halves of
  the output. Still exact, still one byte per weight, and faster here than ``_weight_int8pack_mm``
  (see docs/quantization.md for the measurements).

The kernels read bfloat16 activations (CUDA requires it; on CPU the float32 path of the int4
kernel is ~25x slower), so ``QuantLinear`` casts its input to ``compute_dtype`` and its output back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

GROUP_SIZE = 32

# GGML type ids (gguf.GGMLQuantizationType values) this module keeps quantized.
GGML_Q4_0 = 2
GGML_Q4_1 = 3
GGML_Q5_0 = 6
GGML_Q8_0 = 8
GGML_Q4_K = 12
# Converted without loss: Q4_0, Q4_1 and Q4_K to int4, Q5_0 and Q8_0 to int8. Q6_K (16-column groups) and
# the other k-quants have no exact form here: the loader dequantizes them to the model dtype.
SUPPORTED_GGML_TYPES = frozenset({GGML_Q4_0, GGML_Q4_1, GGML_Q5_0, GGML_Q8_0, GGML_Q4_K})
QK_K = 256  # weights per k-quant super-block


@dataclass
class Int4Weight:
    """Group-wise asymmetric int4: ``w[n, k] = (q[n, k] - 8) * scale[n, k // 32] + zero[n, k // 32]``."""

    q: torch.Tensor  # uint8 [N, K], values 0..15
    scale: torch.Tensor  # float32 [N, K // 32]
    zero: torch.Tensor  # float32 [N, K // 32]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [N, K] this stands for."""
        s = self.scale.repeat_interleave(GROUP_SIZE, dim=1)
        z = self.zero.repeat_interleave(GROUP_SIZE, dim=1)
        return (self.q.float() - 8) * s + z


@dataclass
class Int8Weight:
    """Group-wise symmetric int8: ``w[n, k] = q[n, k] * scale[n, k // 32]`` (GGUF Q8_0)."""

    q: torch.Tensor  # int8 [N, K]
    scale: torch.Tensor  # float32 [N, K // 32]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [N, K] this stands for."""
        return self.q.float() * self.scale.repeat_interleave(GROUP_SIZE, dim=1)

    def split(self) -> tuple[Int4Weight, Int4Weight]:
        """The exact int4 pair (hi, lo): hi has scale 16*d and q = hi + 8, lo has scale d and q = lo,
        so that hi.dequantize() + lo.dequantize() == self.dequantize() (``q = 16 * hi + lo``)."""
        q = self.q.to(torch.int16)
        hi = torch.div(q, 16, rounding_mode="floor")  # -8..7
        lo = q - 16 * hi  # 0..15
        zeros = torch.zeros_like(self.scale)
        return (Int4Weight(q=(hi + 8).to(torch.uint8), scale=16 * self.scale, zero=zeros),
                Int4Weight(q=lo.to(torch.uint8), scale=self.scale, zero=8 * self.scale))


QuantWeight = Int4Weight | Int8Weight


def _blocks(data: np.ndarray, shape: tuple[int, int], block_bytes: int) -> np.ndarray:
    """Raw GGUF bytes -> uint8 [N, K // 32, block_bytes], one block per 32 weights of a row."""
    n, k = shape
    if k % GROUP_SIZE:
        raise ValueError(f"in_features must be a multiple of {GROUP_SIZE} for GGUF blocks, got {k}")
    data = np.ascontiguousarray(data, dtype=np.uint8)
    if data.size != n * (k // GROUP_SIZE) * block_bytes:
        raise ValueError(f"GGUF data has {data.size} bytes, expected {n * (k // GROUP_SIZE) * block_bytes} "
                         f"for shape {shape}")
    return data.reshape(n, k // GROUP_SIZE, block_bytes)


def _f16(blocks: np.ndarray, start: int) -> torch.Tensor:
    """The float16 stored at byte ``start`` of each block, as float32 [N, K // 32]."""
    half = np.ascontiguousarray(blocks[..., start:start + 2]).view(np.float16)[..., 0]
    return torch.from_numpy(half.astype(np.float32))


def _nibbles(qs: np.ndarray) -> torch.Tensor:
    """Q4 block bytes [N, G, 16] -> codes uint8 [N, G * 32]: low nibbles are items 0..15, high 16..31."""
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
    return torch.from_numpy(q.reshape(q.shape[0], -1))


def from_gguf(ggml_type: int, data: np.ndarray, shape: tuple[int, int]) -> QuantWeight:
    """Convert raw GGUF blocks (uint8, one row per output row) of a [N, K] weight, losslessly."""
    if ggml_type == GGML_Q4_0:  # block: d f16, 16 bytes of nibbles
        b = _blocks(data, shape, 18)
        d = _f16(b, 0)
        return Int4Weight(q=_nibbles(b[..., 2:]), scale=d, zero=torch.zeros_like(d))
    if ggml_type == GGML_Q4_1:  # block: d f16, m f16, 16 bytes of nibbles
        b = _blocks(data, shape, 20)
        d, m = _f16(b, 0), _f16(b, 2)
        return Int4Weight(q=_nibbles(b[..., 4:]), scale=d, zero=m + 8 * d)
    if ggml_type == GGML_Q8_0:  # block: d f16, 32 int8
        b = _blocks(data, shape, 34)
        q = np.ascontiguousarray(b[..., 2:]).view(np.int8).reshape(shape)
        return Int8Weight(q=torch.from_numpy(q), scale=_f16(b, 0))
    if ggml_type == GGML_Q5_0:
        return _from_q5_0(data, shape)
    if ggml_type == GGML_Q4_K:
        return _from_q4_k(data, shape)
    raise ValueError(f"ggml_type must be one of {sorted(SUPPORTED_GGML_TYPES)} (Q4_0, Q4_1, Q5_0, Q8_0, Q4_K), "
                     f"got {ggml_type}")


def _from_q5_0(data: np.ndarray, shape: tuple[int, int]) -> Int8Weight:
    """Q5_0 block: d f16, qh u32 (bit j = 5th bit of item j), 16 bytes of nibbles; x = d * (q - 16).
    q - 16 lies in -16..15, so it is an exact int8 weight with the block's scale."""
    b = _blocks(data, shape, 22)
    qh = np.ascontiguousarray(b[..., 2:6]).view(np.uint32)  # [N, G, 1]
    high = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)  # [N, G, 32]
    low = np.concatenate([b[..., 6:] & 0x0F, b[..., 6:] >> 4], axis=-1)  # [N, G, 32]
    q = (low | (high << 4)).astype(np.int8) - np.int8(16)
    return Int8Weight(q=torch.from_numpy(q.reshape(shape)), scale=_f16(b, 0))


def _from_q4_k(data: np.ndarray, shape: tuple[int, int]) -> Int4Weight:
    """Q4_K super-block of 256: d f16, dmin f16, 12 bytes of 6-bit (scale, min) pairs for its 8 groups of 32,
    128 bytes of nibbles; x = d * sc * q - dmin * m. That is int4 with scale d*sc and zero 8*d*sc - dmin*m."""
    from gguf.quants import Q4_K  # the 6-bit scale unpacking, as the reference dequantizer does it

    n, k = shape
    if k % QK_K:
        raise ValueError(f"in_features must be a multiple of {QK_K} for Q4_K, got {k}")
    b = np.ascontiguousarray(data, dtype=np.uint8).reshape(n * k // QK_K, 144)
    d = b[:, 0:2].copy().view(np.float16).astype(np.float32)  # [B, 1]
    dmin = b[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, m = Q4_K.get_scale_min(b[:, 4:16])  # [B, 8] each
    qs = b[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    q = (qs & 0x0F).reshape(n, k)  # item order: per 64, the low nibbles of 32 bytes, then their high nibbles
    scale = (d * sc.astype(np.float32)).reshape(n, k // GROUP_SIZE)
    offset = (dmin * m.astype(np.float32)).reshape(n, k // GROUP_SIZE)
    scale_t = torch.from_numpy(scale)
    return Int4Weight(q=torch.from_numpy(np.ascontiguousarray(q)), scale=scale_t,
                      zero=8 * scale_t - torch.from_numpy(offset))


def _groups(w: torch.Tensor) -> torch.Tensor:
    """float weight [N, K] -> float32 [N, K // 32, 32]."""
    n, k = w.shape
    if k % GROUP_SIZE:
        raise ValueError(f"in_features must be a multiple of {GROUP_SIZE} to quantize, got {k}")
    return w.detach().float().reshape(n, k // GROUP_SIZE, GROUP_SIZE)


def quantize_int4(w: torch.Tensor) -> Int4Weight:
    """Round-to-nearest asymmetric int4 per group of 32 (min/max): scale = (max - min) / 15."""
    g = _groups(w)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-12)
    q = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, 15)
    # q * scale + lo == (q - 8) * scale + (lo + 8 * scale)
    return Int4Weight(q=q.to(torch.uint8).reshape(w.shape), scale=scale, zero=lo + 8 * scale)


def quantize_int8(w: torch.Tensor) -> Int8Weight:
    """Round-to-nearest symmetric int8 per group of 32 (absmax / 127), the Q8_0 recipe."""
    g = _groups(w)
    scale = (g.abs().amax(-1) / 127).clamp_min(1e-12)
    q = (g / scale[..., None]).round().clamp(-127, 127)
    return Int8Weight(q=q.to(torch.int8).reshape(w.shape), scale=scale)


def _pack_int4(q: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Codes uint8 [N, K] -> the device's packed int4 layout for ``_weight_int4pack_mm*``."""
    if device.type == "cpu":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    # CUDA: two codes per byte, even column in the high nibble, then tiled for tensor cores.
    pairs = (q[:, ::2] << 4 | q[:, 1::2]).to(device)
    k_tiles = next(t for t in (8, 4, 2) if (q.shape[1] // 16) % t == 0)
    return torch.ops.aten._convert_weight_to_int4pack(pairs, k_tiles)


_CPU_KERNEL = torch.ops.aten._weight_int4pack_mm_for_cpu.default
_CUDA_KERNEL = torch.ops.aten._weight_int4pack_mm.default


def pick_compute_dtype(device: torch.device) -> torch.dtype:
    """Activation dtype for the int4 kernel: bfloat16 (CUDA needs it; on CPU float32 is ~25x slower)."""
    del device  # same answer on both today; kept so callers need not change when that differs
    return torch.bfloat16




def is_quantized(w: object) -> bool:
    """True for a weight this module turns into a QuantLinear (GGUF raw blocks or Int4/Int8Weight)."""
    return isinstance(w, Int4Weight | Int8Weight) or _is_raw_gguf(w)


def _is_raw_gguf(w: object) -> bool:
    # tokenmill.model.gguf.RawQuantTensor, matched by its fields to keep this module import-free of it
    return all(hasattr(w, a) for a in ("ggml_type", "data", "shape")) and not isinstance(w, torch.Tensor)


def as_quant_weight(w: object) -> QuantWeight:
    """Int4Weight | Int8Weight for a GGUF RawQuantTensor, an Int4/Int8Weight, or a float tensor (int8)."""
    if isinstance(w, Int4Weight | Int8Weight):
        return w
    if _is_raw_gguf(w):
        return from_gguf(int(w.ggml_type), w.data, tuple(w.shape))
    if isinstance(w, torch.Tensor) and w.is_floating_point() and w.dim() == 2:
        # a float part fused with quantized ones (e.g. a Q6_K v_proj next to Q4 q/k): int8 per group
        # of 32 keeps it within ~0.4% of its value and lets the fused layer stay one kernel call
        return quantize_int8(w)
    raise ValueError(f"cannot quantize a weight of type {type(w).__name__}")


def dequantize(w: object) -> torch.Tensor:
    """Float32 [N, K] value of any weight ``as_quant_weight`` accepts (float tensors pass through)."""
    if isinstance(w, torch.Tensor):
        return w.float()
    return as_quant_weight(w).dequantize()


def _int4_rows(parts: list[QuantWeight]) -> tuple[Int4Weight, Int4Weight | None, torch.Tensor | None]:
    """Fuse parts along the output dim into int4 rows for one kernel call.

    Returns (main [N, K], lo [M, K] or None, lo_cols [M] or None): output column j is main's row j,
    plus lo's row i where lo_cols[i] == j (the low nibbles of int8 parts).
    """
    mains, los, lo_cols, offset = [], [], [], 0
    for w in parts:
        if isinstance(w, Int8Weight):
            hi, lo = w.split()
            mains.append(hi)
            los.append(lo)
            lo_cols.append(torch.arange(offset, offset + w.shape[0]))
        else:
            mains.append(w)
        offset += w.shape[0]

    def cat(ws: list[Int4Weight]) -> Int4Weight:
        return Int4Weight(*(torch.cat([getattr(w, f) for w in ws]) for f in ("q", "scale", "zero")))

    if not los:
        return cat(mains), None, None
    return cat(mains), cat(los), torch.cat(lo_cols)


def _scales_and_zeros(w: Int4Weight) -> torch.Tensor:
    """[N, G] scale and zero -> the kernels' [G, N, 2] layout."""
    return torch.stack([w.scale, w.zero], dim=-1).transpose(0, 1).contiguous()


class QuantLinear(nn.Module):
    """``y = x @ W.T + b`` with W kept as int4 (int8 as two int4 nibbles), never dequantized.

    Args:
        parts: weights [out_i, in] that share the input (q/k/v or gate/up), fused along the output
            dim: Int4Weight, Int8Weight, GGUF RawQuantTensor, or float (quantized to int8).
        bias: optional float [sum(out_i)].
        device: where the packed weight lives (selects the CPU or CUDA kernel).
        compute_dtype: activation dtype inside the kernel; default ``pick_compute_dtype(device)``.
    """

    def __init__(self, parts: list[object], bias: torch.Tensor | None = None,
                 device: torch.device | str = "cpu", compute_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        device = torch.device(device)
        weights = [as_quant_weight(p) for p in parts]
        if len({w.shape[1] for w in weights}) != 1:
            raise ValueError(f"fused parts must share in_features, got shapes {[w.shape for w in weights]}")
        self.in_features = weights[0].shape[1]
        self.out_features = sum(w.shape[0] for w in weights)
        if self.in_features % GROUP_SIZE:
            raise ValueError(f"in_features must be a multiple of {GROUP_SIZE}, got {self.in_features}")
        self.compute_dtype = compute_dtype or pick_compute_dtype(device)
        self.kinds = [("int8" if isinstance(w, Int8Weight) else "int4", w.shape[0]) for w in weights]
        main, lo, lo_cols = _int4_rows(weights)
        self.num_lo = 0 if lo is None else lo.shape[0]
        # [N + M (+ pad), K]: one kernel call computes both nibbles' products; the packing wants a
        # multiple of 16 rows, so zero rows pad the end (their outputs are never read)
        pad = -(self.out_features + self.num_lo) % 16
        tail = [lo] if lo is not None else []
        if pad:
            tail.append(Int4Weight(q=torch.full((pad, self.in_features), 8, dtype=torch.uint8),
                                   scale=torch.zeros(pad, main.scale.shape[1]),
                                   zero=torch.zeros(pad, main.scale.shape[1])))
        if tail:
            main = Int4Weight(*(torch.cat([getattr(w, f) for w in [main, *tail]]) for f in ("q", "scale", "zero")))
        # every column has a low-nibble row, in order (all parts int8): a slice-add, no index
        self.all_int8 = lo_cols is not None and len(lo_cols) == self.out_features
        self.register_buffer("packed", _pack_int4(main.q, device))
        self.register_buffer("scales_and_zeros",
                             _scales_and_zeros(main).to(device=device, dtype=self.compute_dtype))
        self.register_buffer("lo_cols", None if lo_cols is None or self.all_int8 else lo_cols.to(device))
        self.register_buffer("bias", None if bias is None else bias.detach().to(device))

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) would cast the scales to a dtype the kernel was not set up for: keep theirs.
        dtype = self.scales_and_zeros.dtype
        out = super()._apply(fn, recurse)
        self.scales_and_zeros = self.scales_and_zeros.to(dtype)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in_features] -> [..., out_features] in x's dtype."""
        # Written for the one-token decode, where this layer runs 4 times per transformer layer and its Python
        # costs as much as a small kernel: buffers are read from ``_buffers`` (Module.__getattr__ is slower),
        # the kernel op is resolved once (torch.ops lookups are not free) and no-ops are skipped; ~7 us a call.
        buffers, n = self._buffers, self.out_features
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        kernel = _CPU_KERNEL if buffers["packed"].device.type == "cpu" else _CUDA_KERNEL
        y = kernel(x2.to(self.compute_dtype), buffers["packed"], GROUP_SIZE, buffers["scales_and_zeros"])
        # y: [M, N + lo rows + pad]; add each int8 column's low-nibble product to its high-nibble one
        if self.all_int8:
            y = y[:, :n] + y[:, n:2 * n]
        elif buffers["lo_cols"] is not None:
            y = y[:, :n].index_add(1, buffers["lo_cols"], y[:, n:n + self.num_lo])
        elif y.shape[1] != n:
            y = y[:, :n]
        y = y.to(x.dtype)
        if buffers["bias"] is not None:
            y = y + buffers["bias"].to(x.dtype)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], n)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, parts={self.kinds}, "
                f"group_size={GROUP_SIZE}, compute_dtype={self.compute_dtype}")

    def weight_bytes(self) -> int:
        """Bytes this layer keeps for its weight: packed codes plus scales and zeros."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales_and_zeros))


class QuantEmbedding(nn.Module):
    """Row lookup in a group-quantized table (a GGUF Q8_0 / Q4 embedding) with no float copy of the table:
    only the T rows a step asks for are dequantized (for Gemma 3's 262k x 640 table: 0.19 GB instead of 0.67)."""

    def __init__(self, w: object, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        w = as_quant_weight(w)
        self.dtype, self.is_int8 = dtype, isinstance(w, Int8Weight)
        self.register_buffer("q", w.q.to(device))  # int8 [V, K] or uint8 codes [V, K]
        self.register_buffer("scale", w.scale.to(device))  # float32 [V, K // 32]
        self.register_buffer("zero", None if self.is_int8 else w.zero.to(device))

    @property
    def num_embeddings(self) -> int:
        return self.q.shape[0]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [T] -> rows [T, K] in the model dtype, exactly ``dequantize()[ids]`` rounded once."""
        q = self.q.index_select(0, ids).float()
        scale = self.scale.index_select(0, ids).repeat_interleave(GROUP_SIZE, dim=1)
        if self.is_int8:
            return (q * scale).to(self.dtype)
        zero = self.zero.index_select(0, ids).repeat_interleave(GROUP_SIZE, dim=1)
        return ((q - 8) * scale + zero).to(self.dtype)


def make_quant_linear(weights: list[object], biases: list[torch.Tensor] | None, dtype: torch.dtype,
                      device: torch.device) -> QuantLinear:
    """``layers.make_linear``'s quantized branch: fuse ``weights`` into one QuantLinear; biases in dtype."""
    bias = None if biases is None else torch.cat([b.to(device=device, dtype=dtype) for b in biases])
    return QuantLinear(list(weights), bias, device)


def keep_quantized_types(mode: str, model_format: str) -> frozenset[int]:
    """GGML types the loader should hand over raw for ``EngineConfig.quantization`` ``mode``."""
    if mode == "none" or model_format != "gguf":
        return frozenset()
    return SUPPORTED_GGML_TYPES  # auto, int4, int8: GGUF Q4_0/Q4_1/Q4_K/Q5_0/Q8_0 convert losslessly


# Projections that int4/int8 mode quantizes; the embedding and lm_head stay as loaded (quality).
_LINEAR_SUFFIXES = tuple(f"{p}_proj.weight" for p in ("q", "k", "v", "o", "gate", "up", "down"))


def quantize_linear_weights(tensors: dict[str, object], mode: str) -> dict[str, object]:
    """For ``mode`` int4 | int8: the projection weights still in float, quantized (groups of 32).

    Weights already quantized (GGUF blocks) and weights whose in_features is not a multiple of 32
    are left as they are; ``auto`` and ``none`` return ``tensors`` unchanged.
    """
    if mode not in ("int4", "int8"):
        return tensors
    quantize = quantize_int4 if mode == "int4" else quantize_int8
    out = dict(tensors)
    for name, w in tensors.items():
        if (name.endswith(_LINEAR_SUFFIXES) and isinstance(w, torch.Tensor) and w.dim() == 2
                and w.shape[1] % GROUP_SIZE == 0):
            out[name] = quantize(w)
    return out
